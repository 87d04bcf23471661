"""Benchmark: video decoding per clip, long versus short videos, and data-loader throughput.

All numbers come from one run, so the ratios compare like with like on the same (possibly busy) machine.

1. Per clip: 8 frames (test sampling: the lower-middle frame of 8 uniform segments), decoded and turned
   into a (8, 3, 224, 224) CLIP-normalised clip, for every decoder available:
   ``pyav`` (the default: packet index, keyframe seeks, skipping unreferenced frames, frames behind
   different keyframes decoded in parallel on the free cores), ``pyav 1 thread`` (the same on one thread,
   as inside a loader worker), the other ``data.video_backend`` values ``decord`` (package decord2) and
   ``torchcodec`` (needs the system FFmpeg libraries), and ``opencv-seek``, the reference's method
   (``CAP_PROP_POS_FRAMES`` seek per frame), each if installed. All select the same frames and go through the
   same :class:`VideoTransform`, so only decoding differs; a summary gives each decoder over ``pyav 1 thread``.
   Clips: the shared real videos (``../shared/data/media``), videos of the generated sample dataset, and
   generated 6-second and 3-minute videos (640x360, 30 fps, x264 ``superfast``), each once with a keyframe
   every 5 s (like the shared ``video2.mp4``, 160 frames) and once every 1 s (what
   ``scripts/prepare_dataset.py --reencode`` writes).
2. Loader throughput: clips/s of a plain ``torch.utils.data.Dataset`` over the shared videos
   (``load_video_frames``, training sampling, ``crop_flip``) with 0, 1 and 2 workers for pyav and 2 workers for
   each other installed backend, batch 4, measured over
   the second pass of persistent workers, with the CPU cores kept busy (process + workers CPU time / wall).

    python bench/data.py                       # everything (generating the long videos takes ~30-60 s)
    python bench/data.py --quick               # 2 repeats, 6-s/3-min videos with the 5-s GOP only
    python bench/data.py --cache-dir /tmp/gb   # keep the generated videos between runs
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from gram.cli import UserError
from gram.data.video import VideoTransform, decode_frames, load_video_frames, sample_frame_indices
from gram.data.video_backends import VIDEO_BACKENDS, read_frames, require_backend

SHARED_MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "media"


def available_backends() -> dict[str, Callable[[Path, Callable], torch.Tensor]]:
    """Name -> decode function (path, index function) -> (n, H, W, 3) uint8, for the installed decoders.

    The optional backends run without the PyAV fallback that ``decode_frames`` gives decord, so a file a backend
    cannot decode shows as nan here instead of PyAV's time.
    """
    backends = {
        "pyav": lambda p, f: decode_frames(p, f),
        "pyav 1 thread": lambda p, f: decode_frames(p, f, threads=1),
    }
    for name, backend in (("decord", "decord"), ("torchcodec", "torchcodec"), ("opencv-seek", "opencv")):
        try:
            require_backend(backend)
        except UserError as error:
            print(f"note: {name} skipped: {error}")
            continue
        backends[name] = lambda p, f, b=backend: torch.from_numpy(read_frames(b, Path(p), f))
    return backends


def write_test_video(path: Path, seconds: float, gop_seconds: float, fps: int = 30, size=(640, 360)) -> Path:
    """A panning textured video, H.264 (x264 superfast keeps B-frames and CABAC, like real encodes)."""
    if path.is_file():
        return path
    w, h = size
    rng = np.random.default_rng(0)
    texture = np.repeat(np.repeat(rng.integers(0, 256, (h // 8, w // 4, 3), dtype=np.uint8), 8, 0), 8, 1)
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "superfast", "crf": "26", "g": str(round(gop_seconds * fps))}
        for i in range(round(seconds * fps)):
            offset = (3 * i) % w  # 3 px per frame: motion the encoder can predict
            frame = np.ascontiguousarray(texture[:, offset : offset + w])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def video_facts(path: Path) -> str:
    """'<frames> fr, <seconds> s, GOP <frames>' from the packet index."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        keys = sum(p.is_keyframe for p in packets)
        seconds = float(stream.duration * stream.time_base) if stream.duration else float("nan")
    return f"{len(packets)} fr, {seconds:.1f} s, GOP {len(packets) / max(keys, 1):.0f}"


