"""Checkpoints: one folder per step, written under a temporary name and renamed, so a killed save never
corrupts the last good checkpoint.

    <output_dir>/checkpoints/step_00000100/
        model.safetensors   weights of the task (model.* and loss.*)
        config.json         the resolved run config: rebuilds the right model with no extra flags
        tokenizer/vocab.txt the run's vocabulary (config.json's data.tokenizer points here, relative)
        train_state.pt      optimizer, scheduler, grad scaler, step, data position, best metric
        rng_rank{r}.pt      RNG states of every rank
    <output_dir>/checkpoints/best -> the best step by the configured metric (a symlink)
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gram import distributed as dist
from gram.checkpoint_format import (
    CONFIG,
    TRAIN_STATE,
    WEIGHTS,
    CheckpointNotFoundError,
    checkpoint_root,
    list_checkpoints,
    load_weights,
    read_config,
    resolve_checkpoint,
    save_weights,
    write_config,
)
from gram.train.launch import barrier

log = logging.getLogger(__name__)

__all__ = ["CONFIG", "TRAIN_STATE", "WEIGHTS", "CheckpointNotFoundError", "checkpoint_root", "list_checkpoints",
           "load_weights", "read_config", "resolve_checkpoint", "save_weights", "save_checkpoint", "load_train_state",
           "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, module: nn.Module, config: dict[str, Any],
                    train_state: dict[str, Any], keep_last: int, best: bool = False,
                    save_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank writes its RNG state (and `save_extra`'s per-rank files, e.g. DeepSpeed's
    partitioned optimizer); rank 0 writes the rest, then renames the folder into place atomically."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if dist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
    if save_extra is not None:
        save_extra(tmp)
    barrier()
    if dist.is_main_process():
        save_weights(module, tmp / WEIGHTS)
        write_config(tmp, config)  # config.json + the vocabulary inside the folder
        torch.save(train_state, tmp / TRAIN_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if best:
            _point_best(root, final)
        _prune(output_dir, keep_last)
    barrier()
    return final


def _point_best(root: Path, target: Path) -> None:
    link, tmp = root / "best", root / ".best_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def _prune(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, never the one `best` points to."""
    best = checkpoint_root(output_dir) / "best"
    keep_best = best.resolve() if best.exists() else None
    for folder in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        if folder.resolve() != keep_best:
            shutil.rmtree(folder)


def load_train_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train state, this rank's RNG state or None when the world size changed)."""
    state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=False)
    rng_file = folder / f"rng_rank{dist.get_rank()}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    return state, rng
