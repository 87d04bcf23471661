"""Checkpoints: one folder per step, written under a temporary name and renamed, so a killed save never
corrupts the last good checkpoint.

    <output_dir>/checkpoints/step_00000100/
        model.safetensors   weights of the task (model.* and loss.*)
        config.json         the resolved run config: rebuilds the right model with no extra flags
        tokenizer/vocab.txt the run's vocabulary (config.json's data.tokenizer points here, relative)
        train_state.pt      optimizer, scheduler, grad scaler, step, data position, best metric
        rng_rank{r}.pt      RNG states of every rank
    <output_dir>/checkpoints/best -> the best step by the configured metric (a symlink)
    <output_dir>/checkpoints/damaged_step_N/   a checkpoint found unreadable on resume, set aside (never resumed)

A failed save (full disk) leaves no temporary folder; a damaged newest checkpoint is skipped on resume.
"""

from __future__ import annotations

import contextlib
import errno
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
    DamagedCheckpointError,
    checkpoint_root,
    damaged,
    list_checkpoints,
    load_weights,
    read_config,
    resolve_checkpoint,
    save_weights,
    write_config,
)
from gram.cli import UserError
from gram.train.launch import first_error

log = logging.getLogger(__name__)

__all__ = ["CONFIG", "TRAIN_STATE", "WEIGHTS", "CheckpointNotFoundError", "DamagedCheckpointError",
           "CheckpointSaveError", "checkpoint_root", "list_checkpoints", "load_weights", "read_config",
           "resolve_checkpoint", "save_weights", "save_checkpoint", "load_train_state", "set_aside_damaged",
           "rng_state", "set_rng_state", "step_folder", "mark_best"]


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
    partitioned optimizer); rank 0 writes the rest, then renames the folder into place atomically.

    A failed write on any rank (a full disk, a lost mount) removes the temporary folder and raises
    `CheckpointSaveError` on every rank, naming the folder and the cause; the earlier checkpoints stay."""
    root = checkpoint_root(output_dir)
    final = step_folder(output_dir, step)
    tmp = root / f".tmp_step_{step:08d}"
    main = dist.is_main_process()

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_rank_files() -> None:
        torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")
        if save_extra is not None:
            save_extra(tmp)

    def write_and_publish() -> None:
        if main:
            save_weights(module, tmp / WEIGHTS)
            write_config(tmp, config)  # config.json + the vocabulary inside the folder
            torch.save(train_state, tmp / TRAIN_STATE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if best:
                _point_best(root, final)
            _prune(output_dir, keep_last)

    for phase in (prepare, write_rank_files, write_and_publish):
        error = first_error(_attempt(phase, root))
        if error is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(f"could not save checkpoint {final}: {error}; the earlier checkpoints in "
                                      f"{root} are kept")
    log.info("saved checkpoint at step %d: %s", step, final)
    return final


def step_folder(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is saved."""
    return checkpoint_root(output_dir) / f"step_{step:08d}"


def mark_best(output_dir: str | Path, folder: Path) -> None:
    """Rank 0: point `checkpoints/best` at an already saved checkpoint (evaluated after it was saved)."""
    if dist.is_main_process():
        _point_best(checkpoint_root(output_dir), folder)


class CheckpointSaveError(UserError):
    pass


def _attempt(write: Callable[[], None], root: Path) -> str | None:
    """Run one phase of a save; None on success, else the cause in a few words."""
    try:
        write()
        return None
    except Exception as error:  # noqa: BLE001 - every write failure must become the one-line save error
        return _write_failure(error, root)


def _write_failure(error: Exception, root: Path) -> str:
    # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), safetensors as its own error:
    # look at the disk itself before repeating those.
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on device"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(root if root.exists() else root.parent).free
        if free < LOW_DISK_BYTES:
            return f"no space left on device ({free / 2**20:.0f} MiB free)"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror.lower()}" + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


LOW_DISK_BYTES = 16 * 2**20


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


TRAIN_STATE_KEYS = ("step", "engine", "data", "best")


def load_train_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train state, this rank's RNG state or None when the world size changed); `DamagedCheckpointError` naming
    the file when one cannot be read."""
    state = _load_pickle(folder / TRAIN_STATE)
    if not isinstance(state, dict) or any(k not in state for k in TRAIN_STATE_KEYS):
        raise DamagedCheckpointError(f"{folder / TRAIN_STATE} is damaged or not a gram train state "
                                     f"(it lacks {', '.join(TRAIN_STATE_KEYS)})")
    rng_file = folder / f"rng_rank{dist.get_rank()}.pt"
    rng = _load_pickle(rng_file) if rng_file.exists() else None
    return state, rng


def _load_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - zip, pickle and EOF errors alike mean an unreadable file
        raise damaged(path, error) from None


def set_aside_damaged(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the step sequence (kept for inspection, never resumed or pruned)."""
    target = folder.with_name(f"damaged_{folder.name}")
    n = 1
    while target.exists():
        target, n = folder.with_name(f"damaged_{folder.name}_{n}"), n + 1
    os.replace(folder, target)
    return target
