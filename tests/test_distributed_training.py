"""Real multi-process runs (torchrun, gloo on CPU): DDP equals one process on the same global batch, and
DeepSpeed ZeRO-1/2 trains to the same weights as DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from gram.checkpoint_format import list_checkpoints
from gram.main import run
from tests.conftest import ROOT, compose_config, sample_overrides

# DAM draws random hard negatives per rank, so the comparison runs the contrastive objective alone.
COMMON = ("trainer.max_steps=3", "data.batch_size=16", "loss.dam_weight=0", "model.matching_head=false",
          "trainer.eval_every=0", "data.test_batch_size=12")


def torchrun(out, overrides, port: int) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "run.py"), *overrides, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def final_weights(out):
    return load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.fixture(scope="module")
def ddp_run(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(out, sample_overrides(sample_root, *COMMON), port=29541)
    return out


@pytest.fixture(scope="module")
def ddp_weights(ddp_run):
    return final_weights(ddp_run)


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(ddp_weights, sample_root, tmp_path):
    run(compose_config(*sample_overrides(sample_root, *COMMON), output_dir=tmp_path / "single"))
    assert_close(final_weights(tmp_path / "single"), ddp_weights, atol=1e-4)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_deepspeed_zero_matches_ddp(stage, ddp_weights, sample_root, tmp_path):
    out = tmp_path / f"zero{stage}"
    torchrun(out, sample_overrides(sample_root, *COMMON, "trainer.backend=deepspeed", f"trainer.zero_stage={stage}"),
             port=29550 + stage)
    assert_close(final_weights(out), ddp_weights, atol=1e-4)
    assert (list_checkpoints(out)[-1] / "deepspeed").is_dir()  # partitioned optimizer state saved per rank


@pytest.mark.slow
def test_distributed_evaluation_of_an_uneven_split_equals_one_process(ddp_run, sample_root, tmp_path):
    records = json.loads((sample_root / "annotations" / "test.json").read_text())[:23]  # 12 + 11 per rank
    subset = tmp_path / "test23.json"
    subset.write_text(json.dumps(records))
    common = ("mode=test", f"checkpoint={ddp_run}", f"data.test.annotations={subset}", "data.test.canonical_size=23")
    # Per-rank batches of 6 under torchrun (global 12) and batches of 6 in one process: identical batches.
    torchrun(tmp_path / "two", sample_overrides(sample_root, *common, "data.test_batch_size=12"), port=29545)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["sample"]
    run(compose_config(*sample_overrides(sample_root, *common, "data.test_batch_size=6"), output_dir=tmp_path / "one"))
    one = json.loads((tmp_path / "one" / "results.json").read_text())["sample"]  # both as written (rounded)
    assert two["n_queries"] == one["n_queries"] == 23 == two["n_candidates"]
    assert two["scorings"] == one["scorings"]
