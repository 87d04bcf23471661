"""Faults on the evaluation side, injected on generated media: every unusable test id named in one error (or left
out under eval.allow_missing), duplicate test ids refused, truncated MP4s detected, and the scripts' entry points
(one line, exit status 2, no traceback; --help without importing torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.io.wavfile

from gram.data.dataset import DuplicateIdsError, MissingMediaError, UnusableItemsError
from gram.data.errors import TruncatedMediaError
from gram.main import run
from tests.conftest import ROOT, compose_config, load_script, sample_overrides

SCRIPTS = ROOT / "scripts"
N_ITEMS = 6


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(sample_root, tmp_path_factory) -> Path:
    """A tiny model after one training step (no test split: only the checkpoint is wanted)."""
    out = tmp_path_factory.mktemp("fault_ckpt")
    run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=1", "data.test=null"), output_dir=out))
    return out


def make_split(sample_root: Path, folder: Path, n: int = N_ITEMS) -> dict:
    """The first ``n`` sample test items in their own annotation file and media folders (links to the originals),
    ready to have faults injected."""
    records = json.loads((sample_root / "annotations" / "test.json").read_text())[:n]
    videos, audios = folder / "videos", folder / "audios"
    videos.mkdir(parents=True)
    audios.mkdir()
    for r in records:
        (videos / f"{r['video_id']}.mp4").symlink_to(sample_root / "videos" / f"{r['video_id']}.mp4")
        for audio in (sample_root / "audios").glob(f"{r['video_id']}.*"):
            (audios / audio.name).symlink_to(audio)
    annotations = folder / "test.json"
    annotations.write_text(json.dumps(records))
    return {"annotations": annotations, "videos": videos, "audios": audios, "records": records,
            "ids": [r["video_id"] for r in records]}


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def faststart_copy(src: Path, dst: Path) -> Path:
    """``src`` remuxed with its index (moov) at the start, as web downloads are."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams if s.type in ("video", "audio")}
        for packet in inp.demux():
            if packet.dts is None or packet.stream.index not in streams:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return dst


def half_downloaded(src: Path, dst: Path) -> Path:
    """A faststart copy of ``src`` cut at half its size."""
    full = faststart_copy(src, dst.with_name(dst.name + ".full")).read_bytes()  # not a video name: never indexed
    assert full.find(b"moov") < full.find(b"mdat")  # the index comes first
    dst.write_bytes(full[: len(full) // 2])
    return dst


def evaluate(sample_root: Path, checkpoint: Path, split: dict, out: Path, *extra: str) -> dict:
    overrides = ["mode=test", f"checkpoint={checkpoint}", f"data.test.annotations={split['annotations']}",
                 f"data.test.video_dir={split['videos']}", f"data.test.audio_dir={split['audios']}",
                 "data.test.canonical_size=null", "data.test_batch_size=4", *extra]
    return run(compose_config(*sample_overrides(sample_root, *overrides), output_dir=out))["sample"]


def listed(path: Path) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in path.read_text().splitlines())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error; fails on a traceback, another exit status or several lines."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def script(name: str, *args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("GRAM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, input=stdin if stdin is not None else "")


# ---------------------------------------------------------------------------------------------- truncation
def test_a_half_downloaded_faststart_mp4_is_truncated_not_shorter(sample_root, tmp_path):
    from gram.data.audio import load_waveform
    from gram.data.video import decode_frames

    src = sample_root / "videos" / "clip00000.mp4"
    full = faststart_copy(src, tmp_path / "full.mp4")
    half = half_downloaded(src, tmp_path / "half.mp4")
    totals = []
    assert decode_frames(full, lambda total: totals.append(total) or [0, total - 1]).shape[0] == 2
    with av.open(str(src)) as container:
        assert totals == [container.streams.video[0].frames]  # the whole clip, by its own count
    with pytest.raises(TruncatedMediaError, match="half.mp4 is truncated"):
        decode_frames(half, lambda total: [0])
    with pytest.raises(TruncatedMediaError, match="half.mp4 is truncated"):
        load_waveform(half)  # the video's own audio track is cut short too
    assert load_waveform(full).numel() > 0


def test_a_truncated_training_clip_is_a_failed_clip_not_a_short_one(sample_root, tmp_path):
    import torch

    from gram.config import DataConfig, DatasetConfig
    from gram.data.dataset import VideoTextDataset

    split = make_split(sample_root, tmp_path, n=3)
    victim = split["ids"][1]
    replace(split["videos"] / f"{victim}.mp4", b"")
    half_downloaded(sample_root / "videos" / f"{victim}.mp4", split["videos"] / f"{victim}.mp4")
    data = DataConfig(tokenizer=str(sample_root / "tokenizer"), num_frames=4, image_size=32)
    dataset = VideoTextDataset(DatasetConfig(annotations=str(split["annotations"]), video_dir=str(split["videos"])),
                               data, ["video"], training=True)
    items = [dataset[(0, i)] for i in range(3)]
    assert "failed" in items[1] and "truncated" in items[1]["failed"] and victim in items[1]["failed"]
    assert all(isinstance(items[i]["video"], torch.Tensor) for i in (0, 2))


