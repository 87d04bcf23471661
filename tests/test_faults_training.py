"""Injected training faults (issue 15): each case keeps the work done, names the culprit in one line and prints no
traceback. Real runs use a few clips of the session's sample dataset; the trainer's own mechanics use a toy task."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gram.checkpoint_format import list_checkpoints
from gram.cli import UserError, run_with_clear_errors
from gram.main import run, to_dataclass
from gram.train.logger import read_metrics
from gram.train.trainer import NonFiniteLossError, TooManyFailedSamplesError, Trainer
from tests.conftest import ROOT, compose_config, sample_overrides

FAST = ("data.batch_size=8", "data.num_frames=2", "data.test_num_frames=2", "data.test_batch_size=8",
        "trainer.log_every=1")


# ------------------------------------------------------------------------------------------------ generated faults
def write_float_wav(path: Path, wave: np.ndarray, rate: int = 16000) -> None:
    """A mono 32-bit IEEE-float WAV (format tag 3), which can carry NaN samples as real files sometimes do."""
    data = wave.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    chunks = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(chunks)) + chunks)


def derived_split(sample_root: Path, folder: Path, split: str, count: int, ghosts: int = 0) -> list[str]:
    """`count` records of a sample split with their media linked into `folder` (so single files can be broken
    without touching the shared sample); the first `ghosts` records get ids that have no media file.
    Returns the overrides that point `data.<split>` at it."""
    records = json.loads((sample_root / "annotations" / f"{split}.json").read_text())[:count]
    records = [{**r, "video_id": f"ghost{i:03d}"} if i < ghosts else r for i, r in enumerate(records)]
    for kind in ("videos", "audios"):
        (folder / kind).mkdir(parents=True)
        for record in records:
            for source in (sample_root / kind).glob(f"{record['video_id']}.*"):
                (folder / kind / source.name).symlink_to(source)
    (folder / f"{split}.json").write_text(json.dumps(records))
    return [f"data.{split}.annotations={folder}/{split}.json", f"data.{split}.video_dir={folder}/videos",
            f"data.{split}.audio_dir={folder}/audios"]


def replace_media(folder: Path, kind: str, video_id: str) -> None:
    for link in (folder / kind).glob(f"{video_id}.*"):
        link.unlink()


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("GRAM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_user_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------------ real runs
def test_nan_wav_clip_is_skipped_named_and_the_run_keeps_its_checkpoint(sample_root, tmp_path, caplog):
    split = derived_split(sample_root, tmp_path / "data", "train", 8)
    replace_media(tmp_path / "data", "audios", "clip00003")
    wave = np.sin(np.arange(32000, dtype=np.float32) / 10)
    wave[8000:9000] = np.nan
    bad = tmp_path / "data" / "audios" / "clip00003.wav"
    write_float_wav(bad, wave)
    out = tmp_path / "out"
    run(compose_config(*sample_overrides(sample_root, *FAST, *split, "trainer.max_steps=1", "data.test=null",
                                         "data.max_failed_fraction=0.5"), output_dir=out))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]
    named = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(named) == 1 and "NaN or infinite" in named[0]  # logged once, with its path
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1]
    assert all(np.isfinite(h["loss"]) and h["batch"] == 7 and h["skipped_steps"] == 0 for h in history)


def test_diverging_learning_rate_skips_steps_then_stops_after_saving(sample_root, tmp_path, caplog):
    out = tmp_path / "out"
    split = derived_split(sample_root, tmp_path / "data", "train", 8)
    cfg = compose_config(*sample_overrides(sample_root, *FAST, *split, "trainer.max_steps=6", "data.test=null",
                                           "data.batch_size=4", "trainer.lr=1e6", "trainer.vision_lr=1e6",
                                           "trainer.warmup_ratio=0", "trainer.max_bad_steps=2"), output_dir=out)
    with pytest.raises(NonFiniteLossError) as raised:
        run(cfg)
    assert isinstance(raised.value, UserError)  # run.py prints it as one line, exit status 2
    message = str(raised.value)
    assert "\n" not in message and "trainer.max_bad_steps=2" in message and "trainer.lr" in message
    saved = list_checkpoints(out)
    assert len(saved) == 1 and str(saved[0]) in message
    last = int(saved[0].name.split("_")[1])
    assert f"the last at step {last};" in message  # the step numbering of the log and metrics.jsonl
    # Each step is read while the next one runs, so the stop comes a step after the limit; the message and the
    # checkpoint describe every step taken (the run's steps are bad from some step on).
    skipped = [r.getMessage() for r in caplog.records if "the update is skipped" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == [f"step {s}" for s in range(last - len(skipped) + 1, last + 1)]
    assert len(skipped) in (2, 3) and message.startswith(f"{len(skipped)} steps in a row")
    state = torch.load(saved[0] / "train_state.pt", weights_only=False)
    assert state["skipped_steps"] == len(skipped) and state["step"] == last


def test_final_checkpoint_exists_even_when_the_final_evaluation_fails(sample_root, tmp_path):
    out = tmp_path / "out"
    train = derived_split(sample_root, tmp_path / "train", "train", 8)
    test = derived_split(sample_root, tmp_path / "test", "test", 4)
    replace_media(tmp_path / "test", "videos", "clip00097")
    # Undecodable bytes: found only when evaluation decodes the clip (a zero-byte file is refused before training).
    (tmp_path / "test" / "videos" / "clip00097.mp4").write_bytes(b"\x00" * 1000)
    test_ids = [r["video_id"] for r in json.loads((tmp_path / "test" / "test.json").read_text())]
    assert "clip00097" in test_ids, test_ids
    cfg = compose_config(*sample_overrides(sample_root, *FAST, *train, *test, "trainer.max_steps=1",
                                           "data.test.canonical_size=null"), output_dir=out)
    with pytest.raises(Exception, match="clip00097"):
        run(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]  # the trained weights are kept

    (tmp_path / "test" / "videos" / "clip00097.mp4").write_bytes(b"")  # zero bytes: refused before any training
    with pytest.raises(Exception, match="clip00097"):
        run(compose_config(*sample_overrides(sample_root, *FAST, *train, *test, "trainer.max_steps=1",
                                             "data.test.canonical_size=null"), output_dir=tmp_path / "out2"))
    assert list_checkpoints(tmp_path / "out2") == []


def test_best_metric_typo_fails_at_start_naming_the_valid_names():
    with pytest.raises(ValueError, match=r"trainer\.best_metric.*t2v_r2.*t2v_r1, t2v_r5"):
        to_dataclass(compose_config("trainer.best_metric=t2v_r2"))
    with pytest.raises(ValueError, match="top1, top5, map"):  # a rank is not "higher is better"
        to_dataclass(compose_config("eval=sample_classes", "trainer.best_metric=t2v_r1"))
    to_dataclass(compose_config("eval=sample_classes", "trainer.best_metric=top1"))
    to_dataclass(compose_config("mode=test", "checkpoint=x", "eval=sample_classes"))  # no training: not used


@pytest.mark.slow
def test_half_the_training_media_missing_stops_at_start_in_one_line(sample_root, tmp_path):
    split = derived_split(sample_root, tmp_path / "data", "train", 80, ghosts=40)
    out = tmp_path / "out"
    proc = run_cli(*sample_overrides(sample_root, *FAST, *split), f"output_dir={out}")
    line = assert_one_line_user_error(proc, "40 of 80", "data.max_failed_fraction=0.05", "ghost000")
    assert str(tmp_path / "data" / "videos") in line
    assert not list_checkpoints(out)


def test_missing_media_within_the_limit_is_counted_not_fatal(sample_root, tmp_path):
    from gram.data.dataset import VideoTextDataset

    overrides = derived_split(sample_root, tmp_path / "data", "train", 80, ghosts=2)
    cfg = to_dataclass(compose_config(*sample_overrides(sample_root, *overrides)))
    dataset = VideoTextDataset(cfg.data.train, cfg.data, cfg.model.modalities, training=True)
    assert len(dataset) == 78 and dataset.missing_ids == ["ghost000", "ghost001"]
    assert dataset.missing_fraction == pytest.approx(2 / 80)


def test_numeric_config_error_is_one_line_with_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv("GRAM_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:  # what run.py does with the error
        run_with_clear_errors(lambda: to_dataclass(compose_config("trainer.lr=-1")))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: config key `trainer.lr`: got -1.0, must be > 0.0")


# ------------------------------------------------------------------------------------------------ trainer mechanics
class ToyTask(nn.Module):
    """A regression whose loss also reads the batch's `audio`, so a NaN input clip makes the loss NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        loss = (self.linear(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean() + 0.0 * batch["audio"].sum()
        return {"loss": loss}


