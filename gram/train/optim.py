"""Optimizer and learning-rate schedule as in the paper: AdamW(0.9, 0.98, eps 1e-6), decoupled weight decay on
weights only, a separate (much lower) learning rate for the vision encoder, warm-up then decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from gram.config import TrainerConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (1-D) and scalars such as the temperature are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(module: nn.Module, cfg: TrainerConfig, vision_prefix: str = "encoders.vision.") -> list[dict]:
    """Four groups: (vision | rest) x (decay | no decay); frozen params are left out entirely."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        key = (vision_prefix in name, _no_decay(name, param))
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": cfg.vision_lr if vision else cfg.lr,
             "weight_decay": 0.0 if no_decay else cfg.weight_decay, "base_lr": cfg.vision_lr if vision else cfg.lr}
            for (vision, no_decay), params in sorted(groups.items())]


def build_optimizer(module: nn.Module, cfg: TrainerConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. ``fused`` (default: when PyTorch has the fused kernel for every
    parameter's device: CUDA, CPU and others) runs the whole update as a few multi-tensor kernels instead of several
    per parameter, and lets the engine skip a non-finite step on the device (``found_inf``) without waiting for it,
    the same way on a laptop as on a GPU."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups = param_groups(module, cfg)
    if fused is None:
        params = [p for group in groups for p in group["params"]]
        supported = _get_fused_kernels_supported_devices()
        fused = bool(params) and all(p.device.type in supported and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `cfg.max_steps`."""
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    if cfg.schedule == "warmup_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
