#!/usr/bin/env python
"""Prepare a folder of downloaded videos for GRAM: audio tracks, optional fast re-encode, a manifest.

For every video ``<videos>/<id>.<ext>`` (or, with ``--annotations``, every id of that file):

* ``<out>/audios/<id>.mp3`` (or ``.wav``): the first audio track, downmixed to mono and resampled to
  16 kHz, the rate BEATs is trained at. Videos without an audio track get no file (the manifest says so;
  the loader then gives them a silent input and counts them);
* with ``--reencode``: ``<out>/videos/<id>.mp4``, H.264 with a keyframe every ``--gop-seconds`` (default
  1 s) and optionally a lower ``--fps`` / ``--short-side``. Sampling 8 frames then costs about the same for
  a 3-minute video as for a 6-second one (see ``bench/data.py``). Without it, point the dataset config's
  ``video_dir`` at the original folder;
* clips named after a segment of a longer video (VATEX ``<YouTube id>_000179_000189``, YouCook2
  ``<id>_47_60``, AudioCaps ``<id>_100.000_110.000``, in seconds) whose own file is absent are cut out of
  ``<videos>/<YouTube id>.<ext>`` when that exists: ``<out>/videos/<clip id>.mp4`` (re-encoded, so the cut
  is frame-exact) and its audio (needs ``--annotations``, which lists the clip ids);
* ``<out>/manifest.json``: one entry per id (source, segment, written files, frames, fps, size, duration,
  whether there is audio, and the error if the file could not be read), plus the ids with no video.

Existing outputs are kept (the script can be re-run after an interruption) unless ``--overwrite``.
Exit status 1 when any video could not be read (they are listed in the summary and the manifest).

    python scripts/prepare_dataset.py --videos downloads/msrvtt --out data/msrvtt \\
        --annotations data/msrvtt/annotations/descs_ret_test.json --reencode --short-side 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from gram.cli import ArgumentParser, UserError, positive_int, run_with_clear_errors
from gram.data.annotations import read_annotations, resolve_media, segment_of
from gram.data.errors import MediaDecodeError, MediaError, raise_if_truncated

AUDIO_RATE = 16000
AUDIO_CODECS = {"mp3": "libmp3lame", "wav": "pcm_s16le"}
VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov", "m4v")


@dataclass(frozen=True)
class Options:
    out: Path
    audio_format: str = "mp3"
    reencode: bool = False
    fps: float | None = None
    short_side: int | None = None
    gop_seconds: float = 1.0
    overwrite: bool = False


def probe(path: Path) -> dict:
    """Frames, fps, size, duration and audio presence from the container (no decoding)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            raise_if_truncated(stream, path)  # a cut-short download would otherwise pass as a shorter video
            duration = float(container.duration / av.time_base) if container.duration else None
            return {
                "frames": stream.frames or None,
                "fps": float(stream.average_rate) if stream.average_rate else None,
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "duration": duration,
                "has_audio": bool(container.streams.audio),
            }
    except av.FFmpegError as err:
        raise MediaDecodeError(f"cannot open {path}: {err}") from err


def extract_audio(
    src: Path, dst: Path, sample_rate: int = AUDIO_RATE, segment: tuple[float, float] | None = None
) -> float:
    """Write the first audio track of ``src`` to ``dst`` (format from its suffix), mono at ``sample_rate``.

    ``segment`` (start, end) in seconds keeps only that part (cut at sample precision after resampling).
    Returns the duration written in seconds. The file appears only when complete (written beside, renamed).
    """
    codec = AUDIO_CODECS[dst.suffix.lstrip(".")]
    tmp = dst.with_name(dst.name + ".partial")
    samples = 0
    try:
        with av.open(str(src)) as source, av.open(str(tmp), "w", format=dst.suffix.lstrip(".")) as sink:
            if not source.streams.audio:
                raise MediaDecodeError(f"no audio stream in {src}")
            out = sink.add_stream(codec, rate=sample_rate, layout="mono")
            resampler = av.AudioResampler(format=out.codec_context.format, layout="mono", rate=sample_rate)
            if segment is not None and segment[0] > 1:
                source.seek(int((segment[0] - 1) * av.time_base))  # audio frames are all keyframes
            keep = _SampleWindow(sample_rate, segment)
            # None flushes the resampler; a segment stops the decoding once it is complete.
            for frame in itertools.chain(source.decode(source.streams.audio[0]), [None]):
                keep.anchor(frame)
                for chunk in resampler.resample(frame):
                    chunk = keep.cut(chunk)
                    if chunk is None:
                        continue
                    chunk.pts = None  # let the encoder number the re-chunked samples
                    samples += chunk.samples
                    sink.mux(out.encode(chunk))
                if keep.complete:
                    break
            sink.mux(out.encode())
    except av.FFmpegError as err:
        tmp.unlink(missing_ok=True)
        raise MediaDecodeError(f"cannot extract audio from {src}: {err}") from err
    except MediaError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    return samples / sample_rate


