"""Share GRAM models in the Hugging Face hub layout: a folder (or hub repo) with ``config.json`` +
``model.safetensors`` + ``tokenizer/vocab.txt``.

``config.json`` is ``{"format": "gram", "format_version": 2, "model": <ModelConfig as a dict>, "data": <the
test-time preprocessing, a DataConfig dict>}`` with the encoders' weight paths cleared (the safetensors file holds
every weight) and ``data.tokenizer`` = ``"tokenizer"``, the vocabulary inside the folder; ``model.safetensors`` is
the ``GramModel`` state dict (no ``model.`` prefix, no loss). ``gram.load_model(folder)`` opens such a folder with
its tokenizer and preprocessing; a model saved without them (``data`` absent, as format_version 1) still loads
as a model. :class:`GramPretrained` is a ``GramModel`` with ``huggingface_hub``'s
``ModelHubMixin``, so ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` work as users expect, with a
local folder or a hub repo id.

Loading is strict: every key of the file must exist in the model with the same shape, and every key of the model
must be in the file, except (a) aliases of a shared tensor when one of their names is present (safetensors keeps
one name per shared tensor, e.g. BEATs' relative-position table shared by all layers) and (b) keys matching the
caller's explicit ``allow_missing`` fnmatch patterns (:data:`MAY_BE_ABSENT` by default: none).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file, save_model

from gram.config import ModelConfig, typed_section, without_pretrained
from gram.models.convert import alias_groups
from gram.models.gram_model import GramModel

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
VOCAB_NAME = "tokenizer/vocab.txt"
FORMAT, FORMAT_VERSION = "gram", 2
# fnmatch patterns of model keys that a hub file may lack; strict by default (shared-tensor aliases are handled
# separately, see the module docstring).
MAY_BE_ABSENT: tuple[str, ...] = ()


class HubLoadError(KeyError):
    """A hub-layout folder does not fit the model its config describes; the message lists the offending keys."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> JSON-able dict, with the encoders' pretrained-weight paths cleared."""
    out = dataclasses.asdict(cfg)
    for encoder in ("vision", "audio", "text"):
        out[encoder]["weights"] = None
    return out


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Dict (as written by :func:`model_config_to_dict` or a run's ``config.json["model"]``) -> validated
    ModelConfig with no encoder weight paths (unknown keys raise, naming the key)."""
    return without_pretrained(typed_section(ModelConfig, dict(data), "the model config"))


def hub_config(cfg: ModelConfig, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_config_to_dict(cfg)}
    if data is not None:
        config["data"] = {k: v for k, v in data.items() if k not in ("train", "test", "shards")}
    return config


def is_hub_config(config: Mapping[str, Any]) -> bool:
    return config.get("format") == FORMAT and "model" in config


def _write_hub_config(folder: Path, cfg: ModelConfig, data: Mapping[str, Any] | None,
                      vocabulary: str | os.PathLike | None) -> None:
    """config.json, with the vocabulary copied to tokenizer/vocab.txt when there is preprocessing to ship."""
    from gram.checkpoint_format import write_config

    if data is not None and vocabulary is None:
        raise ValueError("a hub export with preprocessing (data) needs its vocabulary: pass vocabulary=")
    if data is not None:
        data = {**data, "tokenizer": str(Path(vocabulary).resolve())}
    write_config(folder, hub_config(cfg, data))


def _check_hub_config(config: Mapping[str, Any] | None, source: str) -> Mapping[str, Any]:
    if not config or config.get("format") != FORMAT or "model" not in config:
        raise ValueError(f"{source}: {CONFIG_NAME} is not a gram hub config (expected \"format\": \"{FORMAT}\" and a "
                         f"\"model\" section). Export with gram.models.hub.save_hub_layout or "
                         "GramPretrained.save_pretrained.")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{source}: format_version {config['format_version']} is newer than this gram "
                         f"({FORMAT_VERSION}); upgrade gram.")
    return config


def save_hub_layout(model: GramModel, folder: str | os.PathLike, data: Mapping[str, Any] | None = None,
                    vocabulary: str | os.PathLike | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` into ``folder`` (created), plus the test-time
    preprocessing (``data``, a DataConfig dict) and the vocabulary (a folder with vocab.txt, or the file) when
    given; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_hub_config(folder, model.cfg, data, vocabulary)
    save_model(model, str(folder / WEIGHTS_NAME))  # keeps one name per shared tensor
    return folder


def check_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                allow_missing: Sequence[str] = MAY_BE_ABSENT, target: str = f"the model in its {CONFIG_NAME}",
                fix: str = "Re-export the model, or pass allow_missing=[patterns] for keys that may legitimately "
                           "be absent.") -> None:
    """Raise :class:`HubLoadError` listing every unexpected, missing (not aliased, not allowed) or mis-shaped key."""
    own = model.state_dict()
    aliases = alias_groups(model)
    present = set(state) | {k for k, owner in aliases.items() if owner in state}
    present |= {owner for k, owner in aliases.items() if k in state}
    missing = [k for k in own if k not in present and not any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise HubLoadError(f"{source} does not fit {target}: missing={missing}, unexpected={unexpected}, "
                           f"shape mismatches={shapes}. {fix}")


def load_state_strict(model: torch.nn.Module, path: str | os.PathLike, allow_missing: Sequence[str] = MAY_BE_ABSENT,
                      device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into ``model`` after :func:`check_state` (aliases are filled by sharing)."""
    state = load_file(str(path), device=str(device))
    check_state(model, state, str(path), allow_missing)
    model.load_state_dict(state, strict=False)


def _resolve(model_id: str, filename: str, **download: Any) -> str:
    """A file of a local folder, or downloaded from the hub repo ``model_id``."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id} has no {filename}; a gram hub folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}.")
        return path
    return hf_hub_download(repo_id=model_id, filename=filename, **download)


class GramPretrained(GramModel, ModelHubMixin, library_name="gram", tags=["gram", "video-retrieval", "multimodal"],
                     repo_url="https://github.com/ispamm/GRAM", paper_url="https://arxiv.org/abs/2412.11959"):
    """``GramModel`` with ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` (hub layout, strict load).

    ``GramPretrained.from_pretrained(folder_or_repo, map_location="cpu", allow_missing=())`` returns the model
    in eval mode, with ``preprocessing`` (the DataConfig dict, or None) and ``vocabulary`` (the vocab.txt path, or
    None) of the export; ``save_pretrained`` writes them back. Embedding files and strings is
    ``gram.load_model(folder)``'s job (a :class:`gram.GramPredictor`); this class works on model-ready tensors.
    """

    preprocessing: dict[str, Any] | None = None
    vocabulary: Path | None = None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_hub_layout(self, save_directory, self.preprocessing, self.vocabulary)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: Mapping[str, Any] | None = None, map_location: str | torch.device = "cpu",
                         allow_missing: Sequence[str] = MAY_BE_ABSENT, **unused: Any) -> GramPretrained:
        if unused:
            raise TypeError(f"GramPretrained.from_pretrained got unknown arguments {sorted(unused)}")
        download = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                        local_files_only=local_files_only, token=token)
        if config is None:  # the mixin passes the parsed config.json when it found one
            config = json.loads(Path(_resolve(model_id, CONFIG_NAME, **download)).read_text())
        cfg = model_config_from_dict(_check_hub_config(config, model_id)["model"])
        with torch.device(map_location):
            model = cls(cfg)
        load_state_strict(model, _resolve(model_id, WEIGHTS_NAME, **download), allow_missing, map_location)
        if config.get("data") is not None:
            model.preprocessing = dict(config["data"])
            model.vocabulary = Path(_resolve(model_id, VOCAB_NAME, **download))
        return model.eval()


def checkpoint_to_hub(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Our checkpoint folder (task weights ``model.*``/``loss.*`` + run config) -> hub layout folder, with the
    checkpoint's test-time preprocessing and vocabulary.

    The loss (temperature) is not part of the shared model; the keys are checked against a meta build first.
    """
    from gram.checkpoint_format import read_config, resolve_checkpoint, tokenizer_location

    source = resolve_checkpoint(checkpoint)
    saved = read_config(source)
    cfg = model_config_from_dict(saved["model"])
    data = saved.get("data")
    state = {k.removeprefix("model."): v for k, v in load_file(str(source / WEIGHTS_NAME)).items()
             if k.startswith("model.")}
    with torch.device("meta"):
        check_state(GramModel(cfg), state, str(source))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_hub_config(folder, cfg, data, tokenizer_location(source, saved) if data is not None else None)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
