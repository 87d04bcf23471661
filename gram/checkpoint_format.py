"""The checkpoint folder format, read by models, inference, scripts and the trainer alike (it imports none
of them).

    <folder>/
        model.safetensors   weights of the task (model.* and loss.*)
        config.json         the resolved run config: rebuilds the right model with no extra flags; its
                            data.tokenizer is "tokenizer", relative to the folder
        tokenizer/vocab.txt the run's WordPiece vocabulary, so the folder is self-contained
        train_state.pt      (training checkpoints only) optimizer, scheduler, step, data position, best metric
        rng_rank{r}.pt      (training checkpoints only) RNG states of every rank

A training run keeps its checkpoints as `<output_dir>/checkpoints/step_N/`. Relative paths inside config.json
(only data.tokenizer) are relative to the checkpoint folder, so a folder opens from any working directory;
checkpoints written before the vocabulary moved inside keep a path relative to the run's working directory,
which is still tried.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
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
TOKENIZER_DIR, VOCAB = "tokenizer", "vocab.txt"  # <folder>/tokenizer/vocab.txt
# A released GRAM folder as the reference writes it: <folder>/log/hps.json (the run config) and <folder>/ckpt/*.pt.
RELEASED_HPS, RELEASED_CKPT = Path("log") / "hps.json", "ckpt"


class CheckpointNotFoundError(FileNotFoundError):
    pass


class DamagedCheckpointError(UserError):
    """A checkpoint file that cannot be read (cut short by a crash or a full disk, overwritten, not ours)."""


def damaged(path: Path, error: BaseException) -> DamagedCheckpointError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DamagedCheckpointError(f"{path} is damaged or unreadable ({type(error).__name__}: {reason[:200]})")


class TokenizerNotFoundError(FileNotFoundError):
    """A checkpoint's vocabulary (data.tokenizer in its config.json) cannot be found."""


def is_released_folder(path: str | Path) -> bool:
    """A folder in the reference's release layout (log/hps.json and/or ckpt/), not a gram checkpoint."""
    p = Path(path)
    return p.is_dir() and not (p / CONFIG).exists() and ((p / RELEASED_HPS).is_file() or (p / RELEASED_CKPT).is_dir())


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
    if is_released_folder(p) or p.suffix == ".pt":
        raise CheckpointNotFoundError(f"checkpoint={path} is a released GRAM checkpoint in the reference's layout; "
                                      f"convert it once: python scripts/convert_checkpoint.py {path} OUT, then pass "
                                      "OUT (gram.load_model also opens the released folder directly).")
    raise CheckpointNotFoundError(f"checkpoint={path}: no {WEIGHTS} there and no checkpoints/step_N folder "
                                  f"inside it. Pass a checkpoint folder or the output_dir of a training run.")


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(checkpoint) / CONFIG
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, error) from None


def copy_vocabulary(source: str | Path, folder: str | Path) -> str:
    """Copy a WordPiece vocabulary (a folder holding vocab.txt, or the file) to ``folder/tokenizer/vocab.txt``;
    returns the path to write as data.tokenizer, relative to ``folder``."""
    src = Path(source).expanduser()
    src = src / VOCAB if src.is_dir() else src
    if not src.is_file():
        raise TokenizerNotFoundError(f"vocabulary {source} not found (a folder with {VOCAB}, or the file); "
                                     "it is copied into the checkpoint so the folder is self-contained")
    target = Path(folder) / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    if src.resolve() != (target / VOCAB).resolve():
        shutil.copyfile(src, target / VOCAB)
    return TOKENIZER_DIR


def write_config(folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write ``config.json`` into a checkpoint folder, copying the vocabulary its data.tokenizer names inside the
    folder and pointing data.tokenizer at the copy (relative). Returns the config as written."""
    data = config.get("data")
    if isinstance(data, dict) and data.get("tokenizer"):
        source = tokenizer_location(folder, config, check=False)
        try:
            config = {**config, "data": {**data, "tokenizer": copy_vocabulary(source, folder)}}
        except TokenizerNotFoundError as err:  # never lose a checkpoint over it: keep the path as it was
            log.warning("%s; %s keeps data.tokenizer=%r", err, Path(folder) / CONFIG, data["tokenizer"])
    (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def tokenizer_location(folder: str | Path, config: dict[str, Any] | None = None, check: bool = True) -> Path:
    """The vocabulary of a checkpoint: data.tokenizer relative to the checkpoint folder (self-contained folders),
    else as written (absolute, or relative to the working directory for older checkpoints)."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    written = (config.get("data") or {}).get("tokenizer")
    if not written:
        raise TokenizerNotFoundError(f"{folder / CONFIG} names no vocabulary (data.tokenizer); pass "
                                     "tokenizer=DIR_OR_VOCAB_TXT")
    path = Path(written).expanduser()
    if not path.is_absolute() and (folder / path).exists():
        return folder / path
    if path.exists() or not check:
        return path
    hint = (f" It is relative: it was looked for in {folder} and in the current directory {Path.cwd()}."
            if not path.is_absolute() else "")
    raise TokenizerNotFoundError(f"tokenizer {written!r} (data.tokenizer in {folder / CONFIG}) not found.{hint} "
                                 "Pass load_model(..., tokenizer=DIR_OR_VOCAB_TXT) with the run's vocab.txt.")


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


def load_tensor_file(path: str | Path, what: str, hint: str = "") -> Any:
    """A ``.pt`` file read with ``weights_only`` (tensors and plain containers; nothing else is unpickled), or one
    line naming the file: missing (``FileNotFoundError``, with ``hint``), or holding other objects (``UserError``).
    ``what`` says what the file should be ("BEATs checkpoint", "reference GRAM checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} holds objects other than tensors and plain values, so it is not a {what} that can "
                        f"be loaded safely (refusing to unpickle it): {str(err).splitlines()[0]}") from err
