"""Video frames: segment sampling, decoding, and the EVA-CLIP clip transform.

Decoding sits behind one function, :func:`decode_frames`. The default backend is PyAV (chosen by
``bench/data.py``): it decodes only what the requested frames need.

* Frames are addressed by presentation order through their timestamps, so the frame count is exact
  without trusting container metadata. For MP4/MOV the timestamps come from the sample table (no packet
  is read); they are checked against every decoded frame, and any mismatch (variable frame rate) falls
  back to scanning the packets once. Files without timestamps are decoded in order.
* When the next requested frame lies past a keyframe that has not been reached yet, the decoder seeks to
  that keyframe instead of decoding everything in between, so a 3-minute video costs about what its
  sampled groups of pictures cost, not its length.
* For H.264 and MPEG-1/2/4, frames that no other frame references (most B-frames) are skipped unless
  they are requested, which changes no decoded pixel and saves 30-60 % of the work.
* Once the last requested frame behind a keyframe has its packet in, the decoder is drained rather than
  fed the packets after it only to push that frame out of its reorder buffer (7-10 % less work).
* Frames come out upright when the stream carries a display rotation (phone videos).
* Targets behind different keyframes are independent, so with ``threads`` > 1 they are split over
  threads, each with its own demuxer and decoder (FFmpeg releases the GIL while decoding). By default
  this uses the free cores in the main process and one thread inside a ``DataLoader`` worker, whose
  siblings already fill the cores. (FFmpeg's own frame threads do not help here: each seek flushes
  them.)

The result equals a full sequential decode bit for bit (tested across codecs and containers).

``decord`` (package ``decord2``), ``torchcodec`` and ``opencv`` (seek per frame with ``CAP_PROP_POS_FRAMES``, the
reference's method, kept as the benchmark baseline) are optional backends behind the same frame selection
(:mod:`gram.data.video_backends`); ``data.video_backend`` picks one.
"""

from __future__ import annotations

import itertools
import logging
import os
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from os import PathLike
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from gram.data.audio import MediaDecodeError, MediaNotFoundError, TruncatedMediaError, raise_if_truncated
from gram.data.preprocessing import DEFAULT_PRESET, get_preset
from gram.data.video_backends import VIDEO_BACKENDS, read_frames

log = logging.getLogger(__name__)

PathType = str | PathLike
# Frame positions, or a function of the frame count that returns them (lets one open serve both).
IndexSpec = Sequence[int] | Callable[[int], Sequence[int]]

# Codecs whose "non-reference" frames are never used to predict any other frame, so skipping them cannot
# change a decoded frame (H.264: nal_ref_idc == 0; MPEG-1/2/4 part 2: B-frames). Not HEVC (a sub-layer
# non-reference picture may still feed a higher temporal sub-layer) nor VP9/AV1: they decode every frame.
SKIP_SAFE_CODECS = frozenset({"h264", "mpeg4", "mpeg2video", "mpeg1video"})
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = (*VIDEO_BACKENDS, "opencv")


