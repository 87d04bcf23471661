"""Data: annotation files, media decoding, datasets, loaders, the sample dataset and shards."""

from gram.data.annotations import AnnotationRecord, read_annotations, resolve_media
from gram.data.audio import load_audio_clips, silent_clips
from gram.data.video import VideoTransform, load_video_frames

__all__ = ["AnnotationRecord", "VideoTransform", "load_audio_clips", "load_video_frames", "read_annotations",
           "resolve_media", "silent_clips"]
