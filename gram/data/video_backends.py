"""Video decoders other than PyAV, chosen by ``data.video_backend``: decord (package ``decord2``), torchcodec and
OpenCV (the reference's seek-per-frame method, kept as the benchmark baseline).

Every reader has the signature ``(path, resolve) -> (n, H, W, 3) uint8 RGB``: ``resolve(total)`` turns the
video's frame count into the frame positions (presentation order), so frame selection stays in
:mod:`gram.data.video` and only the decoder differs. On the shared H.264 clips decord and torchcodec return
PyAV's pixels exactly (``tests/test_video_backends.py``); both count frames by presentation order like PyAV.

Where each one differs (measured, see ``bench/README.md``):

* decord2 3.4.0 cannot decode frames whose RGB row is not a multiple of 64 bytes (e.g. 96 px wide) nor videos
  with a display rotation (it returns six channels, or raises). Such files are decoded with PyAV instead, with
  one warning per process, so choosing decord never loses a clip.
* torchcodec 0.17.0 needs the FFmpeg shared libraries of the system (Debian: ``apt-get install libavcodec59
  libavformat59 libavutil57 libswresample4 libswscale6``, or ``bash preinstall.sh torchcodec``). It applies the
  display rotation itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gram.cli import UserError
from gram.data.audio import MediaDecodeError

log = logging.getLogger(__name__)

# The values of data.video_backend; "opencv" is accepted by decode_frames only (the benchmark baseline).
VIDEO_BACKENDS = ("pyav", "decord", "torchcodec")
FFMPEG_APT_PACKAGES = "libavcodec59 libavformat59 libavutil57 libswresample4 libswscale6 libavdevice59 libavfilter8"
INSTALL_HINTS = {
    "decord": "pip install 'gram[decord]' (decord2; never beside decord or eva-decord)",
    "torchcodec": "pip install 'gram[torchcodec]' plus the FFmpeg libraries: "
    f"apt-get install {FFMPEG_APT_PACKAGES} (or: bash preinstall.sh torchcodec)",
    "opencv": "pip install 'gram[opencv]'",
}
Resolve = Callable[[int], list[int]]
_warned_fallback = False


def require_backend(backend: str) -> None:
    """Raise :class:`UserError` (one line naming ``data.video_backend`` and the install command) when the backend's
    package cannot be imported; pyav is always there. Call it once at start, before any worker decodes."""
    if backend == "pyav":
        return
    if backend not in INSTALL_HINTS:
        raise UserError(
            f"data.video_backend={backend!r} is not a video backend; expected one of {', '.join(VIDEO_BACKENDS)}"
        )
    try:
        _import(backend)
    except (ImportError, OSError, RuntimeError) as error:
        reason = " ".join(str(error).split())[:160]
        raise UserError(
            f"data.video_backend={backend!r} is not usable here ({reason}); install it: {INSTALL_HINTS[backend]}"
        ) from error


def _import(backend: str):
    """The backend's module; torchcodec's import also loads FFmpeg (a RuntimeError when the libraries are absent)."""
    if backend == "decord":
        import decord

        return decord
    if backend == "torchcodec":
        from torchcodec import decoders

        return decoders
    import cv2

    return cv2


def read_frames(backend: str, path: Path, resolve: Resolve,
                fallback: Callable[[], np.ndarray] | None = None) -> np.ndarray:
    """(n, H, W, 3) uint8 frames of ``path`` at ``resolve(total)`` decoded by ``backend`` (not "pyav").

    ``fallback`` decodes the same frames with PyAV where the backend is known to fail (decord, see above).
    """
    try:
        module = _import(backend)
    except (ImportError, OSError, RuntimeError) as error:
        require_backend(backend)  # raises the one-line message
        raise error
    if backend != "opencv":  # opencv: the benchmark's baseline, kept as the reference used it
        _raise_if_truncated(path)
    reader = {"decord": _decord, "torchcodec": _torchcodec, "opencv": _opencv_seek}[backend]
    return reader(module, path, resolve, fallback)


def _raise_if_truncated(path: Path) -> None:
    """The PyAV reader's check for a file cut short behind its own index (decord and torchcodec would decode it as
    a shorter clip, silently): the container's index against the bytes present, no decoding."""
    import av

    from gram.data.errors import raise_if_truncated

    try:
        with av.open(str(path)) as container:
            if container.streams.video:
                raise_if_truncated(container.streams.video[0], path)
    except av.error.FFmpegError:
        return  # a file FFmpeg cannot open: the backend names it in its own error


def _decord(decord, path: Path, resolve: Resolve, fallback) -> np.ndarray:
    """decord's own keyframe index; its reported length counts shown frames, like PyAV's."""
    global _warned_fallback
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        frames = reader.get_batch(resolve(len(reader))).asnumpy()  # (n, H, W, 3) uint8
        if frames.ndim == 4 and frames.shape[-1] == 3:
            return frames
        problem = f"it returned shape {frames.shape}"
    except (decord.DECORDError, RuntimeError) as error:  # RuntimeError: a file it cannot open
        problem = " ".join(str(error).split())[-120:]
    if fallback is None:
        raise MediaDecodeError(f"decord cannot decode video {path}: {problem}")
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("decord cannot decode %s (%s); such videos are decoded with PyAV (warned once)", path, problem)
    return fallback()


def _torchcodec(decoders, path: Path, resolve: Resolve, fallback) -> np.ndarray:
    """torchcodec's exact mode scans the packets once for the frame count and timestamps, as PyAV's index does."""
    try:
        decoder = decoders.VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
    except (RuntimeError, ValueError) as error:
        raise MediaDecodeError(f"cannot decode video {path}: {' '.join(str(error).split())[:200]}") from error
    wanted = resolve(len(decoder))
    try:
        return decoder.get_frames_at(wanted).data.numpy()  # (n, H, W, 3) uint8, rotation applied
    except (RuntimeError, IndexError) as error:
        raise MediaDecodeError(f"cannot decode video {path}: {' '.join(str(error).split())[:200]}") from error


def _opencv_seek(cv2, path: Path, resolve: Resolve, fallback) -> np.ndarray:
    """The reference's method: seek to every frame with ``CAP_PROP_POS_FRAMES``, BGR -> RGB."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaDecodeError(f"cannot open video {path} with OpenCV")
        frames = []
        for i in resolve(int(capture.get(cv2.CAP_PROP_FRAME_COUNT))):
            capture.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, bgr = capture.read()
            if not ok:
                raise MediaDecodeError(f"OpenCV could not read frame {i} of {path}")
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return np.stack(frames)  # (n, H, W, 3)
    finally:
        capture.release()
