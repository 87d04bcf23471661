"""The whole pipeline at a small size: generate -> train -> evaluate -> checkpoint -> test mode, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from gram.checkpoint_format import list_checkpoints
from gram.main import run
from gram.provenance import rounded
from tests.conftest import ROOT, compose_config, sample_overrides

METRICS = [f"{d}_{k}" for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "medr", "meanr")]


@pytest.fixture(scope="module")
def trained(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=12", "trainer.log_every=4"),
                                output_dir=out))
    return out, result


@pytest.mark.slow
def test_training_writes_results_and_checkpoint(trained):
    out, result = trained
    saved = json.loads((out / "results.json").read_text())
    entry = saved["sample"]
    assert {k: v for k, v in entry.items() if k != "provenance"} == json.loads(json.dumps(rounded(result["sample"])))
    assert entry["provenance"]["gram_version"] and entry["provenance"]["torch_version"]
    assert set(METRICS) <= set(entry)
    assert entry["n_queries"] == entry["n_candidates"] == 24 == entry["n_videos"]
    assert 0 <= entry["t2v_r1"] <= entry["t2v_r5"] <= entry["t2v_r10"] <= 100
    assert 1 <= entry["t2v_medr"] <= 24
    assert {"volume", "cosine_video", "cosine_audio"} == set(entry["scorings"])
    folder = list_checkpoints(out)[-1]
    assert folder.name == "step_00000012"
    assert {"model.safetensors", "config.json", "train_state.pt", "rng_rank0.pt"} <= {p.name for p in folder.iterdir()}
    assert entry["checkpoint_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_test_mode_reproduces_the_training_metrics(trained, sample_root, tmp_path):
    out, result = trained
    again = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={out}"),
                               output_dir=tmp_path / "eval"))
    for key in METRICS:
        assert again["sample"][key] == result["sample"][key], key
    assert again["sample"]["checkpoint_sha256"] == result["sample"]["checkpoint_sha256"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())["sample"]
    assert saved["t2v_r1"] == rounded(result["sample"]["t2v_r1"]) == pytest.approx(result["sample"]["t2v_r1"], rel=1e-5)


def _cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_unknown_key_names_the_key(tmp_path):
    proc = _cli("trainer.max_stepz=3", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "unknown config key `trainer.max_stepz`" in proc.stderr and "`trainer.max_steps`" in proc.stderr
    assert "+trainer.max_stepz" not in proc.stderr and "Traceback" not in proc.stderr  # not Hydra's advice


@pytest.mark.slow
def test_cli_missing_checkpoint_is_one_clear_error(tmp_path, sample_root):
    missing = tmp_path / "nope"
    proc = _cli("mode=test", f"checkpoint={missing}", *sample_overrides(sample_root), f"output_dir={tmp_path}/o")
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_data_folder_is_one_clear_error(tmp_path):
    proc = _cli("data.generate_sample=false", f"data.sample_dir={tmp_path}/absent", "logger.wandb.mode=disabled",
                f"output_dir={tmp_path}/o")
    assert proc.returncode == 2
    assert f"{tmp_path}/absent" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_trains_and_logs_to_a_file(tmp_path, sample_root):
    out = tmp_path / "cli"
    proc = _cli(*sample_overrides(sample_root, "trainer.max_steps=3"), f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "t2v_r1" in proc.stdout and (out / "results.json").exists()
    assert "step 3/3" in (out / "run.log").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(tmp_path, sample_root):
    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           # gradient checkpointing in every encoder together with DDP (the reference had to drop DDP), under bf16
           str(ROOT / "run.py"), *sample_overrides(sample_root, "trainer.max_steps=3", "trainer.precision=bf16",
                                                   "model.vision.grad_checkpointing=true",
                                                   "model.audio.grad_checkpointing=true",
                                                   "model.text.grad_checkpointing=true"), f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["sample"]
    assert result["n_queries"] == result["n_candidates"] == 24  # both ranks' shards, nothing lost or doubled
    assert {p.name for p in list_checkpoints(out)[-1].iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt"}
    assert "process group: 2 ranks, backend gloo" in (out / "run.log").read_text()


def test_dam_reranking_is_a_separate_row_that_only_reorders_the_top_k(trained, sample_root, tmp_path):
    out, _ = trained
    result = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={out}", "eval.rerank_k=5"),
                                output_dir=tmp_path / "rerank"))["sample"]["scorings"]
    plain, reranked = result["volume"], result["volume+dam"]
    for direction in ("t2v", "v2t"):  # the top 5 are only reordered among themselves, the rest keeps its order
        assert reranked[f"{direction}_r5"] == plain[f"{direction}_r5"]
        assert reranked[f"{direction}_r10"] == plain[f"{direction}_r10"]


def test_zero_shot_classification_on_the_sample_labels(trained, sample_root, tmp_path):
    out, _ = trained
    result = run(compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={out}", "eval=sample_classes"),
                                output_dir=tmp_path / "cls"))["sample"]
    assert result["n_classes"] == 4 and result["n_videos"] == 24
    assert set(result["scorings"]) == {"volume", "cosine_video", "cosine_audio"}
    for metrics in result["scorings"].values():
        assert 0 <= metrics["top1"] <= 100 and 0 <= metrics["map"] <= 100
        assert metrics["top5"] == 100.0  # 4 classes: the right one is always among the top 5
    assert "top1" in (tmp_path / "cls" / "results.json").read_text()