class ToyStream:
    def __init__(self, make_batch, micro_batch, missing_fraction=0.0):
        self.make_batch, self.micro_batch, self.position = make_batch, micro_batch, 0
        self.missing_fraction = missing_fraction

    def __next__(self):
        self.position += 1
        return self.make_batch(self.position)

    def state(self):
        return {"position": self.position}

    def load_state(self, state):
        self.position = state["position"]


def toy_batch(step, size=8, nan_ids=(), failed=0, prefix="c"):
    g = torch.Generator().manual_seed(step)
    ids = [f"{prefix}{step}_{i}" for i in range(size - failed)]
    audio = torch.zeros(len(ids), 1, 3, 2)
    for i, sample_id in enumerate(ids):
        if sample_id in nan_ids:
            audio[i, 0, 1, 1] = float("nan")
    return {"x": torch.randn(len(ids), 4, generator=g), "y": torch.randn(len(ids), generator=g), "audio": audio,
            "ids": ids, "skipped": [f"/data/{prefix}{step}_bad{i}.mp4: cannot decode" for i in range(failed)]}


def toy_trainer(tmp_path, stream, *overrides):
    cfg = to_dataclass(compose_config("trainer.device=cpu", "trainer.warmup_ratio=0", "trainer.lr=0.1",
                                      "trainer.schedule=constant", "logger.wandb.mode=disabled",
                                      "logger.progress_bar=false", *overrides))
    return Trainer(cfg, ToyTask(), stream, torch.device("cpu"), {}, str(tmp_path))