# ---------------------------------------------------------------------------------------------- evaluation
def test_undecodable_and_truncated_test_clips_are_named_together(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split")
    broken, cut = split["ids"][1], split["ids"][4]
    replace(split["videos"] / f"{broken}.mp4", b"not a video at all" * 64)
    (split["videos"] / f"{cut}.mp4").unlink()
    half_downloaded(sample_root / "videos" / f"{cut}.mp4", split["videos"] / f"{cut}.mp4")
    out = tmp_path / "out"
    with pytest.raises(UnusableItemsError) as caught:
        evaluate(sample_root, checkpoint, split, out)
    message = str(caught.value)
    assert "\n" not in message and f"{broken}, {cut}" in message and message.startswith("2 item(s)")
    reasons = listed(out / "unusable_test_ids.txt")
    assert set(reasons) == {broken, cut} and "truncated" in reasons[cut] and str(out / "unusable_test_ids.txt") in message
    assert not (out / "results.json").exists()


def test_missing_and_empty_test_files_are_named_before_anything_is_decoded(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split")
    gone, empty = split["ids"][0], split["ids"][3]
    (split["videos"] / f"{gone}.mp4").unlink()
    replace(split["videos"] / f"{empty}.mp4", b"")
    with pytest.raises(MissingMediaError) as caught:
        evaluate(sample_root, checkpoint, split, tmp_path / "out")
    assert f"{gone}, {empty}" in str(caught.value) and "\n" not in str(caught.value)
    reasons = listed(tmp_path / "out" / "unusable_test_ids.txt")
    assert "no video file" in reasons[gone] and "0 bytes" in reasons[empty]


def test_a_nan_embedding_is_named(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split")
    victim = split["ids"][2]
    for old in split["audios"].glob(f"{victim}.*"):
        old.unlink()
    wave = (0.3 * np.sin(np.arange(32000) / 7)).astype(np.float32)
    wave[5000:6000] = np.nan  # a float WAV with NaN samples decodes without error
    scipy.io.wavfile.write(split["audios"] / f"{victim}.wav", 16000, wave)
    with pytest.raises(UnusableItemsError, match=rf"1 item\(s\) .* unusable: {victim} \({victim}: .*NaN or inf"):
        evaluate(sample_root, checkpoint, split, tmp_path / "out")


def test_a_non_finite_embedding_from_the_model_is_named(sample_root, checkpoint, tmp_path, monkeypatch):
    """Finite inputs, but the model gives one item a NaN embedding (a diverged checkpoint): the id is named."""
    from gram.models.gram_model import GramModel

    split = make_split(sample_root, tmp_path / "split")
    embed = GramModel.embed_tokens

    def poisoned(self, modality, *args, **kwargs):
        rows = embed(self, modality, *args, **kwargs)
        if modality == "video" and not self.training:
            rows = rows.clone()
            rows[0] = float("nan")  # the first item of every batch
        return rows

    monkeypatch.setattr(GramModel, "embed_tokens", poisoned)
    first, fifth = split["ids"][0], split["ids"][4]  # the first item of each batch of 4
    with pytest.raises(UnusableItemsError, match=rf"unusable: {first}, {fifth} \({first}: non-finite \(NaN/inf\) video"):
        evaluate(sample_root, checkpoint, split, tmp_path / "out")


def test_allow_missing_evaluates_the_rest_and_reports_the_left_out(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split")
    broken = split["ids"][5]
    replace(split["videos"] / f"{broken}.mp4", b"\x00" * 1000)
    out = tmp_path / "out"
    result = evaluate(sample_root, checkpoint, split, out, "eval.allow_missing=true")
    assert result["n_videos"] == N_ITEMS - 1 == result["n_queries"] == result["n_candidates"]
    assert result["n_missing"] == 1 and result["n_annotated"] == N_ITEMS
    assert list(listed(out / "unusable_test_ids.txt")) == [broken]
    assert json.loads((out / "results.json").read_text())["sample"]["n_videos"] == N_ITEMS - 1


def test_a_duplicated_test_id_is_refused(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split")
    records = split["records"] + [split["records"][2]]
    split["annotations"].write_text(json.dumps(records))
    with pytest.raises(DuplicateIdsError) as caught:
        evaluate(sample_root, checkpoint, split, tmp_path / "out")
    message = str(caught.value)
    assert f"{split['ids'][2]} (x2)" in message and str(split["annotations"]) in message and "\n" not in message


@pytest.mark.slow  # a real `python run.py` process
def test_run_py_names_an_undecodable_test_clip_in_one_line(sample_root, checkpoint, tmp_path):
    split = make_split(sample_root, tmp_path / "split", n=4)
    broken = split["ids"][1]
    replace(split["videos"] / f"{broken}.mp4", b"garbage" * 100)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("GRAM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *sample_overrides(sample_root), "mode=test", f"checkpoint={checkpoint}",
         f"data.test.annotations={split['annotations']}", f"data.test.video_dir={split['videos']}",
         f"data.test.audio_dir={split['audios']}", "data.test.canonical_size=null", "data.test_batch_size=4",
         f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    line = one_line_error(proc)
    assert broken in line and "unusable_test_ids.txt" in line


# ---------------------------------------------------------------------------------------------- check_dataset


def test_check_dataset_strict_fails_on_duplicates_and_truncated_clips(sample_root, tmp_path):
    check = load_script("check_dataset")
    split = make_split(sample_root, tmp_path / "split", n=4)
    cut = split["ids"][3]
    (split["videos"] / f"{cut}.mp4").unlink()
    half_downloaded(sample_root / "videos" / f"{cut}.mp4", split["videos"] / f"{cut}.mp4")
    split["annotations"].write_text(json.dumps(split["records"] + [split["records"][0]]))
    out = tmp_path / "problems.txt"
    args = ["--annotations", str(split["annotations"]), "--video-dir", str(split["videos"]), "--missing-out", str(out),
            "--workers", "1"]
    assert check.main(args) == 0 and check.main([*args, "--strict"]) == 1
    problems = [line.split("\t") for line in out.read_text().splitlines()]
    assert [split["ids"][0], "duplicate id"] in [p[:2] for p in problems]
    assert any(p[0] == cut and p[1] == "undecodable video" and "truncated" in p[2] for p in problems)


# ---------------------------------------------------------------------------------------------- scripts
HELP_RUNNER = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "transformers", "timm", "torchvision", "torchaudio") if m in sys.modules)
print("HEAVY", ",".join(heavy), "CODE", code)
"""


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_every_script_answers_help_without_importing_torch(name):
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(SCRIPTS / name)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY  CODE 0", proc.stdout[-500:]


def test_run_py_answers_help_and_refuses_config_mistakes_without_importing_torch():
    """The encoder configs (gram.models.configs) and the loss config are plain dataclasses: composing the config
    needs neither torch nor transformers (run.py --help took 10 s before, 1.5 s now on a 2-core VM)."""
    run_py = str(SCRIPTS.parent / "run.py")
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, run_py], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Powered by Hydra" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "HEAVY  CODE 0"
    for mistake, named in (("trainer.max_step=3", "trainer.max_steps"), ("trainer.lr=-1", "trainer.lr")):
        runner = HELP_RUNNER.replace('"--help"', repr(mistake))
        proc = subprocess.run([sys.executable, "-c", runner, run_py], capture_output=True, text=True, timeout=120)
        assert named in proc.stderr and proc.stdout.strip().splitlines()[-1] == "HEAVY  CODE 2", proc.stderr


def test_every_script_main_goes_through_run_with_clear_errors():
    for path in SCRIPTS.glob("*.py"):  # at the entry point itself, or inside main() once the arguments are parsed
        text = path.read_text()
        assert 'if __name__ == "__main__":' in text and "run_with_clear_errors(" in text, path.name




def test_argument_errors_are_one_line_in_a_real_process():
    for top_k in ("0", "-2"):
        line = one_line_error(script("retrieve.py", "--checkpoint", "x", "--videos", ".", "--top-k", top_k))
        assert "--top-k" in line and top_k in line


@pytest.mark.parametrize("name, args, culprit", [
    ("retrieve", ["--checkpoint", "x", "--index", "no_such.safetensors"], "no_such.safetensors"),
    ("retrieve", ["--checkpoint", "x", "--videos", ".", "--batch-size", "0"], "--batch-size"),
    ("check_dataset", ["--annotations", "no_such.json"], "no_such.json"),
    ("check_dataset", ["--config", "no_such.yaml"], "no_such.yaml"),
    ("make_shards", ["--annotations", "no_such.json", "--video-dir", ".", "--out", "o"], "no_such.json"),
    ("prepare_dataset", ["--videos", "no_such_folder", "--out", "o"], "no_such_folder"),
    ("make_depth", ["--videos", "no_such_folder", "--out", "o"], "no_such_folder"),
    ("convert_checkpoint", ["no_such.pt", "out"], "no_such.pt"),
    ("diagnose", ["--checkpoint", "x", "--data", "no_such.json", "--output-dir", "o"], "no_such.json"),
    ("diagnose", ["--checkpoint", "x", "--data", "no_such_config", "--output-dir", "o"], "no_such_config"),
    ("diagnose", ["--checkpoint", "x", "--data", "d", "--output-dir", "o", "--max-items", "-1"], "--max-items"),
    ("prepare_dataset", ["--videos", ".", "--out", "o", "--workers", "0"], "--workers"),
])
def test_scripts_turn_a_bad_input_into_one_line(name, args, culprit, tmp_path, monkeypatch, capsys):
    """Each script's main as its `__main__` block runs it (checked above): one line naming the culprit, status 2."""
    from gram.cli import run_with_clear_errors

    module = load_script(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRAM_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_with_clear_errors(lambda: module.main(args))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- retrieve.py
@pytest.fixture(scope="module")
def clips(sample_root, tmp_path_factory) -> dict:
    """Five sample clips, one undecodable and one truncated."""
    folder = tmp_path_factory.mktemp("retrieve_clips")
    split = make_split(sample_root, folder, n=5)
    replace(split["videos"] / f"{split['ids'][1]}.mp4", b"garbage" * 100)
    (split["videos"] / f"{split['ids'][3]}.mp4").unlink()
    half_downloaded(sample_root / "videos" / f"{split['ids'][3]}.mp4", split["videos"] / f"{split['ids'][3]}.mp4")
    return split


def retrieve_main(*args: str) -> tuple[int, str, str]:
    """scripts/retrieve.py as its `__main__` runs it, in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from gram.cli import run_with_clear_errors

    module = load_script("retrieve")
    out, err, code, stdin = io.StringIO(), io.StringIO(), 0, sys.stdin
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.stdin = io.StringIO("")  # no queries on stdin
        try:
            run_with_clear_errors(lambda: module.main(list(args)))
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.stdin = stdin
    return code, out.getvalue(), err.getvalue()


def test_retrieve_skips_and_lists_broken_clips_and_prints_json(checkpoint, clips, tmp_path):
    code, stdout, stderr = retrieve_main(
        "--checkpoint", str(checkpoint), "--videos", str(clips["videos"]), "--audio-dir", str(clips["audios"]),
        "--device", "cpu", "--top-k", "2", "--json", "--query", clips["records"][0]["desc"])
    assert code == 0, stderr
    broken, cut = clips["ids"][1], clips["ids"][3]
    skipped_lines = [line for line in stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped_lines) == 2 and broken in skipped_lines[0] and "truncated" in skipped_lines[1]
    assert "indexed 3 of 5 videos" in stderr
    doc = json.loads(stdout)
    assert doc["n_videos"] == 3 and set(Path(p).stem for p in doc["skipped"]) == {broken, cut}
    assert len(doc["weights_sha256"]) == 64
    (query,) = doc["queries"]
    assert query["query"] == clips["records"][0]["desc"] and set(query["rankings"]) == {"volume", "cosine_video"}
    volume = query["rankings"]["volume"]
    assert [r["rank"] for r in volume] == [1, 2] and volume[0]["value"] <= volume[1]["value"]
    assert {r["video"] for r in volume} <= {clips["ids"][i] for i in (0, 2, 4)}


def test_retrieve_refuses_an_index_built_with_other_weights(checkpoint, clips, tmp_path):
    import shutil

    from safetensors import safe_open

    index = tmp_path / "index.safetensors"
    code, _, stderr = retrieve_main("--checkpoint", str(checkpoint), "--videos", str(clips["videos"]), "--device",
                                    "cpu", "--save-index", str(index))
    assert code == 0, stderr
    with safe_open(str(index), framework="pt") as f:
        built_with = f.metadata()["weights_sha256"]
    other = tmp_path / "other"  # the same config, other weights
    shutil.copytree(checkpoint, other, symlinks=True)
    (weights,) = other.glob("checkpoints/*/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # change the last weight's bytes; the file stays valid
    weights.write_bytes(bytes(data))
    query = ("--index", str(index), "--device", "cpu", "--query", "a clip")
    code, _, stderr = retrieve_main("--checkpoint", str(other), *query)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr
    assert built_with[:16] in lines[0] and str(other) in lines[0] and "--allow-other-weights" in lines[0]
    code, stdout, stderr = retrieve_main("--checkpoint", str(other), *query, "--allow-other-weights")
    assert code == 0 and "warning:" in stderr and built_with[:16] in stderr and "query: a clip" in stdout
    assert retrieve_main("--checkpoint", str(checkpoint), *query)[0] == 0  # its own weights: no complaint
