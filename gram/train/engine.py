"""Engines: how one optimizer step is taken. `TorchEngine` is one process or PyTorch DDP; `DeepSpeedEngine` is
DeepSpeed ZeRO stage 1/2 with a config generated from ours (no second file to keep in sync).

Both expose the same small interface to the trainer: `forward_backward` per micro-batch, `grad_norm`, `step`, `lr`,
`state_dict`/`load_state_dict` and `save_extra`/`load_extra` for state that lives in per-rank files. Nothing in
them reads a tensor on the host, so a step is queued on the GPU without waiting for it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gram import distributed as dist
from gram.config import TrainerConfig
from gram.train.optim import build_optimizer, build_scheduler


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TorchEngine:
    def __init__(self, task: nn.Module, cfg: TrainerConfig, device: torch.device):
        self.task, self.cfg, self.device = task, cfg, device
        self.optimizer = build_optimizer(task, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.model = self._wrap(task)

    def _wrap(self, task: nn.Module) -> nn.Module:
        if dist.get_world_size() == 1:
            return task
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The matching head's parameters only get gradients from the DAM loss.
        unused = getattr(task, "dam_weight", 1.0) == 0 and task.model.cfg.matching_head
        return nn.parallel.DistributedDataParallel(task, device_ids=ids, find_unused_parameters=unused)

    def forward_backward(self, batch: dict[str, Any], num_micro: int, last: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; DDP all-reduces gradients only on the last one."""
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        with self.model.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast_context(self.cfg.precision, self.device):
                losses = self.model(batch)
            self.scaler.scale(losses["loss"] / num_micro).backward()
        return losses

    def grad_norm(self) -> torch.Tensor | None:
        """The total 2-norm of the accumulated gradients, a 0-dim tensor on the device (nothing waits for it); a
        NaN or infinite value means the step must be skipped (a finite loss can still give one). None with fp16,
        whose gradient scaler skips such steps itself and lowers its scale, as it should."""
        grads = [p.grad for p in self.task.parameters() if p.grad is not None]
        if self.scaler.is_enabled() or not grads:
            return None
        return torch.nn.utils.get_total_norm(grads)

    def step(self, finite: bool | torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Apply the accumulated gradients (or drop them when the loss or a gradient was not finite), then advance
        the lr.

        ``finite`` may be a boolean tensor on the device: with the fused AdamW and no fp16 scaler the skip then
        happens on the device (the optimizer's ``found_inf``), so the step never waits for it; ``grad_norm``
        (from :meth:`grad_norm`) saves clipping a second pass over the gradients.
        """
        if isinstance(finite, torch.Tensor) and self._skips_on_device():
            self._step_on_device(finite, grad_norm)
            return
        if finite:
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step: the schedule still advances, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()

    def _skips_on_device(self) -> bool:
        return bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()

    def _step_on_device(self, finite: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The fused kernels leave parameters, moments and step counts untouched where ``found_inf`` is 1."""
        if self.cfg.grad_clip > 0:  # asynchronous, like everything here
            params = [p for p in self.task.parameters() if p.grad is not None]
            if grad_norm is None:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, grad_norm)
        self.optimizer.found_inf = (~finite.detach().bool()).float().reshape(())
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, folder: Path) -> None:
        pass

    def load_extra(self, folder: Path) -> None:
        pass


def deepspeed_config(cfg: TrainerConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from ours so the two can never disagree."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": micro_batch * cfg.grad_accum_steps * dist.get_world_size(),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW with its parameter groups
        # Skip a step whose gradient norm is not finite (DeepSpeed 0.19's default, stated so it cannot change).
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0},  # 0: dynamic loss scaling
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _broadcast_scalars_safely(engine_class):
    """DeepSpeed 0.19 broadcasts parameters through a uint8 view, which fails for 0-dim tensors such as the
    learnable temperature; broadcast rank 0's parameters directly instead (what DDP does) while it initialises."""
    import torch.distributed as torch_dist

    def broadcast_from_rank0(engine) -> None:
        for param in engine.module.parameters():
            torch_dist.broadcast(param.data, src=0)

    original = engine_class._broadcast_model
    engine_class._broadcast_model = broadcast_from_rank0
    try:
        yield
    finally:
        engine_class._broadcast_model = original


class DeepSpeedEngine:
    """ZeRO-1/2: parameters stay whole on every rank, optimizer state (and gradients for 2) are partitioned."""

    TAG = "deepspeed"

    def __init__(self, task: nn.Module, cfg: TrainerConfig, device: torch.device, micro_batch: int):
        import deepspeed

        self.task, self.cfg, self.device = task, cfg, device
        optimizer = build_optimizer(task, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        with _broadcast_scalars_safely(deepspeed.runtime.engine.DeepSpeedEngine):
            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=task, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, micro_batch),
                dist_init_required=False)

    def forward_backward(self, batch: dict[str, Any], num_micro: int, last: bool) -> dict[str, torch.Tensor]:
        """DeepSpeed casts the model for bf16/fp16 itself, scales by the accumulation steps and steps the
        optimizer at the accumulation boundary."""
        # DeepSpeed casts the weights to bf16/fp16 but not the inputs (its auto_cast is fp16-only): autocast makes
        # the float inputs (frames, fbanks) meet the weights' dtype, and keeps reductions in fp32.
        with autocast_context(self.cfg.precision, self.device):
            losses = self.model(batch)
        self.model.backward(losses["loss"])
        self.model.step()
        return losses

    def grad_norm(self) -> torch.Tensor | None:
        """The gradient norm DeepSpeed computed when it stepped, inside `forward_backward`: inf when it skipped the
        update for a non-finite gradient (ZeRO 1/2 do in every precision), so the trainer counts that step."""
        norm = self.model.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm).detach().float().to(self.device)

    def step(self, finite: bool | torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        pass  # DeepSpeed stepped at the accumulation boundary; fp16 overflow steps are skipped by its scaler

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def state_dict(self) -> dict[str, Any]:
        return {}  # optimizer and scheduler live in DeepSpeed's own per-rank files (save_extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_extra(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder), tag=self.TAG, save_latest=False)

    def load_extra(self, folder: Path) -> None:
        self.model.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=True, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)


def build_engine(task: nn.Module, cfg: TrainerConfig, device: torch.device, micro_batch: int):
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(task, cfg, device, micro_batch)
    return TorchEngine(task, cfg, device)
