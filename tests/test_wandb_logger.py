"""wandb as its users expect: the printed sync command, one run id per output folder across resumes, test-mode
results logged, name/group/tags/notes passed through. wandb.init is replaced by a recorder, except in the one
offline test that checks the real run directory `wandb sync` needs."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import wandb

from gram.config import LoggerConfig, WandbConfig
from gram.main import run
from gram.train.logger import RUN_ID_FILE, RunLogger
from tests.conftest import compose_config, sample_overrides


class FakeRun:
    def __init__(self, root: Path, **kwargs):
        self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False
        self.dir = str(root / f"offline-run-x-{kwargs['id']}" / "files")

    def log(self, metrics, step=None):
        self.logged.append((dict(metrics), step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(Path(kwargs["dir"]) / "wandb", **kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def logger_cfg(mode="offline", **wandb_keys) -> LoggerConfig:
    return LoggerConfig(wandb=WandbConfig(mode=mode, **wandb_keys))


def test_config_keys_reach_wandb_init(fake_wandb, tmp_path):
    cfg = logger_cfg(name="tvas-lr2e-5", group="sweep-1", tags=["msrvtt", "tvas"], notes="first try")
    RunLogger(cfg, tmp_path, {"a": 1}).close()
    kwargs = fake_wandb[0].kwargs
    assert (kwargs["name"], kwargs["group"], kwargs["tags"], kwargs["notes"]) == \
        ("tvas-lr2e-5", "sweep-1", ["msrvtt", "tvas"], "first try")
    assert kwargs["dir"] == str(tmp_path) and kwargs["config"] == {"a": 1} and kwargs["job_type"] == "train"
    assert fake_wandb[0].finished


def test_resume_continues_the_run_id_stored_in_the_output_folder(fake_wandb, tmp_path):
    RunLogger(logger_cfg(), tmp_path, {}).close()
    first = fake_wandb[0].kwargs["id"]
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    resumed = RunLogger(logger_cfg(), tmp_path, {}, resume=True)
    assert fake_wandb[1].kwargs["id"] == first and fake_wandb[1].kwargs["resume"] == "allow"
    assert resumed.sync_command == f"wandb sync {tmp_path / 'wandb'}/offline-run-*-{first}"  # every part, in order
    fresh = RunLogger(logger_cfg(), tmp_path, {})  # not resuming: a new run
    assert fake_wandb[2].kwargs["id"] != first
    assert fresh.sync_command == f"wandb sync {Path(fake_wandb[2].dir).parent}"  # the run directory, not files/


def test_disabled_makes_no_run(fake_wandb, tmp_path):
    logger = RunLogger(logger_cfg("disabled"), tmp_path, {})
    logger.log({"x": 1.0}, 1)
    logger.log_results({"sample": {"t2v_r1": 1.0}})
    logger.close()
    assert fake_wandb == [] and not (tmp_path / RUN_ID_FILE).exists()


@pytest.mark.slow
def test_offline_sync_command_names_the_real_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = RunLogger(logger_cfg(), tmp_path, {"a": 1})
    run_id = logger.run.id
    logger.log({"train/loss": 1.0}, 1)
    logger.close()
    target = Path(logger.sync_command.removeprefix("wandb sync "))
    assert target.is_dir() and target.name.endswith(run_id) and target.name.startswith("offline-run-")
    assert (target / f"run-{run_id}.wandb").is_file()  # what `wandb sync` reads (not the files/ folder)
    again = RunLogger(logger_cfg(), tmp_path, {"a": 1}, resume=True)
    assert again.run.id == run_id
    again.close()
    parts = sorted(glob.glob(again.sync_command.removeprefix("wandb sync ")))
    assert len(parts) == 2 and all(Path(p, f"run-{run_id}.wandb").is_file() for p in parts)


@pytest.mark.slow  # three small end-to-end runs
def test_runs_log_training_resume_and_test_results(fake_wandb, sample_root, tmp_path, capfd):
    """One output folder: train 1 step, resume to 2 (same run id), then mode=test (its own run, results logged)."""
    import logging
    import sys

    console = logging.StreamHandler(sys.stderr)  # what Hydra installs: log lines must land above the bars
    logging.getLogger().addHandler(console)
    logging.getLogger("gram").setLevel(logging.INFO)
    try:
        out = tmp_path / "run"
        common = [*sample_overrides(sample_root, "logger.wandb.mode=offline", "logger.progress_bar=true",
                                    "data.num_frames=2", "data.test_num_frames=2", "trainer.log_every=1")]
        run(compose_config(*common, "trainer.max_steps=2", "trainer.stop_after_steps=1", output_dir=out))
        run(compose_config(*common, "trainer.max_steps=2", "trainer.resume=true", output_dir=out))
        run(compose_config(*common, "mode=test", f"checkpoint={out}", output_dir=tmp_path / "test"))
    finally:
        logging.getLogger().removeHandler(console)
    train, resumed, test = fake_wandb
    assert resumed.kwargs["id"] == train.kwargs["id"] and resumed.kwargs["resume"] == "allow"
    assert test.kwargs["job_type"] == "test" and test.kwargs["id"] != train.kwargs["id"]
    saved = json.loads((tmp_path / "test" / "results.json").read_text())["sample"]
    assert test.summary["test/sample/t2v_r1"] == pytest.approx(saved["t2v_r1"], abs=1e-4)
    assert any("test/sample/v2t_r5" in metrics for metrics, _ in test.logged)
    assert resumed.summary["final/sample/t2v_r1"] >= 0
    err = capfd.readouterr().err
    # the training bar shows the loss parts; evaluation shows its own bar
    assert "contrastive=" in err and "dam=" in err and "evaluate: embed 24 clips" in err
    # every log line starts a line of its own: nothing of a bar before it on the same line
    lines = [line.split("\r")[-1] for line in err.split("\n") if "step 2/2" in line]
    assert lines and all(line.lstrip().startswith("step 2/2") for line in lines), lines
