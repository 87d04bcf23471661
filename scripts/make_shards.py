#!/usr/bin/env python
"""Build webdataset tar shards for pretraining from an annotation file and its media folders.

Writes ``<out>/shard-000000.tar`` ... (each sample: the original ``video.<ext>``, ``audio.<ext>`` and
``depth.<ext>`` bytes and the annotation record as ``json``), ``<out>/index.json`` (shards, samples per
shard, total, source, skipped ids) and ``<out>/missing_ids.txt`` (ids without the required media, one per
line). Records whose captions are all empty (check_dataset.py's "empty caption") are skipped with one
warning and listed in the index's ``empty_caption_ids``. Re-running after an interruption keeps every
finished shard that still holds its planned samples.

    python scripts/make_shards.py --annotations data/vast/annotations150k.json \\
        --video-dir data/vast/videos --audio-dir data/vast/audios --out data/vast/shards \\
        --samples-per-shard 1000 --max-shard-size 2GB

Then list ``<out>/index.json`` under ``data.shards.sources`` in the training config.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gram.cli import run_with_clear_errors

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2e9, ``"512MiB"`` -> 512 * 2**20, ``"1000"`` -> 1000 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 2GB, 500MB, 512MiB or a byte count")
    return int(float(match.group(1)) * UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--annotations", required=True, help="annotation JSON (clip_id/video_id + captions)")
    parser.add_argument("--video-dir", required=True, help="folder of <id>.<ext> videos")
    parser.add_argument("--audio-dir", help="folder of <id>.<ext> audio files (else the video's own track is used)")
    parser.add_argument("--depth-dir", help="folder of <id>.<ext> depth videos or .npy frame arrays")
    parser.add_argument("--corrupted", help="text file of ids to leave out (one per line)")
    parser.add_argument("--out", required=True, help="output folder for the shards and index.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-size", type=parse_size, help="most media bytes per shard, e.g. 2GB")
    parser.add_argument("--require-audio-file", action="store_true",
                        help="skip (and list) clips without a separate audio file, as the reference did")
    return parser


def summary(index: dict, out: Path) -> str:
    lines = [f"shards:        {len(index['shards'])} in {out} ({len(index['written'])} written, "
             f"{len(index['reused'])} reused)",
             f"samples:       {index['total']}",
             f"missing media: {index['num_missing']} (ids in {out / index['missing_ids_file']})",
             f"duplicate ids: {len(index['duplicate_ids'])} (first occurrence kept)",
             f"empty captions: {len(index['empty_caption_ids'])} (skipped; ids in {out / 'index.json'}, "
             f"empty_caption_ids)"]
    if index["removed"]:
        lines.append(f"removed stale: {', '.join(index['removed'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gram.config import DatasetConfig  # torch and PyAV: after the arguments, so --help answers at once
    from gram.data.annotations import read_annotations
    from gram.data.shards import media_resolver, write_shards

    split = DatasetConfig(annotations=args.annotations, video_dir=args.video_dir, audio_dir=args.audio_dir,
                          depth_dir=args.depth_dir, corrupted=args.corrupted)
    # empty captions are skipped and listed by write_shards, as check_dataset.py reports them, not fatal
    records = read_annotations(split.annotations, corrupted=split.corrupted, allow_empty_captions=True)
    required = ["video"] + (["audio"] if args.require_audio_file else []) + (["depth"] if args.depth_dir else [])
    out = Path(args.out)
    index = write_shards(records, media_resolver(split), out, args.samples_per_shard, args.max_shard_size,
                         required=required, source=str(Path(args.annotations).resolve()))
    print(summary(index, out))
    return 0


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(main))
