"""Annotation files of the GRAM/VAST retrieval datasets and the exact id-to-media-file mapping.

Two layouts are read:

* a JSON list of records, one per video or clip: an id under ``clip_id`` or ``video_id``, the captions
  under ``desc``, ``caption`` or ``vast_cap`` (a string or a list of strings), an optional ``subtitle``
  (ASR text, may be empty) and any other fields (``audio_caption``, ``vision_cap``, ``audio_cap``, labels);
* the COCO-style caption files ``{"annotations": [{"video_id": ..., "caption": ...}, ...]}``, one entry
  per caption, grouped here into one record per video in order of first appearance.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PathType = str | PathLike

# Same precedence as the reference reader: a VAST-27M record may carry several of these.
ID_KEYS = ("clip_id", "video_id")
CAPTION_KEYS = ("desc", "caption", "vast_cap")
SUBTITLE_KEY = "subtitle"


class AnnotationError(ValueError):
    """An annotation file (or one of its records) cannot be used; the message names the file and record."""


@dataclass
class AnnotationRecord:
    """One video/clip of an annotation file.

    ``captions`` holds every caption (never only the first one); ``subtitle`` is None when the file has
    no subtitle for the record and may be the empty string (stripped of surrounding whitespace); ``extra`` keeps every other field as read.
    """

    video_id: str
    captions: list[str]
    subtitle: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AnnotationList(list):
    """The records of one file (a plain list) plus where they came from and which ids were dropped."""

    def __init__(self, records: Iterable[AnnotationRecord], source: Path, dropped_ids: Sequence[str] = ()):
        super().__init__(records)
        self.source = source
        self.dropped_ids = list(dropped_ids)

    @property
    def num_dropped(self) -> int:
        """Records removed because their id is listed as corrupted."""
        return len(self.dropped_ids)


def read_annotations(
    path: PathType,
    corrupted: PathType | Iterable[str] | None = None,
    allow_empty_captions: bool = False,
) -> AnnotationList:
    """Read a GRAM/VAST annotation file into records.

    Args:
        path: a JSON list of records or a COCO-style ``{"annotations": [...]}`` caption file.
        corrupted: ids to drop (e.g. DiDeMo's ``corrupted`` file): a text file with one id per line, or
            the ids themselves. Dropped ids are kept in ``result.dropped_ids`` and logged.
        allow_empty_captions: keep records whose captions are all empty (``captions == []``) instead of
            raising; meant for dataset checks that count such records rather than stop at the first one.

    Raises:
        AnnotationError: the file is missing or not JSON, has another structure, or a record has no id
            or no caption (the message gives the file and the record index).
    """
    path = Path(path)
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        records = _group_caption_entries(path, data["annotations"], allow_empty_captions)
    elif isinstance(data, list):
        records = [_parse_record(path, i, raw, allow_empty_captions) for i, raw in enumerate(data)]
    else:
        raise AnnotationError(
            f"{path}: expected a JSON list of records or an object with an 'annotations' list, "
            f"got {type(data).__name__}" + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else "")
        )
    return _drop_corrupted(path, records, corrupted)


def read_id_list(path: PathType) -> list[str]:
    """Ids from a text file, one per line; blank lines are ignored (e.g. DiDeMo's ``corrupted``)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: id list not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_media(directory: PathType, video_id: str, extensions: Sequence[str]) -> Path | None:
    """The file ``<directory>/<video_id>.<ext>`` for the first extension (in the given order) that exists.

    The mapping is exact: ``video1`` never resolves to ``video10.mp4`` (the reference's prefix glob did).
    It costs one ``stat`` per extension tried, independent of the folder size. Extensions may be given
    with or without the leading dot. Returns None when no candidate exists.
    """
    if not video_id or Path(video_id).name in ("", ".", ".."):
        raise AnnotationError(f"invalid media id {video_id!r} (looked up in {directory})")
    directory = Path(directory)
    for ext in extensions:
        candidate = directory / f"{video_id}.{ext.lstrip('.')}"
        if candidate.is_file():
            return candidate
    return None


_SEGMENT_ID = re.compile(r"^(?P<source>.+)_(?P<start>\d+(?:\.\d+)?)_(?P<end>\d+(?:\.\d+)?)$")


def segment_of(video_id: str) -> tuple[str, float, float] | None:
    """(source id, start s, end s) for clip ids named after a segment of a longer video, else None.

    VATEX (``G9zN5TTuGO4_000179_000189``), YouCook2 (``xHr8X2Wpmno_47_60``) and AudioCaps
    (``GOD8Bt5LfDE_100.000_110.000``) name clips ``<YouTube id>_<start>_<end>`` in seconds; YouTube ids
    may themselves contain ``_``, so the two numbers are taken from the right.
    """
    match = _SEGMENT_ID.match(video_id)
    if match is None:
        return None
    start, end = float(match["start"]), float(match["end"])
    return (match["source"], start, end) if end > start else None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found (check the dataset config's annotation path)")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not a valid JSON file ({e})") from e


def _record_id(path: Path, index: int, raw: dict) -> str:
    for key in ID_KEYS:
        value = raw.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    raise AnnotationError(
        f"{path}: record {index} has no id (expected a non-empty {' or '.join(ID_KEYS)}); keys: {sorted(raw)}"
    )


def _as_caption_list(path: Path, index: int, key: str, value: Any) -> list[str]:
    """A caption field (string or list of strings) as a list of the non-empty, stripped captions."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise AnnotationError(
            f"{path}: record {index} field {key!r} must be a string or a list of strings, "
            f"got {type(value).__name__}"
        )
    return [c.strip() for c in items if c.strip()]


def _parse_record(path: Path, index: int, raw: Any, allow_empty: bool) -> AnnotationRecord:
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path}: record {index} is a {type(raw).__name__}, expected a JSON object")
    video_id = _record_id(path, index, raw)
    caption_key = next((k for k in CAPTION_KEYS if k in raw), None)
    if caption_key is None:
        raise AnnotationError(
            f"{path}: record {index} (id {video_id!r}) has no caption field "
            f"(expected one of {', '.join(CAPTION_KEYS)}); keys: {sorted(raw)}"
        )
    captions = _as_caption_list(path, index, caption_key, raw[caption_key])
    if not captions and not allow_empty:
        raise AnnotationError(f"{path}: record {index} (id {video_id!r}) has only empty captions")
    subtitle = raw.get(SUBTITLE_KEY)
    if subtitle is not None and not isinstance(subtitle, str):
        raise AnnotationError(f"{path}: record {index} (id {video_id!r}) has a non-string subtitle")
    if subtitle is not None:
        subtitle = subtitle.strip()  # whitespace-only ASR output is an empty subtitle
    used = {caption_key, SUBTITLE_KEY, *ID_KEYS}
    extra = {k: v for k, v in raw.items() if k not in used}
    return AnnotationRecord(video_id=video_id, captions=captions, subtitle=subtitle, extra=extra)


def _group_caption_entries(path: Path, entries: Any, allow_empty: bool) -> list[AnnotationRecord]:
    """COCO-style entries (one caption each) merged into one record per id, in first-seen order."""
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: 'annotations' must be a list, got {type(entries).__name__}")
    by_id: dict[str, AnnotationRecord] = {}
    for i, raw in enumerate(entries):
        entry = _parse_record(path, i, raw, allow_empty=True)
        record = by_id.setdefault(entry.video_id, AnnotationRecord(entry.video_id, [], entry.subtitle))
        record.captions.extend(entry.captions)
        # Per-caption fields (e.g. COCO's caption "id") are kept as lists aligned with the entries.
        for key, value in entry.extra.items():
            record.extra.setdefault(key, []).append(value)
    if not allow_empty:
        for record in by_id.values():
            if not record.captions:
                raise AnnotationError(f"{path}: id {record.video_id!r} has only empty captions")
    return list(by_id.values())


def _drop_corrupted(
    path: Path, records: list[AnnotationRecord], corrupted: PathType | Iterable[str] | None
) -> AnnotationList:
    if corrupted is None:
        return AnnotationList(records, path)
    if isinstance(corrupted, (str, PathLike)):
        bad = set(read_id_list(corrupted))
    else:
        bad = {str(c).strip() for c in corrupted}
    kept = [r for r in records if r.video_id not in bad]
    dropped = [r.video_id for r in records if r.video_id in bad]
    if dropped:
        log.info("%s: dropped %d records listed as corrupted: %s", path, len(dropped), dropped)
    return AnnotationList(kept, path, dropped)
