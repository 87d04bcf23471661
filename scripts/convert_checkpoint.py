#!/usr/bin/env python
"""Convert a released GRAM checkpoint (reference ``model_step_*.pt`` / ``best_*.pt``) into gram's checkpoint folder,
or check a list of reference keys against the full model without any weights.

    # convert: OUT/model.safetensors + OUT/config.json, then `python run.py mode=test checkpoint=OUT data=...`
    python scripts/convert_checkpoint.py gram_ckpt/ckpt/model_step_6000.pt converted/gram_vast
    #   --modalities video audio (default) | add subtitle/depth to keep those heads
    #   --beats-cfg pretrained_weights/beats/BEATs_iter3_plus_AS2M.pt  take BEATs' normalisation flags from the file
    #   --model-config configs/model/tiny.yaml  base config for what shapes cannot tell (head counts)
    #   --hub OUT_HUB  also write the Hugging Face hub layout (gram.models.hub)

    # check: every key of a name<TAB>shape<TAB>dtype list must map onto the full model (built on the meta device)
    python scripts/convert_checkpoint.py --check-keys ../shared/reference/gram-checkpoint-keys.tsv

The model config is the base (``ModelConfig`` defaults, i.e. gram_base) with frame/clip counts, the shared width,
the matching head and every encoder size read from the checkpoint's shapes. Exit status: 0, or 1 when any key is
unmapped, unexpected, missing or mis-shaped (the report lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gram.cli import UserError, run_with_clear_errors

if TYPE_CHECKING:  # torch, transformers and timm load after the arguments are parsed: --help answers at once
    import torch

    from gram.config import ModelConfig
    from gram.losses import LossConfig
    from gram.models.convert import ConversionReport
    from gram.models.gram_model import GramModel
    from gram.train.task import GramTask

DATA_MODALITIES = ("video", "audio", "subtitle", "depth")  # gram.config.DATA_MODALITIES, without importing torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="reference checkpoint .pt (flat state dict, maybe under 'model')")
    parser.add_argument("output", nargs="?", help="output checkpoint folder")
    parser.add_argument("--check-keys", metavar="TSV", help="check a name<TAB>shape<TAB>dtype key list instead")
    parser.add_argument("--model-config", metavar="YAML", help="base model config (default: gram_base sizes)")
    parser.add_argument("--modalities", nargs="+", default=None, choices=DATA_MODALITIES,
                        help="data modalities of the converted model (default: video audio; "
                             "--check-keys uses all four so every key has a home)")
    parser.add_argument("--beats-cfg", metavar="PT", help="official BEATs checkpoint whose cfg to use")
    parser.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                        help="fnmatch patterns of our keys that may stay unfilled (e.g. 'model.projections.depth.*')")
    parser.add_argument("--hub", metavar="DIR", help="also export the converted model in the hub layout")
    args = parser.parse_args(argv)
    if not args.check_keys and not (args.source and args.output):
        parser.error("pass SOURCE OUTPUT, or --check-keys TSV")
    return args


# ------------------------------------------------------------------------------------------------ configs
def base_model_config(path: str | None, beats_cfg: str | None) -> ModelConfig:
    """gram_base (the schema defaults) or a model yaml, without weight paths; BEATs cfg from a file if given."""
    from omegaconf import OmegaConf

    from gram.config import ModelConfig
    from gram.models.beats import load_beats_checkpoint

    cfg = ModelConfig()
    if path:
        node = OmegaConf.load(path)
        for encoder in ("vision", "audio", "text"):  # their ${paths.*} interpolations are not needed here
            if encoder in node and "weights" in node[encoder]:
                node[encoder].pop("weights")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    if beats_cfg:
        audio, _ = load_beats_checkpoint(beats_cfg)
        cfg = dataclasses.replace(cfg, audio=audio)
    return cfg


def loss_config_for(tau: float) -> LossConfig:
    """The default (GRAM) loss config holding the checkpoint's temperature, its clamp range widened if needed."""
    from gram.losses import LossConfig

    base = LossConfig()
    return dataclasses.replace(base, temperature_init=tau, temperature_min=min(base.temperature_min, tau),
                               temperature_max=max(base.temperature_max, tau))


def build_meta_task(model_cfg: ModelConfig, loss_cfg: LossConfig) -> GramTask:
    """The full task on the meta device: shapes only, no memory, no weight file read."""
    import torch

    from gram.models.gram_model import GramModel
    from gram.train.task import GramTask

    with torch.device("meta"):
        return GramTask(GramModel(model_cfg), loss_cfg)