def test_nan_input_skips_the_step_names_the_clip_and_the_limit_stops_after_saving(tmp_path, caplog):
    # Steps 3-6 each carry one clip with a NaN sample. The limit (3) is reached at step 5, read while step 6 runs:
    # step 6 is counted too, and the message describes all four.
    poisoned = {3: "c3_5", 4: "c4_0", 5: "c5_2", 6: "c6_1"}
    stream = ToyStream(lambda step: toy_batch(step, nan_ids=(poisoned.get(step),)), 8)
    trainer = toy_trainer(tmp_path, stream, "trainer.max_steps=10", "trainer.max_bad_steps=3")
    trainer.train_step()
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.task.parameters()]
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.task.parameters()))  # no NaN update applied
    message = str(raised.value)
    assert message.startswith("4 steps in a row") and "the last at step 6;" in message and "c6_1" in message
    assert "remove or fix" in message
    warnings = [r.getMessage() for r in caplog.records if "the update is skipped" in r.getMessage()]
    assert [w.split(":")[0] for w in warnings] == ["step 3", "step 4", "step 5", "step 6"]
    assert "c3_5" in warnings[0] and "c4_0" in warnings[1] and "c5_2" in warnings[2]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006"]  # the work is kept
    assert str(list_checkpoints(tmp_path)[0]) in message
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3, 4, 5, 6]  # every step logged


def test_a_clean_step_after_the_limit_keeps_the_limit_message_and_its_update(tmp_path):
    poisoned = {2: "c2_0", 3: "c3_0"}  # the limit (2) is reached at step 3; step 4, already running, is clean
    stream = ToyStream(lambda step: toy_batch(step, nan_ids=(poisoned.get(step),)), 8)
    trainer = toy_trainer(tmp_path, stream, "trainer.max_steps=10", "trainer.max_bad_steps=2")
    with pytest.raises(NonFiniteLossError, match="^2 steps in a row.*the last at step 3; .*c3_0") as raised:
        trainer.fit()
    assert trainer.step == 4 and trainer.bad_steps == 0 and trainer.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.task.parameters())
    assert str(tmp_path / "checkpoints" / "step_00000004") in str(raised.value)


def test_non_finite_gradient_with_finite_loss_is_skipped(tmp_path):
    stream = ToyStream(lambda step: toy_batch(step), 8)
    trainer = toy_trainer(tmp_path, stream, "trainer.max_steps=10")
    trainer.task.linear.weight.register_hook(lambda grad: grad * float("inf"))
    before = trainer.task.linear.bias.detach().clone()
    metrics = trainer.train_step()
    assert np.isfinite(metrics["loss"]) and metrics["skipped_steps"] == 1 and trainer.bad_steps == 1
    assert torch.equal(before, trainer.task.linear.bias)  # the finite bias gradient was not applied either