class _SampleWindow:
    """Keeps the resampled samples of a segment: sample k of the output lies at t0 + k / rate, t0 the time
    of the first decoded frame."""

    def __init__(self, rate: int, segment: tuple[float, float] | None):
        self.rate, self.segment = rate, segment
        self.position = 0  # output samples seen so far
        self.window: tuple[int, int] | None = None

    def anchor(self, frame: av.AudioFrame | None) -> None:
        if self.segment is None or self.window is not None or frame is None:
            return
        start_time = frame.time or 0.0
        start, end = ((t - start_time) * self.rate for t in self.segment)
        self.window = (max(0, round(start)), max(0, round(end)))

    @property
    def complete(self) -> bool:
        """True once every sample of the segment has been seen (never without a segment)."""
        return self.window is not None and self.position >= self.window[1]

    def cut(self, chunk: av.AudioFrame) -> av.AudioFrame | None:
        """The part of ``chunk`` inside the window (the whole chunk without a segment), or None."""
        first, self.position = self.position, self.position + chunk.samples
        if self.segment is None:
            return chunk
        lo, hi = self.window or (0, 0)
        lo, hi = max(lo - first, 0), min(hi - first, chunk.samples)
        if lo >= hi:
            return None
        if (lo, hi) == (0, chunk.samples):
            return chunk
        array = chunk.to_ndarray()  # (1, samples): the output is mono
        part = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(array[:, lo:hi]), format=chunk.format.name, layout=chunk.layout.name
        )
        part.sample_rate = chunk.sample_rate
        return part


def prepare_one(video_id: str, src: Path, opts: Options, segment: tuple[float, float] | None = None) -> dict:
    """Audio extraction and optional re-encode (always, for a segment) of one video; errors are recorded."""
    entry: dict = {"video_id": video_id, "source": str(src), "video": str(src), "audio": None, "error": None,
                   "segment": list(segment) if segment else None}
    try:
        entry.update(probe(src))
        if entry["has_audio"]:
            audio = opts.out / "audios" / f"{video_id}.{opts.audio_format}"
            if opts.overwrite or not audio.is_file():
                extract_audio(src, audio, segment=segment)
            entry["audio"] = str(audio)
        if opts.reencode or segment:
            entry.update(_reencode(video_id, src, opts, segment))
    except MediaError as err:
        entry["error"] = str(err)
    return entry


def _reencode(video_id: str, src: Path, opts: Options, segment: tuple[float, float] | None = None) -> dict:
    dst = opts.out / "videos" / f"{video_id}.mp4"
    if dst.is_file() and not opts.overwrite:
        info = probe(dst)
        return {"video": str(dst), "frames": info["frames"], "fps": info["fps"],
                "width": info["width"], "height": info["height"], "duration": info["duration"]}
    from gram.data.video import reencode_video  # torch: imported once there is work to do

    tmp = dst.with_name(dst.stem + ".partial.mp4")
    start, end = segment if segment else (None, None)
    info = reencode_video(src, tmp, fps=opts.fps, short_side=opts.short_side, gop_seconds=opts.gop_seconds,
                          start=start, end=end)
    tmp.replace(dst)
    return {"video": str(dst), **info, "duration": probe(dst)["duration"]}


Source = tuple[Path, tuple[float, float] | None]  # a video file and the segment of it to cut, if any


