"""trainer.backend=deepspeed with trainer.precision=bf16: DeepSpeed casts the weights to bf16 but not the inputs;
the engine's autocast makes the float frames and fbanks meet them (before: 'Input type (float) and bias type
(c10::BFloat16) should be the same' at the first convolution)."""

import os
import socket

import pytest
import torch

from gram.config import TrainerConfig
from gram.losses import LossConfig
from gram.train.task import GramTask
from tests.test_fast_paths import tiny_batch, tiny_model

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def one_rank():
    """One gloo rank for the whole module: DeepSpeed keeps the groups it was first given, so every engine here
    must live in the same process group."""
    import torch.distributed as torch_dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            patch.setenv(key, value)
        torch_dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_a_bf16_zero2_step_runs_and_updates_the_weights(one_rank):
    from gram.train.engine import DeepSpeedEngine

    task = GramTask(tiny_model(), LossConfig())
    cfg = TrainerConfig(backend="deepspeed", zero_stage=2, precision="bf16", max_steps=10, warmup_ratio=0.0)
    engine = DeepSpeedEngine(task, cfg, torch.device("cpu"), micro_batch=3)
    before = [p.detach().float().clone() for p in task.parameters()]
    losses = engine.forward_backward(tiny_batch(), 1, last=True)
    assert torch.isfinite(losses["loss"]) and losses["loss"].dtype in (torch.float32, torch.bfloat16)
    assert next(task.parameters()).dtype == torch.bfloat16  # DeepSpeed's bf16 weights
    changed = [not torch.equal(a, p.detach().float()) for a, p in zip(before, task.parameters())]
    assert sum(changed) > len(changed) // 2
    assert os.environ["WORLD_SIZE"] == "1"


@pytest.mark.slow
def test_a_non_finite_zero2_step_is_skipped_and_reported(one_rank):
    """DeepSpeed steps inside `forward_backward`; with a NaN gradient it skips the update itself, and the norm it
    reports (inf) makes the trainer count the step as skipped."""
    from gram.train.engine import DeepSpeedEngine

    task = GramTask(tiny_model(), LossConfig())
    cfg = TrainerConfig(backend="deepspeed", zero_stage=2, precision="bf16", max_steps=10, warmup_ratio=0.0,
                        grad_clip=1.0)
    engine = DeepSpeedEngine(task, cfg, torch.device("cpu"), micro_batch=3)
    task.model.encoders["vision"].register_forward_hook(lambda module, args, out: out * float("nan"))
    before = [p.detach().float().clone() for p in task.parameters()]
    engine.forward_backward(tiny_batch(), 1, last=True)
    assert all(torch.equal(a, p.detach().float()) for a, p in zip(before, task.parameters()))
    norm = engine.grad_norm()
    assert norm is not None and not torch.isfinite(norm)
