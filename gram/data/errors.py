"""Errors of media reading (light: no torch or PyAV import, so scripts can name them before parsing arguments)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gram.cli import UserError


def shown_ids(ids: Sequence[str], limit: int = 10) -> str:
    """The first `limit` ids, comma-separated, and how many more there are (for one-line messages)."""
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


class TooManyFailedSamplesError(UserError):
    """More training items are missing or unusable than `data.max_failed_fraction` allows."""


class MediaError(UserError):
    """Base class of every media-reading error; the message names the file. A `UserError`: reaching an entry point
    it is printed as one line (exit status 2)."""


class MediaDecodeError(MediaError):
    """The file is missing, unreadable, or not a decodable media file."""


class MediaNotFoundError(MediaDecodeError, FileNotFoundError):
    """The file does not exist (a :class:`MediaDecodeError` that is also a ``FileNotFoundError``)."""


class NoAudioStreamError(MediaError):
    """The file decodes but has no audio stream (e.g. a video without sound)."""


class TruncatedMediaError(MediaDecodeError):
    """The file ends before the data its own index points to (e.g. a half-downloaded MP4 whose index sits at
    the start): it would decode as a shorter clip without any error from FFmpeg."""


def raise_if_truncated(stream: Any, path: str | Path, entries: list | None = None) -> None:
    """Raise :class:`TruncatedMediaError` when the container's index of ``stream`` points past the end of the file.

    MP4/MOV (and AVI, Matroska cues) index every packet or keyframe by byte position; a file cut short (an
    interrupted download or copy) keeps that index when it is written first ("faststart"), so FFmpeg simply
    stops early. Comparing the index with the bytes present needs no decoding. ``entries``: the stream's
    ``index_entries`` when the caller has listed them already (each listing builds an object per packet).
    """
    size = Path(path).stat().st_size
    entries = stream.index_entries if entries is None else entries
    needed = max((e.pos + max(e.size, 0) for e in entries if e.pos >= 0), default=0)
    if needed > size:
        raise TruncatedMediaError(
            f"{path} is truncated: its index needs {needed} bytes of {stream.type} data but the file has {size} "
            f"({100 * size / needed:.0f} %), so it would decode as a shorter clip (an interrupted download or "
            f"copy?); fetch the file again")
