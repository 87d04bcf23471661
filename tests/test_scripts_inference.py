"""scripts/retrieve.py and scripts/diagnose.py on a tiny model trained on the sample dataset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gram.cli import UserError
from gram.eval import geometry
from gram.inference import GramPredictor, load_model
from gram.main import run
from tests.conftest import ROOT, compose_config, load_script, sample_overrides

SCRIPTS = ROOT / "scripts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Training on the 24 clips that are then searched (a reduced problem: see `memorised`) for this many steps.
MEMORISE_STEPS = 20




retrieve = load_script("retrieve")
diagnose = load_script("diagnose")


@pytest.fixture(scope="module")
def memorised(sample_root, tmp_path_factory):
    """A tiny model trained on the test clips themselves, full batch.

    Generalising to unseen clips needs far more steps than a unit test can afford on 2 CPU cores (80 steps on
    the 96 training clips reach R@5 ~ 42 % on the 24 test clips); fitting the 24 searched clips is the reduced
    problem that still checks the whole search path (file discovery, audio pairing, order, volume ranking): any
    mistake there puts the right clip in the top 5 only by chance (5/24).
    """
    out = tmp_path_factory.mktemp("retrieve_run")
    test_json = sample_root / "annotations" / "test.json"
    run(compose_config(*sample_overrides(sample_root, f"trainer.max_steps={MEMORISE_STEPS}",
                                         f"data.train.annotations={test_json}", "data.batch_size=24"),
                       output_dir=out))
    return out


@pytest.fixture(scope="module")
def clip_folders(sample_root, tmp_path_factory):
    """The 24 test clips in their own video folder, and their separate audio files (most have one)."""
    records = json.loads((sample_root / "annotations" / "test.json").read_text())
    base = tmp_path_factory.mktemp("clips")
    videos, audios = base / "videos", base / "audios"
    videos.mkdir()
    audios.mkdir()
    for r in records:
        (videos / f"{r['video_id']}.mp4").symlink_to(sample_root / "videos" / f"{r['video_id']}.mp4")
        for audio in (sample_root / "audios").glob(f"{r['video_id']}.*"):
            (audios / audio.name).symlink_to(audio)
    return videos, audios, {r["video_id"]: r["desc"] for r in records}


def own_clip_ranks(videos: list[Path], ranked: dict, queries: list[str], captions: dict[str, str]) -> list[int]:
    """1-based rank of each query's own clip among the returned top k (k + 1 when it is not there)."""
    owner = {caption: video_id for video_id, caption in captions.items()}
    top = ranked["volume"][1]  # (Q, k) indices into videos
    ranks = []
    for q, query in enumerate(queries):
        names = [videos[int(i)].stem for i in top[q]]
        ranks.append(names.index(owner[query]) + 1 if owner[query] in names else len(names) + 1)
    return ranks


def test_audio_pairing_prefers_same_stem_file(clip_folders):
    videos, audios, _ = clip_folders
    found = retrieve.find_files(videos, retrieve.VIDEO_EXTENSIONS)
    sources = retrieve.audio_sources(found, audios)
    assert len(found) == 24 and [s.stem for s in sources] == [v.stem for v in found]
    assert any(s.parent == audios for s in sources) and any(s.parent == videos for s in sources)


@pytest.mark.slow
def test_own_caption_is_in_the_top_5_for_most_clips(memorised, clip_folders, tmp_path, capsys):
    videos, audios, captions = clip_folders
    queries = list(captions.values())
    argv = ["--checkpoint", str(memorised), "--videos", str(videos), "--audio-dir", str(audios), "--top-k", "5",
            "--device", "cpu", "--save-index", str(tmp_path / "index.safetensors")]
    found, ranked = retrieve.main([*argv, *[a for q in queries for a in ("--query", q)]])
    ranks = own_clip_ranks(found, ranked, queries, captions)
    hits = sum(r <= 5 for r in ranks)
    assert hits > len(queries) / 2, f"own clip in the top 5 for only {hits}/{len(queries)} captions: {ranks}"
    assert set(ranked) == {"volume", "cosine_video"} and ranked["volume"][1].shape == (24, 5)
    volumes = ranked["volume"][0]
    assert (volumes[:, 1:] >= volumes[:, :-1]).all()  # smallest volume first
    table = capsys.readouterr().out
    assert queries[0] in table and "volume" in table and "cosine_video" in table and f"{found[0].stem}" in table


def test_saved_index_is_reused_without_re_embedding(memorised, clip_folders, tmp_path, monkeypatch):
    videos, audios, captions = clip_folders
    index = tmp_path / "index.safetensors"
    queries = list(captions.values())[:4]
    args = [a for q in queries for a in ("--query", q)]
    found, first = retrieve.main(["--checkpoint", str(memorised), "--videos", str(videos), "--audio-dir",
                                  str(audios), "--device", "cpu", "--save-index", str(index), *args])
    saved = load_file(str(index))
    predictor = load_model(memorised)
    assert torch.allclose(saved["video"], predictor.encode_video(found), atol=1e-6)
    with safe_open(str(index), framework="pt") as f:
        assert json.loads(f.metadata()["paths"]) == [str(p) for p in found]

    def refuse(*_args, **_kwargs):
        raise AssertionError("a saved index must not be re-embedded")

    monkeypatch.setattr(GramPredictor, "encode_video", refuse)
    monkeypatch.setattr(GramPredictor, "encode_audio", refuse)
    again_found, again = retrieve.main(["--checkpoint", str(memorised), "--index", str(index), "--device", "cpu",
                                        *args])
    assert again_found == found
    for name in first:
        assert torch.equal(again[name][1], first[name][1]) and torch.allclose(again[name][0], first[name][0])