# ------------------------------------------------------------------------------------------------ conversion
def load_reference(path: str | Path) -> dict[str, torch.Tensor]:
    import torch

    from gram.models.convert import unwrap_reference

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} holds more than tensors, refusing to unpickle it: {err}") from err
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    return unwrap_reference(state)


def storable(state: Mapping[str, torch.Tensor], task: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep one name per shared tensor of our model and give every other key its own storage (safetensors
    refuses aliased tensors; video and depth copies of one reference tensor must be separate)."""
    from gram.models.convert import alias_groups

    aliases = alias_groups(task)
    out, seen = {}, set()
    for key, value in state.items():
        if aliases.get(key) in state:
            continue
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    return out


def convert(source: str, output: str, args: argparse.Namespace) -> ConversionReport:
    from safetensors.torch import save_file

    from gram.checkpoint_format import CONFIG, WEIGHTS
    from gram.models.convert import CheckpointConversionError, convert_state_dict, infer_model_config
    from gram.models.hub import checkpoint_to_hub, model_config_to_dict

    reference = load_reference(source)
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    model_cfg = infer_model_config(shapes, base_model_config(args.model_config, args.beats_cfg),
                                   args.modalities or ["video", "audio"])
    if "contra_temp" not in reference:
        raise CheckpointConversionError(f"{source} has no contra_temp; is it a GRAM checkpoint?")
    loss_cfg = loss_config_for(float(reference["contra_temp"]))
    task = build_meta_task(model_cfg, loss_cfg)
    state, report = convert_state_dict(reference, task, loss_cfg.temperature_parametrization, args.allow_missing)
    report.raise_if_failed(source)
    print(report.summary())
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(storable(state, task), str(folder / WEIGHTS), metadata={"format": "pt"})
    config = {"model": model_config_to_dict(model_cfg), "loss": dataclasses.asdict(loss_cfg),
              "converted_from": {"file": str(Path(source).resolve()), "dropped": len(report.dropped),
                                 "skipped": sorted(report.skipped)}}
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    print(f"wrote {folder / WEIGHTS} and {folder / CONFIG}")
    if args.hub:
        print(f"wrote hub layout to {checkpoint_to_hub(folder, args.hub)}")
    return report


# ------------------------------------------------------------------------------------------------ key check
def parameter_counts(model: GramModel) -> dict[str, int]:
    """Unique parameters per encoder, for the heads and in total (shared tensors counted once)."""
    counts = {f"encoders.{name}": sum(p.numel() for p in enc.parameters()) for name, enc in model.encoders.items()}
    total = sum(p.numel() for p in model.parameters())
    counts["heads and embeddings"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def check_keys(tsv: str, args: argparse.Namespace) -> ConversionReport:
    from gram.losses import LossConfig
    from gram.models.convert import convert_state_dict, meta_state, read_key_list, unwrap_reference

    keys = read_key_list(tsv)
    reference = meta_state(keys)
    frames = unwrap_reference(reference)
    base = base_model_config(args.model_config, args.beats_cfg)
    model_cfg = dataclasses.replace(
        base, modalities=args.modalities or list(DATA_MODALITIES),
        max_frames=_dim(frames, "vision_frame_embedding", 1, base.max_frames),
        max_audio_clips=_dim(frames, "audio_frame_embedding", 1, base.max_audio_clips))
    task = build_meta_task(model_cfg, LossConfig())
    _, report = convert_state_dict(reference, task, "log", args.allow_missing)
    print(f"{tsv}: {len(keys)} keys against the full model (modalities {model_cfg.modalities}, "
          f"max_frames={model_cfg.max_frames}, max_audio_clips={model_cfg.max_audio_clips}) on the meta device")
    print(report.summary())
    for name, count in parameter_counts(task.model).items():
        print(f"  {name:24s} {count:>15,d}")
    return report


def _dim(state: Mapping[str, torch.Tensor], key: str, axis: int, default: int) -> int:
    return state[key].shape[axis] if key in state else default


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from gram.models.convert import CheckpointConversionError  # torch: after the arguments

    try:
        report = check_keys(args.check_keys, args) if args.check_keys else convert(args.source, args.output, args)
    except (CheckpointConversionError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(main))