def find_videos(videos: Path, annotations: Path | None, extensions: list[str]) -> tuple[dict[str, Source], list[str]]:
    """{id: (video file, segment)} and the annotated ids without a video (always [] without ``annotations``).

    An annotated clip id with no file of its own falls back to the full video its name points to.
    """
    if annotations is None:
        found = {p.stem: (p, None) for p in sorted(videos.iterdir())
                 if p.is_file() and p.suffix.lstrip(".").lower() in extensions}
        return found, []
    ids = list(dict.fromkeys(r.video_id for r in read_annotations(annotations, allow_empty_captions=True)))
    found, missing = {}, []
    for video_id in ids:
        path, segment = resolve_media(videos, video_id, extensions), None
        if path is None and (parsed := segment_of(video_id)) is not None:
            path, segment = resolve_media(videos, parsed[0], extensions), parsed[1:]
        if path is None:
            missing.append(video_id)
        else:
            found[video_id] = (path, segment)
    return found, missing


def _prepare_star(job: tuple[str, Path, Options, tuple[float, float] | None]) -> dict:
    return prepare_one(*job)


def run(videos: Path, opts: Options, annotations: Path | None, extensions: list[str], workers: int) -> dict:
    """Prepare every video; returns (and writes to ``<out>/manifest.json``) the manifest."""
    if not videos.is_dir():
        raise UserError(f"--videos {videos} is not a folder")
    found, missing = find_videos(videos, annotations, extensions)
    for folder in ("audios", "videos") if opts.reencode else ("audios",):
        (opts.out / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(video_id, path, opts, segment) for video_id, (path, segment) in found.items()]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            entries = list(pool.map(_prepare_star, jobs, chunksize=8))
    else:
        entries = [_prepare_star(job) for job in jobs]
    manifest = {
        "source": str(videos), "annotations": str(annotations) if annotations else None,
        "audio_sample_rate": AUDIO_RATE, "audio_format": opts.audio_format, "reencoded": opts.reencode,
        "fps": opts.fps, "short_side": opts.short_side, "gop_seconds": opts.gop_seconds,
        "entries": entries, "missing_video_ids": missing,
    }
    (opts.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def summary(manifest: dict) -> str:
    entries = manifest["entries"]
    failed = [e for e in entries if e["error"]]
    rows = [
        ("videos processed", len(entries)),
        ("clips cut from longer videos", sum(bool(e.get("segment")) for e in entries)),
        ("audio tracks written", sum(e["audio"] is not None for e in entries)),
        ("videos without audio track", sum(e["error"] is None and not e.get("has_audio") for e in entries)),
        ("unreadable videos", len(failed)),
        ("annotated ids without a video", len(manifest["missing_video_ids"])),
    ]
    lines = [f"{name:<32}{value:>8}" for name, value in rows]
    lines += [f"  unreadable: {e['video_id']}: {e['error']}" for e in failed[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--videos", type=Path, required=True, help="folder of downloaded videos <id>.<ext>")
    parser.add_argument("--out", type=Path, required=True, help="output folder (audios/, videos/, manifest.json)")
    parser.add_argument("--annotations", type=Path, help="only the ids of this annotation file (reports missing ones)")
    parser.add_argument("--extensions", nargs="+", default=list(VIDEO_EXTENSIONS), help="video file extensions")
    parser.add_argument("--audio-format", choices=sorted(AUDIO_CODECS), default="mp3")
    parser.add_argument("--reencode", action="store_true", help="write fast-seeking H.264 copies to <out>/videos")
    parser.add_argument("--fps", type=float, help="with --reencode: lower the frame rate to this")
    parser.add_argument("--short-side", type=int, help="with --reencode: lower the short side to this (pixels)")
    parser.add_argument("--gop-seconds", type=float, default=1.0, help="with --reencode: keyframe interval")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="redo files that already exist")
    args = parser.parse_args(argv)
    if (args.fps or args.short_side) and not args.reencode:
        parser.error("--fps and --short-side need --reencode")
    opts = Options(args.out, args.audio_format, args.reencode, args.fps, args.short_side, args.gop_seconds,
                   args.overwrite)
    extensions = [e.lstrip(".").lower() for e in args.extensions]
    manifest = run(args.videos, opts, args.annotations, extensions, args.workers)
    print(summary(manifest))
    print(f"manifest: {args.out / 'manifest.json'}")
    return 1 if any(e["error"] for e in manifest["entries"]) else 0


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(main))