def test_queries_from_stdin(memorised, clip_folders, tmp_path, monkeypatch, capsys):
    videos, audios, captions = clip_folders
    index = tmp_path / "index.safetensors"
    retrieve.main(["--checkpoint", str(memorised), "--videos", str(videos), "--device", "cpu",
                   "--save-index", str(index), "--query", "warm-up"])
    queries = list(captions.values())[:3]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(queries) + "\n\n"))
    _, ranked = retrieve.main(["--checkpoint", str(memorised), "--index", str(index), "--top-k", "3"])
    assert ranked["volume"][1].shape == (3, 3)
    printed = capsys.readouterr().out
    assert all(f"query: {q}" in printed for q in queries)


def test_mismatched_index_and_bad_arguments_are_refused(memorised, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"video": torch.zeros(3, 7), "audio": torch.zeros(3, 7)}, str(bad), metadata={"paths": "[]"})
    with pytest.raises(retrieve.IndexMismatchError, match="width 64"):
        retrieve.main(["--checkpoint", str(memorised), "--index", str(bad), "--query", "x"])
    with pytest.raises(SystemExit):
        retrieve.parse_args(["--checkpoint", str(memorised), "--query", "x"])  # neither --videos nor --index


@pytest.mark.slow
def test_retrieve_cli(memorised, clip_folders, tmp_path):
    videos, audios, captions = clip_folders
    query = next(iter(captions.values()))
    proc = subprocess.run([sys.executable, str(SCRIPTS / "retrieve.py"), "--checkpoint", str(memorised),
                           "--videos", str(videos), "--audio-dir", str(audios), "--device", "cpu", "--top-k", "2",
                           "--query", query], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"query: {query}" and lines[3].lstrip().startswith("1 |") and lines[4].lstrip().startswith("2 |")


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3


@pytest.mark.slow
def test_diagnose_on_a_data_config(memorised, sample_root, tmp_path, capsys):
    out = tmp_path / "diag"
    result = diagnose.main(["--checkpoint", str(memorised), "--data", "sample", "--output-dir", str(out),
                            "--device", "cpu", f"data.sample_dir={sample_root}", "data.sample_train_size=96",
                            "data.sample_test_size=24"])
    assert result["n"] == 24 and result["modalities"] == ["text", "video", "audio"]
    embeddings = load_model(memorised).embed_split(diagnose.resolve_split(diagnose.parse_args(
        ["--checkpoint", "x", "--data", "sample", "--output-dir", "x", f"data.sample_dir={sample_root}",
         "data.sample_train_size=96", "data.sample_test_size=24"])))
    assert result["gap"]["text-video"] == pytest.approx(geometry.modality_gap(embeddings["text"], embeddings["video"]),
                                                        abs=1e-6)
    assert result["effective_rank"]["audio"] == pytest.approx(geometry.effective_rank(embeddings["audio"]), abs=1e-6)
    assert json.loads((out / "geometry.json").read_text())["gap"] == result["gap"]
    saved = json.loads((out / "geometry.json").read_text())
    assert 0 <= saved["volume_separation"]["auc"] <= 1 and "d_prime" in saved["volume_separation"]
    for name in ("volumes.png", "projection.png"):
        _check_png(out / name)
        title = PIL.Image.open(out / name).info["Title"]  # checkpoint, split, modalities and N on every figure
        assert str(memorised) in title and "step_" in title and "sample test" in title
        assert "text+video+audio" in title and "N=24" in title
    printed = capsys.readouterr().out
    assert "text-video" in printed and "volume positive" in printed and "AUC" in printed


def test_diagnose_on_an_annotation_file(memorised, sample_root, tmp_path):
    out = tmp_path / "diag"
    result = diagnose.main(["--checkpoint", str(memorised), "--data", str(sample_root / "annotations" / "test.json"),
                            "--video-dir", str(sample_root / "videos"), "--audio-dir", str(sample_root / "audios"),
                            "--max-items", "8", "--output-dir", str(out), "--device", "cpu"])
    assert result["n"] == 8
    assert result["volume_positive"]["mean"] > 0 and result["volume_negative"]["mean"] > 0
    _check_png(out / "volumes.png")


def test_diagnose_unknown_data_is_named(memorised, tmp_path):
    with pytest.raises(UserError, match="no_such_dataset"):
        diagnose.main(["--checkpoint", str(memorised), "--data", "no_such_dataset", "--output-dir", str(tmp_path)])
