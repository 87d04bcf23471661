#!/usr/bin/env python
"""Check a dataset split against its annotation file before training or evaluating on it.

Reports, per split: records, ids dropped as corrupted, duplicate ids, empty captions, empty subtitles,
missing videos, missing audio (no audio file and no audio track in the video), items whose audio will come
from the video's own track, undecodable videos/audio, missing depth. It prints a summary table and
writes every problem id (``<id><TAB><problem>``) to ``--missing-out``.

    # a dataset config (configs/data/*.yaml), paths relative to --data-dir (the config's ${paths.data_dir})
    python scripts/check_dataset.py --config configs/data/msrvtt_ret.yaml --split test --data-dir data
    # or explicit paths
    python scripts/check_dataset.py --annotations a.json --video-dir videos --audio-dir audios

``--decode open`` (default) opens every file and decodes its first frame / audio packet; ``frames`` decodes
the 8 test frames the loader would read (slower); ``none`` only checks that files exist.
Exit status: 0, or 1 with ``--strict`` when any problem was found.

An "empty caption" (every caption of the record blank) is a problem of the record, not of the file: make_shards.py
skips such records with one warning (index.json ``empty_caption_ids``), as it skips records without media.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

# gram.cli is light: --help answers before torch and PyAV load
from gram.cli import ArgumentParser, UserError, positive_int, run_with_clear_errors

if TYPE_CHECKING:
    from gram.config import DatasetConfig

PROBLEMS = ("empty caption", "duplicate id", "missing video", "missing audio", "undecodable video",
            "undecodable audio", "missing depth")


@dataclass(frozen=True)
class MediaCheck:
    """What to look for: the split's folders and extensions, and how hard to try decoding."""

    video_dir: str | None
    audio_dir: str | None
    depth_dir: str | None
    video_extensions: tuple[str, ...]
    audio_extensions: tuple[str, ...]
    depth_extensions: tuple[str, ...]
    decode: str = "open"


def load_split(config: Path, split: str, data_dir: str) -> DatasetConfig:
    """The ``train``/``test`` entry of a data config with ``${paths.data_dir}`` set to ``data_dir``."""
    from omegaconf import OmegaConf

    from gram.config import DatasetConfig

    if not config.is_file():
        raise UserError(f"--config {config}: no such file")
    root = OmegaConf.create({"paths": {"data_dir": data_dir}, "data": OmegaConf.load(config)})
    if OmegaConf.select(root, f"data.{split}") is None:
        raise UserError(f"{config} has no '{split}' split")
    values = OmegaConf.to_container(root.data[split], resolve=True)
    known = {f.name for f in fields(DatasetConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{config} split '{split}' has unknown keys {unknown}; known: {sorted(known)}")
    return DatasetConfig(**values)


def check_video(path: Path, mode: str) -> str | None:
    """None if the video can be read as the loader would; else the reason."""
    from gram.data.audio import MediaError
    from gram.data.video import decode_frames, sample_frame_indices

    if mode == "none":
        return None
    try:
        if mode == "frames":
            decode_frames(path, lambda total: sample_frame_indices(total, 8, training=False))
        else:
            decode_frames(path, [0])
    except (MediaError, ValueError) as err:
        return str(err)
    return None


def audio_state(path: Path | None, video: Path | None, mode: str) -> str:
    """'file', 'video track', 'missing' or 'undecodable: <reason>' for one item's audio."""
    if path is not None:
        return "file" if mode == "none" else _probe_audio(path) or "file"
    if video is not None and _has_audio_track(video):
        return "video track"
    return "missing"


def _probe_audio(path: Path) -> str | None:
    """None if the first audio packet of ``path`` decodes (and the file holds all its index points to); else
    'undecodable: <reason>'."""
    import av

    from gram.data.audio import TruncatedMediaError, raise_if_truncated

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return f"undecodable: no audio stream in {path}"
            raise_if_truncated(container.streams.audio[0], path)
            for _ in container.decode(container.streams.audio[0]):
                return None
        return f"undecodable: no audio frame in {path}"
    except TruncatedMediaError as err:
        return f"undecodable: {err}"
    except av.FFmpegError as err:
        return f"undecodable: {path}: {err}"


def _has_audio_track(video: Path) -> bool:
    import av

    try:
        with av.open(str(video)) as container:
            return bool(container.streams.audio)
    except av.FFmpegError:
        return False


def check_item(video_id: str, media: MediaCheck) -> list[tuple[str, str]]:
    """(problem, detail) pairs of one id; 'audio from video track' is reported as information."""
    from gram.data.annotations import resolve_media

    found: list[tuple[str, str]] = []
    video = resolve_media(media.video_dir, video_id, media.video_extensions) if media.video_dir else None
    if media.video_dir:
        if video is None:
            found.append(("missing video", f"no {video_id}.{{{','.join(media.video_extensions)}}} in {media.video_dir}"))
        elif (reason := check_video(video, media.decode)) is not None:
            found.append(("undecodable video", reason))
    if media.audio_dir or (media.video_dir and video is not None):
        audio = resolve_media(media.audio_dir, video_id, media.audio_extensions) if media.audio_dir else None
        state = audio_state(audio, video, media.decode)
        if state == "missing" and media.audio_dir:
            found.append(("missing audio", f"no audio file in {media.audio_dir} and no audio track in the video"))
        elif state.startswith("undecodable"):
            found.append(("undecodable audio", state.split(": ", 1)[1]))
        elif state == "video track" and media.audio_dir:
            found.append(("audio from video track", str(video)))
    if media.depth_dir and resolve_media(media.depth_dir, video_id, media.depth_extensions) is None:
        found.append(("missing depth", f"no depth file in {media.depth_dir}"))
    return found


def _check_star(job: tuple[str, MediaCheck]) -> list[tuple[str, str]]:
    return check_item(*job)


def check_split(split: DatasetConfig, decode: str = "open", workers: int = 1) -> dict:
    """Every check of one split: {'counts': Counter, 'problems': [(id, problem, detail)], 'records': n}.

    An id listed more than once is a problem: in a test split it could never rank first (evaluation refuses it)."""
    from gram.data.annotations import read_annotations

    records = read_annotations(split.annotations, corrupted=split.corrupted, allow_empty_captions=True)
    media = MediaCheck(split.video_dir, split.audio_dir, split.depth_dir, tuple(split.video_extensions),
                       tuple(split.audio_extensions), tuple(split.depth_extensions), decode)
    ids = list(dict.fromkeys(r.video_id for r in records))
    jobs = [(video_id, media) for video_id in ids]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_check_star, jobs, chunksize=16))
    else:
        results = [_check_star(job) for job in jobs]
    problems = [(i, problem, detail) for i, found in zip(ids, results) for problem, detail in found]
    problems += [(r.video_id, "empty caption", "no non-empty caption") for r in records if not r.captions]
    repeats = Counter(r.video_id for r in records)
    problems += [(i, "duplicate id", f"{n} records in {split.annotations}") for i, n in repeats.items() if n > 1]
    counts = Counter(problem for _, problem, _ in problems)
    counts["records"], counts["unique ids"] = len(records), len(ids)
    counts["dropped as corrupted"] = records.num_dropped
    counts["empty subtitle"] = sum(r.subtitle == "" for r in records)
    return {"counts": counts, "problems": problems, "records": len(records)}


