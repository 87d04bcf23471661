"""Geometry diagnostics of a trained model's embedding space on a dataset split.

    # a data config name (configs/data/<name>.yaml), with optional config overrides after it
    python scripts/diagnose.py --checkpoint outputs/run --data sample --output-dir diag/ data.sample_dir=data/sample
    # or an annotation file and its media folders
    python scripts/diagnose.py --checkpoint outputs/run --data test.json --video-dir videos --audio-dir audios \\
        --output-dir diag/

Prints the modality gap, alignment and uniformity per modality pair, uniformity and effective rank per
modality and the positive/negative volume distribution (gram.eval.geometry), and writes geometry.json,
volumes.png and projection.png into --output-dir. The preprocessing is the checkpoint's own (test-time).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gram.cli import ArgumentParser, UserError, non_negative_int, positive_int, run_with_clear_errors

if TYPE_CHECKING:  # torch loads after the arguments are parsed: --help answers at once
    from gram.config import DatasetConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def split_from_config(name: str, split: str, overrides: Sequence[str]) -> DatasetConfig:
    """The ``split`` of data config ``name`` composed as run.py does (generating the sample data if it asks to)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gram.config import DatasetConfig, check_overrides, register_configs
    from gram.main import prepare_sample_data, to_dataclass

    if not (CONFIGS / "data" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
        raise UserError(f"--data {name}: no configs/data/{name}.yaml and no such annotation file; "
                         f"data configs: {', '.join(known)}")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    check_overrides(overrides, CONFIGS)
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            node = compose(config_name="config", overrides=[f"data={name}", "output_dir=unused", *overrides])
        cfg = to_dataclass(node)
    except (HydraException, OmegaConfBaseException) as err:  # a wrong override value: one line
        raise UserError(f"--data {name} {' '.join(overrides)}: {' '.join(str(err).split())}") from err
    prepare_sample_data(cfg)
    chosen = getattr(cfg.data, split)
    if chosen is None:
        raise UserError(f"--data {name} has no {split!r} split; use --split {'test' if split == 'train' else 'train'}")
    return OmegaConf.to_object(OmegaConf.structured(chosen)) if not isinstance(chosen, DatasetConfig) else chosen


def resolve_split(args: argparse.Namespace) -> DatasetConfig:
    """An annotation file (with --video-dir/--audio-dir) or a data config name."""
    from gram.config import DatasetConfig

    path = Path(args.data)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"--data {path}: annotation file not found")
        return DatasetConfig(annotations=str(path), video_dir=args.video_dir, audio_dir=args.audio_dir,
                             depth_dir=args.depth_dir)
    return split_from_config(args.data, args.split, args.overrides)


def warn_ignored_preset(overrides: Sequence[str], used: str) -> None:
    """A data config override of the preset does not apply: the model is run with its checkpoint's (or
    --preprocessing's) preset. Say so when they differ."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "data.preprocessing" and value != used:
            warnings.warn(f"{override} is ignored: the checkpoint is run with preprocessing preset {used!r} "
                          f"(its recorded one; --preprocessing overrides it)", stacklevel=2)


def checkpoint_label(checkpoint: str) -> str:
    """The checkpoint as given, plus the step folder it resolved to when that is not already in the name."""
    from gram.checkpoint_format import resolve_checkpoint

    try:
        folder = resolve_checkpoint(checkpoint)
    except (OSError, ValueError):
        return str(checkpoint)
    return str(checkpoint) if folder.name in str(checkpoint) else f"{checkpoint} ({folder.name})"


def split_label(args: argparse.Namespace) -> str:
    """"<data config> <split>" or the annotation file's name."""
    path = Path(args.data)
    return path.name if path.suffix == ".json" or path.is_file() else f"{args.data} {args.split}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training output dir")
    p.add_argument("--data", required=True, help="a data config name (configs/data/) or an annotation JSON file")
    p.add_argument("--split", choices=("train", "test"), default="test", help="split of a data config")
    p.add_argument("--video-dir", help="video folder (with an annotation file)")
    p.add_argument("--audio-dir", help="audio folder (with an annotation file; default: the videos' own tracks)")
    p.add_argument("--depth-dir", help="depth folder (with an annotation file)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--max-items", type=positive_int, help="use only the first N items")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--tokenizer", help="the run's vocab.txt (or its folder) if its config's path is not found here")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-workers", type=non_negative_int, default=0)
    p.add_argument("--preprocessing", choices=("reference", "accurate"),
                   help="override the preprocessing preset the checkpoint records (warns; default: the recorded one)")
    p.add_argument("overrides", nargs="*", help="config overrides for a data config, e.g. data.sample_dir=DIR")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the diagnostics; returns the report as a dict (also written to geometry.json)."""
    args = parse_args(argv)
    from gram.eval.geometry import format_report, geometry_report, plot_title, save_plots
    from gram.inference import load_model

    split = resolve_split(args)
    predictor = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer, batch_size=args.batch_size,
                           preprocessing=args.preprocessing)
    warn_ignored_preset(args.overrides, predictor.data.preprocessing)
    print(f"preprocessing preset: {predictor.data.preprocessing}")
    embeddings = predictor.embed_split(split, limit=args.max_items, num_workers=args.num_workers, progress=True)
    report = geometry_report(embeddings)
    print(format_report(report))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(args.checkpoint), "annotations": split.annotations, **report.as_dict()}
    (args.output_dir / "geometry.json").write_text(json.dumps(result, indent=2))
    title = plot_title(checkpoint_label(args.checkpoint), split_label(args), report.modalities, report.n)
    for path in save_plots(embeddings, args.output_dir, title=title):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    run_with_clear_errors(main)