def time_clips(backends: dict, path: Path, transform: VideoTransform, repeats: int) -> dict[str, tuple[float, float]]:
    """Per backend: (median wall ms, median CPU ms) to sample, decode and transform 8 test frames of ``path``.

    CPU time is the process's (all threads'), the work a loader worker pays; unlike wall time it hardly
    moves when other programs load the machine. The backends take turns within each repeat. A backend
    that fails on the file gets NaN (and the error is printed once).
    """
    def one(decode) -> None:
        frames = decode(path, lambda total: sample_frame_indices(total, 8, training=False))
        transform(frames.permute(0, 3, 1, 2))  # (8, H, W, 3) -> (8, 3, H, W) -> (8, 3, 224, 224)

    times: dict[str, list[tuple[float, float]]] = {}
    for name, decode in backends.items():
        try:
            one(decode)  # warm-up: first open of the file and of the codec
            times[name] = []
        except Exception as err:  # a third-party decoder failing is a result, not a crash
            print(f"note: {name} failed on {path.name}: {str(err).splitlines()[0][:120]}")
    for _ in range(repeats):
        for name in times:
            wall, cpu = time.perf_counter(), time.process_time()
            one(backends[name])
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    nan = (float("nan"), float("nan"))
    return {name: tuple(1000 * statistics.median(t[i] for t in times[name]) for i in (0, 1)) if name in times
            else nan for name in backends}