def summary_table(name: str, result: dict) -> str:
    counts = result["counts"]
    rows = ["records", "unique ids", "dropped as corrupted", *PROBLEMS, "audio from video track", "empty subtitle"]
    width = max(len(r) for r in rows) + 2
    lines = [f"{name}", f"{'check':<{width}}{'count':>8}", "-" * (width + 8)]
    lines += [f"{row:<{width}}{counts.get(row, 0):>8}" for row in rows]
    return "\n".join(lines)


def write_problems(path: Path, problems: list[tuple[str, str, str]]) -> None:
    """One line per problem: ``<id>\\t<problem>\\t<detail>`` (information lines excluded)."""
    lines = [f"{i}\t{problem}\t{detail}" for i, problem, detail in problems if problem in PROBLEMS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 1 (``--strict`` and problems found) or 2 (bad arguments or an unreadable annotation file)."""
    parser = ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=Path, help="a data config (configs/data/<name>.yaml)")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--data-dir", default="data", help="value of ${paths.data_dir} for --config")
    parser.add_argument("--annotations", type=Path, help="annotation file (instead of --config)")
    parser.add_argument("--video-dir", help="video folder (with --annotations)")
    parser.add_argument("--audio-dir", help="audio folder (with --annotations)")
    parser.add_argument("--depth-dir", help="depth folder (with --annotations)")
    parser.add_argument("--corrupted", help="file of ids to drop (with --annotations)")
    parser.add_argument("--decode", choices=("none", "open", "frames"), default="open")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--missing-out", type=Path, default=Path("missing_ids.txt"))
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any problem is found")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.annotations is None):
        parser.error("give exactly one of --config or --annotations")
    from gram.config import DatasetConfig

    if args.config:
        split, name = load_split(args.config, args.split, args.data_dir), f"{args.config} [{args.split}]"
    else:
        split = DatasetConfig(annotations=str(args.annotations), video_dir=args.video_dir, audio_dir=args.audio_dir,
                              depth_dir=args.depth_dir, corrupted=args.corrupted)
        name = str(args.annotations)
    result = check_split(split, args.decode, args.workers)
    print(summary_table(name, result))
    write_problems(args.missing_out, result["problems"])
    bad = sum(result["counts"].get(p, 0) for p in PROBLEMS)
    print(f"{bad} problems; ids written to {args.missing_out}" if bad else "no problems found")
    return 1 if bad and args.strict else 0


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(main))
