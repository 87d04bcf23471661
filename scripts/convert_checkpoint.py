#!/usr/bin/env python
"""Convert a released GRAM checkpoint folder (log/hps.json + ckpt/*.pt) into a self-contained gram checkpoint, or
check a list of reference keys against the full model without any weights.

    # convert: OUT/model.safetensors + OUT/config.json (model, loss, data) + OUT/tokenizer/vocab.txt, then
    #   python run.py mode=test checkpoint=OUT data=msrvtt_ret   or   gram.load_model("OUT")   or   init_from=OUT
    python scripts/convert_checkpoint.py pretrained_weights/gram/GRAM_pretrained_4modalities converted/gram_tvas
    #   SOURCE may also be one .pt file (ckpt/model_step_N.pt, best_*.pt); a folder's newest step is used
    #   --tokenizer DIR  bert-base-uncased's vocab.txt folder (default pretrained_weights/bert/bert-base-uncased)
    #   --modalities video audio subtitle  override the modalities of hps.json's evaluation task
    #   --image-size 336  convert for another resolution (position grid resized bilinearly, as the reference)
    #   --hps FILE  the run's hps.json when it is not at SOURCE/log/hps.json
    #   --hub OUT_HUB  also write the Hugging Face hub layout (gram.models.hub)

    # check: every key of a name<TAB>shape<TAB>dtype list must map onto the full model (built on the meta device)
    python scripts/convert_checkpoint.py --check-keys ../shared/reference/gram-checkpoint-keys.tsv

The model's sizes come from the weights' shapes, over gram_base (or --model-config) for what shapes cannot tell;
hps.json gives the modalities, test-time frames, clips, transform, mel bins, text lengths and the DAM weight.
Exit status: 0; 1 when any key is unmapped, unexpected, missing or mis-shaped (the report lists them); 2 for any
other input error, on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence

DATA_MODALITIES = ("video", "audio", "subtitle", "depth")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="released GRAM folder (log/hps.json + ckpt/*.pt) or one .pt file")
    parser.add_argument("output", nargs="?", help="output checkpoint folder")
    parser.add_argument("--check-keys", metavar="TSV", help="check a name<TAB>shape<TAB>dtype key list instead")
    parser.add_argument("--tokenizer", metavar="DIR", help="BERT vocabulary (folder with vocab.txt, or the file); "
                                                          "default pretrained_weights/bert/bert-base-uncased")
    parser.add_argument("--hps", metavar="JSON", help="the run's hps.json (default SOURCE/log/hps.json)")
    parser.add_argument("--model-config", metavar="YAML", help="base model config (default: gram_base sizes)")
    parser.add_argument("--modalities", nargs="+", default=None, choices=DATA_MODALITIES,
                        help="data modalities of the converted model (default: hps.json's evaluation task, else "
                             "video audio; --check-keys uses all four so every key has a home)")
    parser.add_argument("--image-size", type=int, help="convert for this image size (pos_embed resized bilinearly)")
    parser.add_argument("--beats-cfg", metavar="PT", help="official BEATs checkpoint whose cfg to use")
    parser.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                        help="fnmatch patterns of our keys that may stay unfilled (e.g. 'model.projections.depth.*')")
    parser.add_argument("--hub", metavar="DIR", help="also export the converted model in the hub layout")
    args = parser.parse_args(argv)
    if not args.check_keys and not (args.source and args.output):
        parser.error("pass SOURCE OUTPUT, or --check-keys TSV")
    return args


def base_model_config(path, beats_cfg):
    from gram.released import base_model_config as base

    return base(path, beats_cfg)


# ------------------------------------------------------------------------------------------------ conversion
def convert(source: str, output: str, args: argparse.Namespace):
    from gram.models.hub import checkpoint_to_hub
    from gram.released import convert_released, write_converted

    converted = convert_released(source, args.tokenizer, hps=args.hps, modalities=args.modalities,
                                 image_size=args.image_size, model_config=args.model_config,
                                 beats_cfg=args.beats_cfg, allow_missing=args.allow_missing)
    print(f"converting {converted.source}")
    print(converted.report.summary())
    folder = write_converted(converted, output)
    print(f"wrote {folder}: model.safetensors, config.json, tokenizer/vocab.txt")
    if args.hub:
        print(f"wrote hub layout to {checkpoint_to_hub(folder, args.hub)}")
    return converted.report


# ------------------------------------------------------------------------------------------------ key check
def parameter_counts(model) -> dict[str, int]:
    """Unique parameters per encoder, for the heads and in total (shared tensors counted once)."""
    counts = {f"encoders.{name}": sum(p.numel() for p in enc.parameters()) for name, enc in model.encoders.items()}
    total = sum(p.numel() for p in model.parameters())
    counts["heads and embeddings"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def check_keys(tsv: str, args: argparse.Namespace):
    from gram.config import LossConfig
    from gram.models.convert import convert_state_dict, meta_state, read_key_list, unwrap_reference
    from gram.released import build_meta_task

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


def _dim(state: Mapping, key: str, axis: int, default: int) -> int:
    return state[key].shape[axis] if key in state else default


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help is instant
    from gram.cli import run_with_clear_errors
    from gram.models.convert import CheckpointConversionError

    def work() -> int:
        try:
            report = check_keys(args.check_keys, args) if args.check_keys else convert(args.source, args.output, args)
        except CheckpointConversionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0 if report.ok else 1

    return run_with_clear_errors(work)


if __name__ == "__main__":
    sys.exit(main())