def per_clip_table(clips: dict[str, Path], backends: dict, repeats: int) -> dict[str, dict[str, tuple]]:
    transform = VideoTransform(224, mode="none")
    names = list(backends)
    print(f"\n## Per-clip time, 8 frames -> (8, 3, 224, 224): median wall ms / CPU ms of {repeats} runs\n")
    has_cv = "opencv-seek" in names
    header = "| clip | video | " + " | ".join(names) + " |" + (" opencv-seek / pyav (wall, CPU) |" if has_cv else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = {}
    for label, path in clips.items():
        row = time_clips(backends, path, transform, repeats)
        results[label] = row
        cells = " | ".join(f"{row[n][0]:.0f} / {row[n][1]:.0f}" for n in names)
        ratio = (f" {row['opencv-seek'][0] / row['pyav'][0]:.1f}x, {row['opencv-seek'][1] / row['pyav'][1]:.1f}x |"
                 if has_cv else "")
        print(f"| {label} | {video_facts(path)} | {cells} |{ratio}", flush=True)
    return results


class ClipDataset(Dataset):
    """Shared clips, repeated: (8, 3, 224, 224) training clips, one seeded generator per item."""

    def __init__(self, paths: list[Path], length: int, backend: str = "pyav"):
        self.paths, self.length, self.backend = paths, length, backend
        self.transform = VideoTransform(224, mode="crop_flip", training=True)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        path = self.paths[index % len(self.paths)]
        return load_video_frames(path, 8, True, self.transform, generator, backend=self.backend)


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of ``process`` and its live children (the loader's workers)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def loader_throughput(paths: list[Path], workers: int, length: int, backend: str = "pyav") -> tuple[float, float]:
    """(clips/s, busy cores) over the second pass of a DataLoader with ``workers`` persistent workers."""
    loader = DataLoader(ClipDataset(paths, length, backend), batch_size=4, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # first pass: starts the workers
        pass
    me = psutil.Process()
    cpu0, start = cpu_seconds(me), time.perf_counter()
    count = sum(batch.shape[0] for batch in loader)
    wall = time.perf_counter() - start
    busy = (cpu_seconds(me) - cpu0) / wall
    del loader
    return count / wall, busy


def sample_clips(root: Path, count: int) -> dict[str, Path]:
    """A few videos of the generated sample dataset (generated into ``root`` when missing)."""
    try:
        from gram.data.sample import generate_sample_dataset
    except ImportError:
        print("note: gram.data.sample not available, sample-dataset rows skipped")
        return {}
    info = generate_sample_dataset(root, num_train=count, num_test=1)
    videos = sorted(Path(info["videos"]).glob("*.mp4"))[:count]
    return {f"sample/{p.stem}": p for p in videos}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, fewer generated videos, smaller loader run")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep generated videos here (default: a temp dir)")
    parser.add_argument("--loader-clips", type=int, default=128, help="clips per loader pass (steady state)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)  # as in a loader worker; decoding threads are set per backend
    print(f"# bench/data.py  {time.strftime('%Y-%m-%d')}  {platform.machine()}, {psutil.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, av {av.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.cache_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shared = {p.name: p for p in sorted(SHARED_MEDIA.glob("video*.mp4"))}
        if not shared:
            print(f"note: no shared media in {SHARED_MEDIA}; shared-clip rows skipped")
        start = time.perf_counter()
        generated = {"6 s, GOP 5 s": write_test_video(work / "short_gop5s.mp4", 6, 5.0),
                     "3 min, GOP 5 s": write_test_video(work / "long_gop5s.mp4", 180, 5.0)}
        if not args.quick:
            generated["6 s, GOP 1 s"] = write_test_video(work / "short_gop1s.mp4", 6, 1.0)
            generated["3 min, GOP 1 s"] = write_test_video(work / "long_gop1s.mp4", 180, 1.0)
        samples = sample_clips(work / "sample", 4)
        print(f"(test videos ready in {time.perf_counter() - start:.0f} s)")

        decoders = available_backends()
        results = per_clip_table({**shared, **samples, **generated}, decoders, repeats)
        report_targets(results, shared)
        report_backends(results)

        print("\n## Loader throughput, shared clips, 8 frames crop_flip 224, batch 4 (second pass)\n")
        print("CPU ms per clip = busy cores / clips per second: the work per clip whatever else runs on the machine.\n")
        print("| backend | workers | clips/s | busy cores | CPU ms per clip |\n|---|---|---|---|---|")
        clips = args.loader_clips // 2 if args.quick else args.loader_clips
        paths = list(shared.values()) or list(generated.values())[:1]
        for backend in [b for b in VIDEO_BACKENDS if b == "pyav" or b in decoders]:
            for workers in (0, 1, 2) if backend == "pyav" else (2,):
                rate, busy = loader_throughput(paths, workers, clips, backend)
                print(f"| {backend} | {workers} | {rate:.1f} | {busy:.2f} | {1000 * busy / rate:.0f} |", flush=True)


def report_targets(results: dict[str, dict[str, tuple]], shared: dict[str, Path]) -> None:
    """The issue's targets, computed from this run's numbers (wall time and CPU time)."""
    print("\n## Targets (this run; wall, CPU)\n")

    def ratio(a: tuple, b: tuple) -> str:
        return f"{a[0] / b[0]:.2f}x, {a[1] / b[1]:.2f}x"

    for gop in ("5 s", "1 s"):
        long, short = results.get(f"3 min, GOP {gop}"), results.get(f"6 s, GOP {gop}")
        if long and short:
            print(f"- 3-minute / 6-second video, GOP {gop}, pyav: {ratio(long['pyav'], short['pyav'])} (target <= 3x)")
            if "opencv-seek" in long:
                print(f"- opencv-seek / pyav on the 3-minute video, GOP {gop}: "
                      f"{ratio(long['opencv-seek'], long['pyav'])} (target >= 3x)")
    if shared and all("opencv-seek" in results[name] for name in shared):
        for i, kind in ((0, "wall"), (1, "CPU")):
            ratios = [results[name]["opencv-seek"][i] / results[name]["pyav"][i] for name in shared]
            print(f"- opencv-seek / pyav on the shared clips ({kind}): {', '.join(f'{r:.1f}x' for r in ratios)} "
                  f"(geometric mean {float(np.exp(np.mean(np.log(ratios)))):.1f}x; target >= 3x)")


def report_backends(results: dict[str, dict[str, tuple]]) -> None:
    """Each optional decoder against PyAV on one thread (what a loader worker runs): geometric mean over the clips
    both decode, wall and CPU time. Above 1x means slower than PyAV."""
    print("\n## Decoders vs pyav 1 thread (geometric mean over the clips both decode; > 1x = slower)\n")
    for name in ("decord", "torchcodec", "opencv-seek"):
        rows = [row for row in results.values() if name in row and np.isfinite(row[name][0])]
        if not rows:
            continue
        means = [float(np.exp(np.mean([np.log(row[name][i] / row["pyav 1 thread"][i]) for row in rows])))
                 for i in (0, 1)]
        print(f"- {name} / pyav 1 thread: {means[0]:.2f}x wall, {means[1]:.2f}x CPU over {len(rows)} clips")


if __name__ == "__main__":
    sys.exit(main())