def test_missing_media_and_failed_clips_count_together(tmp_path):
    # 4 % of the items have no file and 1 of 16 loaded clips fails: 4 % + 96 % x 6.25 % = 10 % > 5 %.
    stream = ToyStream(lambda step: toy_batch(step, size=16, failed=1), 16, missing_fraction=0.04)
    trainer = toy_trainer(tmp_path, stream, "trainer.max_steps=50")
    with pytest.raises(TooManyFailedSamplesError) as raised:
        trainer.fit()
    # The limit is passed at step 7 (7 of 112), read while step 8 runs: the message gives the state after step 8.
    message = str(raised.value)
    assert message.startswith("step 8: 8 of 128 training samples failed to load and 4.0% of the annotated items")
    assert "data.max_failed_fraction=0.05" in message and "/data/c1_bad0.mp4" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000008"]
    (tmp_path / "within").mkdir()
    within = toy_trainer(tmp_path / "within", ToyStream(lambda step: toy_batch(step, size=16), 16, missing_fraction=0.04),
                         "trainer.max_steps=8")
    within.fit()  # 4 % missing alone is within the limit
    assert within.samples_seen == 128 and within.samples_failed == 0 and within.step == 8


def _two_rank_worker(rank: int, port: int, tmp_path: Path, cfg) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(seconds=60))
    try:
        # Only rank 1 has a bad shard (2 of its 8 samples fail, 1 clip with NaN at step 2): both ranks skip step 2,
        # name rank 1's clip, and stop together at the same step on the global failure count (2 of 16 per step):
        # passed at step 7, read while step 8 runs.
        stream = ToyStream(lambda step: toy_batch(step, failed=2 * rank, nan_ids=("r1_2_0",), prefix=f"r{rank}_"), 8)
        trainer = Trainer(cfg, ToyTask(), stream, torch.device("cpu"), {}, str(tmp_path))
        with pytest.raises(TooManyFailedSamplesError) as raised:
            trainer.fit()
        message = str(raised.value)
        assert message.startswith("step 8: 16 of 128 training samples failed to load"), message
        assert "/data/r1_1_bad0.mp4" in message, message
        assert trainer.skipped_steps == 1
        (tmp_path / f"rank{rank}.txt").write_text(message)
    finally:
        torch_dist.destroy_process_group()


def test_failures_are_counted_across_ranks_and_stop_every_rank_together(tmp_path):
    from tests.test_distributed import free_port

    cfg = to_dataclass(compose_config("trainer.device=cpu", "trainer.warmup_ratio=0", "trainer.lr=0.1",
                                      "trainer.schedule=constant", "logger.wandb.mode=disabled",
                                      "logger.progress_bar=false", "trainer.max_steps=50"))
    mp.start_processes(_two_rank_worker, args=(free_port(), tmp_path, cfg), nprocs=2, join=True,
                       start_method="fork")
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000008"]


def test_each_evaluation_follows_its_save_and_marks_the_best_checkpoint(tmp_path):
    values = iter([5.0, 10.0])
    calls = []

    def evaluate():
        calls.append(1)
        return {"t2v_r1": next(values), "n_videos": 3}

    cfg = to_dataclass(compose_config("trainer.device=cpu", "logger.wandb.mode=disabled", "logger.progress_bar=false",
                                      "trainer.max_steps=4", "trainer.eval_every=2", "trainer.keep_last=1"))
    trainer = Trainer(cfg, ToyTask(), ToyStream(toy_batch, 8), torch.device("cpu"), {}, str(tmp_path),
                      evaluate=evaluate)
    assert trainer.fit()["t2v_r1"] == 10.0
    assert len(calls) == 2  # the evaluation at step 4 is not repeated as the final one
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]  # best when saved
    assert (root / "best").resolve().name == "step_00000004"
    assert json.loads((root / "step_00000004" / "eval.json").read_text()) == {"step": 4, "t2v_r1": 10.0, "n_videos": 3}
    resumed = Trainer(cfg, ToyTask(), ToyStream(toy_batch, 8), torch.device("cpu"), {}, str(tmp_path))
    resumed.resume()
    assert resumed.step == 4 and resumed.best == 10.0  # step 4's own evaluation, made after it was saved


def test_a_stream_where_every_clip_fails_stops_instead_of_looping(tmp_path):
    trainer = toy_trainer(tmp_path, ToyStream(lambda step: toy_batch(step, failed=8), 8), "trainer.max_steps=5")
    with pytest.raises(TooManyFailedSamplesError, match=r"^step 0: 104 of 104 training samples failed to load"):
        trainer.fit()
    assert not list_checkpoints(tmp_path)  # no step was trained: nothing to keep
