"""Data: annotation files, media decoding, datasets, loaders, the sample dataset and shards.

Names are imported on first use, so `gram.data.annotations` (plain Python) loads without torch and PyAV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gram._lazy import lazy_exports

_EXPORTS = {
    "AnnotationRecord": "gram.data.annotations",
    "read_annotations": "gram.data.annotations",
    "resolve_media": "gram.data.annotations",
    "load_audio_clips": "gram.data.audio",
    "silent_clips": "gram.data.audio",
    "VideoTransform": "gram.data.video",
    "load_video_frames": "gram.data.video",
}

__all__ = ["AnnotationRecord", "VideoTransform", "load_audio_clips", "load_video_frames", "read_annotations",
           "resolve_media", "silent_clips"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from gram.data.annotations import AnnotationRecord, read_annotations, resolve_media
    from gram.data.audio import load_audio_clips, silent_clips
    from gram.data.video import VideoTransform, load_video_frames
