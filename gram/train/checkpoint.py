"""Checkpoints: one folder per step, written under a temporary name and renamed, so a killed save never
corrupts the last good checkpoint.

    <output_dir>/checkpoints/step_00000100/
        model.safetensors   weights of the task (model.* and loss.*)
        config.json         the resolved run config: rebuilds the right model with no extra flags
        train_state.pt      optimizer, scheduler, grad scaler, step, data position, best metric
        rng_rank{r}.pt      RNG states of every rank
    <output_dir>/checkpoints/best -> the best step by the configured metric (a symlink)
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import _remove_duplicate_names, load_model, save_file
from torch import nn

from gram import distributed as dist
from gram.train.launch import barrier

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step folders under `output_dir/checkpoints`, oldest first (temporary folders are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / WEIGHTS).exists()]
    return [p for _, p in sorted(steps)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a folder, its `model.safetensors`, or a run's output dir (its latest checkpoint)."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if (p / WEIGHTS).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint={path}: no such file or folder. Pass a checkpoint folder "
                                      f"(.../checkpoints/step_N), its {WEIGHTS}, or a training output_dir.")
    raise CheckpointNotFoundError(f"checkpoint={path}: no {WEIGHTS} there and no checkpoints/step_N folder "
                                  f"inside it. Pass a checkpoint folder or the output_dir of a training run.")


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(checkpoint) / CONFIG).read_text())


def load_weights(module: nn.Module, checkpoint: str | Path, strict: bool = True) -> Path:
    folder = resolve_checkpoint(checkpoint)
    missing, unexpected = load_model(module, folder / WEIGHTS, strict=strict)
    if missing or unexpected:
        log.warning("loading %s: missing %s, unexpected %s", folder, missing, unexpected)
    return folder


def save_weights(module: nn.Module, path: Path) -> None:
    """`safetensors.torch.save_model`, but from CPU copies: DeepSpeed ZeRO turns parameters into views of one flat
    buffer, which safetensors refuses to save. Real aliases (one tensor under several names) stay aliases, so
    the duplicate names are dropped exactly as `save_model` drops them and `load_model` reads the file back."""
    copies: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True).contiguous()
        state[name] = copies[key]
    aliases = _remove_duplicate_names(state)
    metadata = {}
    for kept, names in aliases.items():
        for name in names:
            metadata[name] = kept
            del state[name]
    save_file(state, str(path), metadata={"format": "pt", **metadata})


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
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
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
