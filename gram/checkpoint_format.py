"""The checkpoint folder format, read by models, inference, scripts and the trainer alike (it imports none
of them).

    <folder>/
        model.safetensors   weights of the task (model.* and loss.*)
        config.json         the resolved run config: rebuilds the right model with no extra flags
        train_state.pt      (training checkpoints only) optimizer, scheduler, step, data position, best metric
        rng_rank{r}.pt      (training checkpoints only) RNG states of every rank

A training run keeps its checkpoints as `<output_dir>/checkpoints/step_N/`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names, load_model, save_file
from torch import nn

from gram.cli import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"


class CheckpointNotFoundError(FileNotFoundError):
    pass


class DamagedCheckpointError(UserError):
    """A checkpoint file that cannot be read (cut short by a crash or a full disk, overwritten, not ours)."""


def damaged(path: Path, error: BaseException) -> DamagedCheckpointError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DamagedCheckpointError(f"{path} is damaged or unreadable ({type(error).__name__}: {reason[:200]})")


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
    path = resolve_checkpoint(checkpoint) / CONFIG
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, error) from None


def load_weights(module: nn.Module, checkpoint: str | Path, strict: bool = True) -> Path:
    folder = resolve_checkpoint(checkpoint)
    try:
        missing, unexpected = load_model(module, folder / WEIGHTS, strict=strict)
    except SafetensorError as error:
        raise damaged(folder / WEIGHTS, error) from None
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