def sample_frame_indices(
    num_total: int, num_frames: int, training: bool, generator: torch.Generator | None = None
) -> list[int]:
    """Pick ``num_frames`` frame positions out of ``num_total``, one per uniform segment, in temporal order.

    The segments are ``np.array_split(range(num_total), num_frames)`` (the first ``num_total % num_frames``
    are one frame longer). Training draws a random frame in each segment from ``generator``; test takes the
    lower-middle frame ``segment[(len + 1) // 2 - 1]`` as the reference does. A video with fewer frames than
    asked repeats frames, in order (e.g. 3 frames, 8 asked: ``[0, 0, 0, 1, 1, 1, 2, 2]``).
    """
    if num_total <= 0 or num_frames <= 0:
        raise ValueError(
            f"need a positive frame count and number of frames, got {num_total} and {num_frames}"
        )
    if num_total < num_frames:
        return [j * num_total // num_frames for j in range(num_frames)]
    base, extra = divmod(num_total, num_frames)
    lengths = [base + 1 if j < extra else base for j in range(num_frames)]
    starts = np.cumsum([0, *lengths[:-1]]).tolist()
    if training:
        offsets = [int(torch.randint(n, (1,), generator=generator)) for n in lengths]
    else:
        offsets = [(n + 1) // 2 - 1 for n in lengths]
    return [s + o for s, o in zip(starts, offsets)]


def decode_frames(
    path: PathType, indices: IndexSpec, backend: str = "pyav", threads: int | None = None, bt601: bool = False
) -> torch.Tensor:
    """Decode the frames at ``indices`` (presentation order, 0-based) of the video at ``path``.

    ``indices`` may repeat and come in any order; it may also be a function from the frame count to the
    positions, so the file is opened once. A ``.npy`` file is read as precomputed frames
    ((n, H, W, 3) or (n, H, W) uint8, e.g. depth maps) whatever the backend. ``threads`` > 1 lets PyAV
    decode frames behind different keyframes in parallel; None picks :func:`default_decode_threads`.
    ``bt601`` converts YUV to RGB with the BT.601 matrix whatever the stream's colour tag, and the range its pixel
    format implies (limited unless ``yuvj*``), as OpenCV 4.x does (the ``reference`` preset); otherwise the
    stream's tagged matrix and range are used. It applies to the PyAV backend; OpenCV 4.x always does BT.601.

    Returns a uint8 tensor (len(indices), H, W, 3), RGB. Raises :class:`MediaNotFoundError` for a missing
    file and :class:`MediaDecodeError` (naming the file) when it has no video or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"video file not found: {path}")
    if path.suffix.lower() == ".npy":
        return _read_frame_array(path, indices)
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "pyav":
        return torch.from_numpy(
            _decode_pyav(path, indices, default_decode_threads() if threads is None else threads, bt601)
        )
    return torch.from_numpy(read_frames(
        backend, path, lambda total: _resolve_indices(indices, total, path),
        fallback=lambda: _decode_pyav(path, indices, 1, bt601),
    ))


def load_video_frames(
    path: PathType,
    num_frames: int,
    training: bool,
    transform: VideoTransform | None,
    generator: torch.Generator | None = None,
    backend: str = "pyav",
    threads: int | None = None,
    bt601: bool | None = None,
) -> torch.Tensor:
    """Sample, decode and transform ``num_frames`` frames of a video.

    Returns (num_frames, 3, s, s) float32 normalised by ``transform``, or the raw (num_frames, 3, H, W)
    uint8 frames when ``transform`` is None. The same ``generator`` drives frame jitter and the crop.
    The colour matrix is the transform's preset's (see :func:`decode_frames`) unless ``bt601`` says.
    """
    if bt601 is None:
        bt601 = transform is not None and transform.preset.bt601
    frames = decode_frames(  # (n, H, W, 3) uint8
        path, lambda total: sample_frame_indices(total, num_frames, training, generator), backend, threads, bt601
    )
    clip = frames.permute(0, 3, 1, 2)  # (n, H, W, 3) -> (n, 3, H, W)
    return clip if transform is None else transform(clip, generator)


class VideoTransform:
    """EVA-CLIP clip transform on uint8 (n, 3, H, W) frames, giving float32 (n, 3, s, s), normalised.

    ``mode="none"`` squashes every frame to (s, s). ``mode="crop_flip"`` trains with a square
    random-resized crop (area 80-100 %) and a random horizontal flip, and tests with a resize of the short
    side to s and a centre crop. One crop and one flip are drawn per clip and applied to all its frames.
    Random draws come from the ``generator`` passed to the call (or the global torch RNG when None).

    ``preprocessing`` (a preset of :mod:`gram.data.preprocessing`): ``"reference"`` divides by 255 first and
    resizes the float frames bilinearly without antialiasing, as the reference's torchvision 0.15 did
    (``Resize((s, s))``, ``Resize(s)`` + ``CenterCrop(s)``, ``RandomResizedCrop``); ``"accurate"`` resizes
    the uint8 frames with antialiasing, then divides.
    """

    def __init__(
        self,
        image_size: int,
        mode: str = "none",
        training: bool = False,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        preprocessing: str = DEFAULT_PRESET,
        scale: tuple[float, float] = (0.8, 1.0),
    ):
        if mode not in ("none", "crop_flip"):
            raise ValueError(f"unknown video transform mode {mode!r}; expected 'none' or 'crop_flip'")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size, self.mode, self.training = image_size, mode, training
        self.preset = get_preset(preprocessing, "preprocessing")
        self.mean, self.std, self.scale = list(mean), list(std), scale
        self.antialias = not self.preset.float_resize

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 3, H, W) uint8 -> (n, 3, s, s) float32 normalised."""
        if clip.ndim != 4 or clip.shape[1] != 3 or clip.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 clip of shape (n, 3, H, W), got {clip.dtype} {tuple(clip.shape)}"
            )
        if self.preset.float_resize:  # the reference: [0, 1] floats first, then resized
            scaled = self._geometry(clip.to(torch.float32) / 255, generator)
        else:
            scaled = TF.to_dtype(self._geometry(clip, generator), torch.float32, scale=True)  # [0, 255] -> [0, 1]
        return TF.normalize(scaled, self.mean, self.std)

    def _geometry(self, clip: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        s = self.image_size
        if self.mode == "none":
            return TF.resize(clip, [s, s], antialias=self.antialias)
        if not self.training:
            short = TF.resize(clip, [s], antialias=self.antialias)  # short side -> s
            return TF.center_crop(short, [s, s])
        top, left, h, w = square_crop_params(clip.shape[-2], clip.shape[-1], self.scale, generator)
        cropped = TF.resized_crop(clip, top, left, h, w, [s, s], antialias=self.antialias)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        return TF.horizontal_flip(cropped) if flip else cropped


def square_crop_params(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a square crop covering ``scale`` of the frame area, as RandomResizedCrop(ratio=1).

    torchvision's ``RandomResizedCrop.get_params`` draws from the global RNG only; this is its algorithm
    (10 tries, then the largest centred square) with an explicit generator so a clip is reproducible.
    """
    area = height * width
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=generator))
        side = round(target**0.5)
        if 0 < side <= min(height, width):
            top = int(torch.randint(height - side + 1, (1,), generator=generator))
            left = int(torch.randint(width - side + 1, (1,), generator=generator))
            return top, left, side, side
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _resolve_indices(indices: IndexSpec, total: int, path: Path) -> list[int]:
    if total <= 0:
        raise MediaDecodeError(f"no video frames in {path}")
    wanted = list(indices(total) if callable(indices) else indices)
    bad = [i for i in wanted if not 0 <= i < total]
    if bad or not wanted:
        raise ValueError(f"frame positions {bad or wanted} out of range for {path} ({total} frames)")
    return wanted


def _read_frame_array(path: Path, indices: IndexSpec) -> torch.Tensor:
    """Precomputed frames from a .npy file: (n, H, W, 3) or (n, H, W) -> (len(indices), H, W, 3) uint8."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise MediaDecodeError(f"cannot read frame array {path}: {err}") from err
    if array.ndim == 3:
        array = array[..., None].repeat(3, axis=-1)  # (n, H, W) -> (n, H, W, 3) grey
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise MediaDecodeError(f"{path}: expected uint8 frames (n, H, W, 3), got {array.dtype} {array.shape}")
    wanted = _resolve_indices(indices, array.shape[0], path)
    return torch.from_numpy(np.ascontiguousarray(array[wanted]))


@dataclass
class _PacketIndex:
    """Presentation timestamps of every shown frame (sorted) and the keyframes' pts and dts.

    ``derived`` marks an index built from the container's sample table rather than from the packets: its
    frame timestamps are inferred, so decoding checks them and falls back to the exact index on a mismatch.
    ``bytes_through[i]`` counts the stream's bytes in decoding order up to the frame shown at ``pts[i]``
    (for a derived index, up to the i-th frame decoded: close enough to weigh work).
    """

    pts: list[int]
    key_pts: list[int]
    key_dts: list[int]
    start: int  # the smallest timestamp of the stream: a seek there decodes from the very beginning
    bytes_through: list[int]
    derived: bool = False

    def keyframe_before(self, pts: int) -> tuple[int, int]:
        """(pts, dts) of the latest keyframe at or before ``pts`` (the first one when none is)."""
        k = max(bisect_right(self.key_pts, pts) - 1, 0)
        return self.key_pts[k], self.key_dts[k]

    def decoding_cost(self, key: int, last: int) -> int:
        """What decoding from the keyframe at ``key`` to the frame at ``last`` roughly costs: their compressed
        bytes, which weigh a keyframe and a busy scene as the decoder feels them."""
        first, end = bisect_left(self.pts, key), bisect_left(self.pts, last)
        return self.bytes_through[end] - (self.bytes_through[first - 1] if first else 0)


class _IndexMismatch(Exception):
    """A derived index does not match the decoded timestamps; the exact packet index is needed."""


def _decode_pyav(path: Path, indices: IndexSpec, threads: int = 1, bt601: bool = False) -> np.ndarray:
    """PyAV backend: (len(indices), H, W, 3) uint8 (see the module docstring for the strategy)."""
    for exact in (False, True):
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise MediaDecodeError(f"no video stream in {path}")
                stream = container.streams.video[0]
                if exact:
                    index = _packet_index(container, stream)
                else:
                    entries = list(stream.index_entries)  # listed once: each pass builds an object per packet
                    raise_if_truncated(stream, path, entries)
                    index = _container_index(container, stream, entries)
                if index is None and exact:  # no usable timestamps: count by decoding, in order
                    return _decode_sequential(path, indices, bt601)
                if index is None:
                    continue
                wanted = _resolve_indices(indices, len(index.pts), path)
                order = [index.pts[i] for i in wanted]
                runs = _split_by_keyframe(index, sorted(set(order)), threads)
                return _gather(path, _read_runs(path, container, stream, index, runs, threads, bt601), order)
        except _IndexMismatch:
            continue
        except av.FFmpegError as err:
            raise MediaDecodeError(f"cannot decode video {path}: {err}") from err
    raise AssertionError("unreachable: the exact index never raises _IndexMismatch")


def default_decode_threads() -> int:
    """Decoding threads per video: 1 inside a DataLoader worker, else the usable cores (at most 8)."""
    if torch.utils.data.get_worker_info() is not None:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _split_by_keyframe(index: _PacketIndex, targets: list[int], threads: int) -> list[list[int]]:
    """Sorted target pts -> at most ``threads`` sorted runs of targets, never splitting a keyframe's group.

    Each run is decoded by its own reader, so no two readers decode the same group of pictures. A group
    costs what decoding from its keyframe to its last target costs (:meth:`_PacketIndex.decoding_cost`);
    groups go, largest first, to the run with the least work so far (longest-processing-time scheduling),
    which balances the threads.
    """
    groups: dict[int, list[int]] = {}
    for target in targets:
        groups.setdefault(index.keyframe_before(target)[0], []).append(target)
    costs = {key: index.decoding_cost(key, group[-1]) for key, group in groups.items()}
    runs: list[list[int]] = [[] for _ in range(max(1, min(threads, len(groups))))]
    work = [0] * len(runs)
    for key in sorted(groups, key=costs.__getitem__, reverse=True):
        lightest = work.index(min(work))
        runs[lightest].extend(groups[key])
        work[lightest] += costs[key]
    return [sorted(run) for run in runs]


def _read_runs(
    path: Path,
    container: av.container.InputContainer,
    stream: av.VideoStream,
    index: _PacketIndex,
    runs: list[list[int]],
    threads: int,
    bt601: bool = False,
) -> dict[int, np.ndarray]:
    """{pts: frame} for every run of targets: the first on the open stream, the others in threads.

    The ``threads`` are shared out: each run's decoder gets ``threads // len(runs)`` of FFmpeg's own
    threads (at least 1), so one thread really means one, as a loader worker needs.
    """
    per_decoder = max(1, threads // len(runs))

    def reader(source: av.container.InputContainer, video: av.VideoStream) -> _FrameReader:
        video.codec_context.thread_count = per_decoder
        return _FrameReader(source, video, index, bt601)

    def read_run(targets: list[int]) -> dict[int, np.ndarray]:
        with av.open(str(path)) as own:
            return reader(own, own.streams.video[0]).read(targets)

    if len(runs) == 1:
        return reader(container, stream).read(runs[0])
    with ThreadPoolExecutor(len(runs) - 1) as pool:
        others = [pool.submit(read_run, run) for run in runs[1:]]
        frames = reader(container, stream).read(runs[0])
        for future in others:
            frames.update(future.result())
    return frames


def _container_index(container: av.container.InputContainer, stream: av.VideoStream,
                     entries: list | None = None) -> _PacketIndex | None:
    """The frame timestamps from an MP4/MOV sample table, without reading the video's packets.

    The table gives decoding timestamps; presentation ones are taken as the same grid shifted by the first
    packet's pts - dts (true of constant-rate streams, B-frames or not). None when the table is incomplete
    or the container is not MP4-like; the decoder verifies the grid against every frame it decodes.
    """
    # One list: each pass over ``index_entries`` builds a Python object per sample again.
    if "mov" not in container.format.name.split(","):
        return None
    entries = list(stream.index_entries) if entries is None else entries
    if not entries or len(entries) != stream.frames:
        return None
    shown = [e.timestamp for e in entries if not e.is_discard]
    key_dts = sorted(e.timestamp for e in entries if e.is_keyframe)
    first = next((p for p in container.demux(stream) if p.size), None)
    if first is None or first.pts is None or first.dts is None or not shown or not key_dts:
        return None
    offset = first.pts - first.dts
    pts = sorted(t + offset for t in shown)
    if pts[0] != first.pts or len(set(pts)) != len(pts):
        return None
    start = min(key_dts[0], pts[0], min(shown))
    through = list(itertools.accumulate(e.size for e in entries))  # decoding order
    shown_through = [b for b, e in zip(through, entries) if not e.is_discard]
    return _PacketIndex(pts, [t + offset for t in key_dts], key_dts, start, shown_through, derived=True)


def _packet_index(container: av.container.InputContainer, stream: av.VideoStream) -> _PacketIndex | None:
    """Read (not decode) every packet once; None when timestamps are missing or repeated."""
    pts, keys, through, total, packets = [], [], {}, 0, 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        packets += 1
        if packet.pts is None:
            return None
        total += packet.size
        if not packet.is_discard:  # frames an edit list hides are decoded but never shown
            pts.append(packet.pts)
            through[packet.pts] = total
        if packet.is_keyframe:  # hidden keyframes still start a group that shown frames need
            keys.append((packet.pts, packet.dts if packet.dts is not None else packet.pts))
    if not pts or not keys or len(set(pts)) != len(pts):
        return None
    declared = stream.frames if "mov" in container.format.name.split(",") else 0  # exact for MP4/MOV only
    if declared and packets < declared:
        raise TruncatedMediaError(f"{container.name} is truncated: its index lists {declared} video frames but only "
                                  f"{packets} are in the file, so it would decode as a shorter clip (an "
                                  f"interrupted download or copy?); fetch the file again")
    keys.sort()
    start = min(min(pts), min(dts for _, dts in keys))
    pts.sort()
    return _PacketIndex(pts, [k for k, _ in keys], [d for _, d in keys], start, [through[p] for p in pts])


class _FrameReader:
    """Decodes chosen frames of one opened stream, seeking only when a keyframe lies ahead of the target."""

    def __init__(self, container: av.container.InputContainer, stream: av.VideoStream, index: _PacketIndex,
                 bt601: bool = False):
        self.container, self.stream, self.index, self.bt601 = container, stream, index, bt601
        self.known = set(index.pts) if index.derived else None
        # Frames nothing predicts from can be skipped without changing any other frame.
        self.skip_nonref = stream.codec_context.name in SKIP_SAFE_CODECS
        self.frames: dict[int, np.ndarray] = {}
        self.wanted: set[int] = set()
        self.packets: Iterator[av.Packet] | None = None
        self.fed_max: int | None = None  # the largest pts fed to the decoder since the last seek
        self.drain = True  # cleared when a frame does not come out of the packet with its pts

    def read(self, targets: list[int]) -> dict[int, np.ndarray]:
        """{pts: (H, W, 3) uint8} for the sorted ``targets``."""
        self.wanted = set(targets)
        for position, target in enumerate(targets):
            if target in self.frames:
                continue
            key_pts, key_dts = self.index.keyframe_before(target)
            if self.packets is None or self.fed_max is None or key_pts > self.fed_max:
                self._seek(key_pts, (key_pts, key_dts, self.index.start))
            following = targets[position + 1 :]
            # The last target behind this keyframe: drain the decoder once its packet is in rather than decode
            # the packets after it only to push the frame out of the reorder buffer.
            drain = self.drain and (not following or self.index.keyframe_before(following[0])[0] != key_pts)
            self._feed_until(target, drain)
            if target not in self.frames and drain:  # the frame did not come from its own packet: no draining
                self.drain = False
                self._seek(key_pts, (key_pts, key_dts, self.index.start))
                self._feed_until(target, False)
            if target not in self.frames:  # e.g. a container index that points past the keyframe
                self._seek(self.index.start, (self.index.start,))
                self._feed_until(target, False)
            if target not in self.frames and self.index.derived:
                raise _IndexMismatch
        return self.frames

    def _seek(self, key_pts: int, timestamps: tuple[int, ...]) -> None:
        """Position on the keyframe at ``key_pts`` (or an earlier one), trying each seek timestamp in turn.

        Demuxers read a seek timestamp differently (MP4 and Matroska as a presentation time, AVI and
        MPEG-TS as a decoding time); a seek that lands after the keyframe is retried with the next one.
        """
        for timestamp in dict.fromkeys(timestamps):
            self.container.seek(timestamp, stream=self.stream, backward=True, any_frame=False)
            packets = self.container.demux(self.stream)
            first = next(packets, None)
            if first is None or first.pts is None or first.pts <= key_pts:
                break
        self.packets = itertools.chain([first] if first is not None else [], packets)
        self.fed_max = None

    def _feed_until(self, target: int, drain: bool) -> None:
        """Feed packets until the frame at ``target`` is out, or a later one (missed), or the stream ends.

        With ``drain``, the decoder is flushed right after the packet stamped ``target``; it then needs a
        seek before it can decode again.
        """
        codec = self.stream.codec_context
        for packet in self.packets:
            if packet.size and packet.pts is not None:
                codec.skip_frame = (
                    "NONREF" if self.skip_nonref and packet.pts not in self.wanted else "DEFAULT"
                )
                self.fed_max = packet.pts if self.fed_max is None else max(self.fed_max, packet.pts)
            frames = packet.decode()  # every frame of the packet, so none is lost when we stop here
            if drain and packet.size and packet.pts == target:
                frames += self._drain()
            last = None
            for frame in frames:
                if self.known is not None and frame.pts not in self.known:
                    raise _IndexMismatch
                last = frame.pts if frame.pts is not None else last
                if frame.pts in self.wanted and frame.pts not in self.frames:
                    self.frames[frame.pts] = _to_rgb(frame, self.bt601)
            if self.packets is None or target in self.frames or (last is not None and last > target):
                return
        codec.skip_frame = "DEFAULT"

    def _drain(self) -> list[av.VideoFrame]:
        """Flush the decoder after the target's packet; the stream then needs a seek.

        Packets without a timestamp right after it continue the same picture (e.g. the second field of an
        interlaced frame in MPEG-TS), so they go in first; the first packet with a timestamp is left unfed.
        """
        frames = []
        for packet in self.packets:
            if not packet.size or packet.pts is not None:  # a new picture, or the end of the stream
                break
            frames += packet.decode()
        self.packets = None
        return frames + self.stream.codec_context.decode(None)


def _to_rgb(frame: av.VideoFrame, bt601: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB, turned upright when the stream says how to display it (phone videos).

    ``bt601``: the BT.601 matrix and the range the pixel format implies, whatever the frame's tags (what
    swscale did before it read frame tags, hence OpenCV 4.x); else the frame's own colourspace and range.
    """
    if bt601:
        colour_range = "JPEG" if frame.format.name.startswith("yuvj") else "MPEG"
        rgb = frame.to_ndarray(format="rgb24", src_colorspace="ITU601", src_color_range=colour_range)
    else:
        rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as players apply it
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _gather(path: Path, frames: dict[int, np.ndarray], order: list[int]) -> np.ndarray:
    """Stack decoded frames in request order; a frame the stream could not produce repeats its predecessor."""
    if not frames:
        raise MediaDecodeError(f"no frame could be decoded from {path}")
    keys = sorted(frames)
    missing = [p for p in order if p not in frames]
    if missing:
        log.warning(
            "%s: %d requested frames could not be decoded; repeating the nearest earlier frame",
            path,
            len(missing),
        )
    picked = [frames.get(p, frames[keys[max(bisect_right(keys, p) - 1, 0)]]) for p in order]
    return np.stack(picked)  # (n, H, W, 3)


def _decode_sequential(path: Path, indices: IndexSpec, bt601: bool = False) -> np.ndarray:
    """Fallback without timestamps: count frames by decoding, then decode again up to the last one needed."""
    with av.open(str(path)) as container:
        total = sum(1 for _ in container.decode(video=0))
    wanted = _resolve_indices(indices, total, path)
    needed, frames = set(wanted), {}
    with av.open(str(path)) as container:
        for position, frame in enumerate(container.decode(video=0)):
            if position in needed:
                frames[position] = _to_rgb(frame, bt601)
            if position >= max(needed):
                break
    return _gather(path, frames, wanted)


def reencode_video(
    src: PathType,
    dst: PathType,
    fps: float | None = None,
    short_side: int | None = None,
    gop_seconds: float = 1.0,
    crf: int = 23,
    preset: str = "veryfast",
    start: float | None = None,
    end: float | None = None,
) -> dict:
    """Re-encode the video track of ``src`` to an H.264 mp4 at ``dst`` that samples fast (no audio track).

    ``start``/``end`` (seconds) keep only the frames shown in [start, end), e.g. to cut a dataset's clip
    out of the full video; the source is sought to the keyframe before ``start`` first.

    ``fps`` and ``short_side`` only ever lower the frame rate / size (None keeps them). A keyframe every
    ``gop_seconds`` bounds what any sampled frame costs to decode, whatever the video's length. The
    filtering (FFmpeg's ``fps`` and ``scale`` filters) runs through PyAV's filter graph.

    Returns ``{"frames", "fps", "width", "height"}`` of the output. Raises :class:`MediaDecodeError`.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MediaNotFoundError(f"video file not found: {src}")
    try:
        with av.open(str(src)) as source:
            if not source.streams.video:
                raise MediaDecodeError(f"no video stream in {src}")
            stream = source.streams.video[0]
            in_fps = float(stream.average_rate or stream.guessed_rate or 30)
            out_fps = min(fps, in_fps) if fps else in_fps
            width, height = _scaled_size(stream.codec_context.width, stream.codec_context.height, short_side)
            graph = _filter_graph(stream, out_fps, width, height)
            if start and stream.time_base:
                source.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(dst), "w") as sink:
                frames = _encode_filtered(
                    source,
                    stream,
                    graph,
                    sink,
                    out_fps,
                    (width, height),
                    gop_seconds,
                    {"crf": str(crf), "preset": preset},
                    (start, end),
                )
    except av.FFmpegError as err:
        raise MediaDecodeError(f"cannot re-encode {src} to {dst}: {err}") from err
    return {"frames": frames, "fps": out_fps, "width": width, "height": height}


def _scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the short side lowered to ``short_side`` (aspect kept, even for yuv420p)."""
    scale = min(1.0, short_side / min(width, height)) if short_side else 1.0
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _filter_graph(stream: av.VideoStream, fps: float, width: int, height: int) -> av.filter.Graph:
    graph = av.filter.Graph()
    nodes = [
        graph.add_buffer(template=stream),
        graph.add("fps", f"fps={fps:.6g}"),
        graph.add("scale", f"{width}:{height}"),
        graph.add("format", "yuv420p"),
        graph.add("buffersink"),
    ]
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    graph.configure()
    return graph


def _encode_filtered(
    source,
    stream,
    graph,
    sink,
    fps: float,
    size: tuple[int, int],
    gop_seconds: float,
    options: dict,
    span: tuple[float | None, float | None] = (None, None),
) -> int:
    """Decode -> filter graph -> libx264 for the frames shown in ``span`` (seconds; None: open);
    returns the number of frames written."""
    rate = Fraction(fps).limit_denominator(1001)
    out = sink.add_stream("libx264", rate=rate)
    out.width, out.height, out.pix_fmt = size[0], size[1], "yuv420p"
    out.options = {**options, "g": str(max(1, round(gop_seconds * fps)))}
    decoded = _frames_in_span(source.decode(stream), *span)
    first = next(decoded, None)
    if first is None:
        raise MediaDecodeError(f"no video frame could be decoded from {source.name} in {span}")
    if first.rotation:
        out.set_display_rotation(first.rotation)  # keep phone videos upright (metadata only)
    written = 0
    for frame in itertools.chain([first], decoded, [None]):  # None flushes the graph
        graph.push(frame)
        for filtered in _pull_all(graph):
            filtered.pts, filtered.time_base = written, 1 / rate  # one tick per output frame
            sink.mux(out.encode(filtered))
            written += 1
    sink.mux(out.encode())
    return written


def _frames_in_span(
    frames: Iterator[av.VideoFrame], start: float | None, end: float | None
) -> Iterator[av.VideoFrame]:
    """The frames whose time lies in [start, end) (frames without a timestamp are kept)."""
    for frame in frames:
        time = frame.time
        if time is not None and start is not None and time < start:
            continue
        if time is not None and end is not None and time >= end:
            return
        yield frame


def _pull_all(graph: av.filter.Graph) -> list[av.VideoFrame]:
    frames = []
    while True:
        try:
            frames.append(graph.pull())
        except (BlockingIOError, EOFError, av.error.EOFError):
            return frames
