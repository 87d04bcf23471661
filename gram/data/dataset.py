"""Datasets and batches. A batch is a dict keyed by modality, so the model and loss never branch on datasets.

Batch layout (B samples; `n_v` frames, `n_a` audio clips):
    ids        list[str]                     video ids
    text       {"input_ids", "attention_mask"}: (B, L) long
    video      (B, n_v, 3, S, S) float32      CLIP-normalised frames
    audio      (B, n_a, T, F) float32         normalised fbank clips (zeros for a clip without audio)
    audio_mask (B,) bool                      False where the clip had no audio at all
    subtitle   {"input_ids", "attention_mask"}: (B, L_s) long
    depth      (B, n_d, 3, S, S) float32
    skipped    list[str]                      paths of training samples that failed to load (dropped)
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gram.cli import UserError
from gram.config import DataConfig, DatasetConfig
from gram.data.annotations import AnnotationRecord, read_annotations, resolve_media
from gram.data.audio import (
    MediaDecodeError,
    MediaError,
    MediaNotFoundError,
    NoAudioStreamError,
    load_audio_clips,
    silent_clips,
)
from gram.data.errors import TooManyFailedSamplesError, shown_ids
from gram.data.video import VideoTransform, load_video_frames
from gram.data.video_backends import require_backend

log = logging.getLogger(__name__)


def require_finite(values: torch.Tensor, path: Path, what: str) -> torch.Tensor:
    """`values` unchanged, or MediaDecodeError naming the file when a NaN or infinite value was decoded (a float
    WAV or depth array can hold them; one such clip makes a whole training step non-finite)."""
    if not torch.isfinite(values).all():
        raise MediaDecodeError(f"{path}: the decoded {what} holds NaN or infinite values")
    return values


UNUSABLE_IDS_FILE = "unusable_{split}_ids.txt"
SHOWN_IDS = 5


class UnusableItemsError(UserError):
    """Evaluation items that cannot be used (no file, empty or undecodable file, non-finite embedding): one line
    with the first few ids, the count and the file listing every one of them with its reason."""

    def __init__(self, split: str, unusable: dict[str, str], listing: Path | None, what: str = "unusable"):
        ids = list(unusable)
        shown = shown_ids(ids, SHOWN_IDS)
        first = " ".join(unusable[ids[0]].split())
        where = f"; every id with its reason in {listing}" if listing else ""
        super().__init__(
            f"{len(ids)} item(s) of {split} are {what}: {shown} ({ids[0]}: {first}{where}). Evaluation never drops items silently: fix "
            f"or remove them (scripts/check_dataset.py --strict finds them all), or set eval.allow_missing=true to "
            f"evaluate the rest (the results then report how many items were evaluated)")
        self.unusable, self.listing = dict(unusable), listing


class MissingMediaError(UnusableItemsError, FileNotFoundError):
    """Evaluation items without a media file (or with an empty one), found before anything is decoded."""

    def __init__(self, split: str, missing: dict[str, str], listing: Path | None):
        super().__init__(split, missing, listing, what="without a usable media file")
        self.missing = list(missing)


class DuplicateIdsError(UserError):
    """A test set lists an id twice: both copies tie for every query, so neither can ever rank first."""


def report_unusable(split_name: str, unusable: dict[str, str], report_dir: str | Path | None, allow: bool,
                    error: type[UnusableItemsError] = UnusableItemsError) -> Path | None:
    """Write ``<report_dir>/unusable_<split>_ids.txt`` (``id<TAB>reason`` per line) and raise ``error`` naming the
    first ids, or, with ``allow`` (``eval.allow_missing``), log one warning. Returns the file written (or None)."""
    if not unusable:
        return None
    listing = None
    if report_dir is not None:
        listing = Path(report_dir) / UNUSABLE_IDS_FILE.format(split=Path(split_name).stem)
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{i}\t{' '.join(reason.split())}\n" for i, reason in unusable.items()))
    if not allow:
        raise error(split_name, unusable, listing)
    ids = list(unusable)
    log.warning("%s: %d item(s) left out of the evaluation (eval.allow_missing=true): %s%s", split_name, len(ids),
                shown_ids(ids, SHOWN_IDS), f" (all in {listing})" if listing else "")
    return listing


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


@dataclass
class MediaPaths:
    video: Path | None
    audio: Path | None
    depth: Path | None


def _sample_seed(*parts: Any) -> int:
    """A stable per-sample seed, independent of worker count and process, so resumed runs redraw the same frames."""
    return zlib.crc32(repr(parts).encode())


MediaSource = Callable[[str], AbstractContextManager[Path | None]]


class ItemBuilder:
    """One training/evaluation item from an annotation record and its media, wherever the media live.

    `media(role)` is a context manager giving a local file for "video", "depth" or "audio" (for audio: the audio
    file, else the video with its own track), or None when there is none. Files (`VideoTextDataset`) and streamed
    shards (`gram.data.shards`) both build their items here, so they give identical items.
    """

    def __init__(self, data: DataConfig, modalities: Sequence[str], training: bool):
        self.data, self.modalities, self.training = data, tuple(modalities), training
        self.num_frames = data.num_frames if training else data.test_num_frames
        # The preset (data.preprocessing) also picks the colour matrix (through the transform) and the audio format.
        self.transform = VideoTransform(data.image_size, mode=data.transform, training=training,
                                        preprocessing=data.preprocessing)
        if {"video", "depth"} & set(self.modalities):
            require_backend(data.video_backend)  # one clear line at start, not a failed clip per worker

    def __call__(self, record: AnnotationRecord, media: MediaSource,
                 generator: torch.Generator) -> dict[str, Any]:
        item: dict[str, Any] = {"id": record.video_id, "caption": self.caption(record, generator)}
        # Depth must use the RGB clip's frames and crop (the reference drew them independently): both start
        # from the same generator state.
        start_state = generator.get_state()
        try:
            for modality in self.modalities:
                if modality in ("video", "depth"):
                    generator.set_state(start_state)
                item.update(self._load(modality, record, media, generator))
        except MediaError as error:  # dropped in training, an unusable id in evaluation: never raised
            return {"id": record.video_id, "failed": str(error)}
        return item

    def caption(self, record: AnnotationRecord, generator: torch.Generator) -> str:
        """A random caption in training (drawn first from the generator), the first one in evaluation."""
        if self.training and len(record.captions) > 1:
            return record.captions[int(torch.randint(len(record.captions), (1,), generator=generator))]
        return record.captions[0]

    def _load(self, modality: str, record: AnnotationRecord, media: MediaSource,
              generator: torch.Generator) -> dict[str, Any]:
        if modality in ("video", "depth"):
            with media(modality) as path:
                if path is None:
                    raise MediaNotFoundError(f"{record.video_id}: no {modality} file")
                frames = load_video_frames(path, self.num_frames, self.training, self.transform, generator=generator,
                                           backend=self.data.video_backend)
                return {modality: require_finite(frames, path, f"{modality} frames")}
        if modality == "subtitle":
            return {"subtitle": record.subtitle or ""}
        if modality == "audio":
            return self._audio(record, media, generator)
        raise ValueError(f"unknown modality {modality!r}")

    def _audio(self, record: AnnotationRecord, media: MediaSource, generator: torch.Generator) -> dict[str, Any]:
        """A clip without any audio gets the defined silent input and a False mask."""
        d = self.data
        try:
            with media("audio") as path:
                if path is None:
                    raise NoAudioStreamError(f"{record.video_id}: no audio file and no video")
                clips = load_audio_clips(path, d.num_audio_clips, d.audio_target_length, d.audio_mel_bins,
                                         training=self.training, generator=generator, preprocessing=d.preprocessing)
                return {"audio": require_finite(clips, path, "audio"), "audio_mask": True}
        except NoAudioStreamError:
            return {"audio": silent_clips(d.num_audio_clips, d.audio_target_length, d.audio_mel_bins),
                    "audio_mask": False}


class VideoTextDataset(Dataset):
    """Annotation records plus the media they point to, loaded for the requested data modalities."""

    def __init__(self, split: DatasetConfig, data: DataConfig, modalities: Sequence[str], training: bool,
                 seed: int = 0, allow_missing: bool = False, report_dir: str | Path | None = None):
        """``allow_missing`` (``eval.allow_missing``): evaluation leaves out unusable items (and reports them)
        instead of failing; ``report_dir`` receives the list of unusable evaluation ids (see `report_unusable`)."""
        self.split, self.data, self.modalities, self.training = split, data, tuple(modalities), training
        self.seed, self.epoch = seed, 0
        self.allow_missing, self.report_dir = allow_missing, report_dir
        self.records = read_annotations(split.annotations, corrupted=split.corrupted)
        if not training:
            self._check_unique_ids()
        self.num_annotated = len(self.records)
        self.media_paths = [self._resolve(r) for r in self.records]
        self._check_complete(allow_missing)
        self.build = ItemBuilder(data, modalities, training)

    def _check_unique_ids(self) -> None:
        """A duplicated test id ties with itself for every query, so it can never rank first: refuse it."""
        counts = Counter(r.video_id for r in self.records)
        repeated = [i for i, n in counts.items() if n > 1]
        if repeated:
            shown = shown_ids([f"{i} (x{counts[i]})" for i in repeated], SHOWN_IDS)
            raise DuplicateIdsError(
                f"{self.split.annotations}: {len(repeated)} id(s) appear more than once in this evaluation split: "
                f"{shown}. A duplicated item ties with itself and can never rank first; keep one record per "
                f"id (merge their captions into one list)")

    def _resolve(self, record: AnnotationRecord) -> MediaPaths:
        s = self.split

        def find(folder: str | None, exts: Sequence[str]) -> Path | None:
            return resolve_media(folder, record.video_id, exts) if folder else None

        return MediaPaths(find(s.video_dir, s.video_extensions), find(s.audio_dir, s.audio_extensions),
                          find(s.depth_dir, s.depth_extensions))

    def _unusable_file(self, paths: MediaPaths) -> str | None:
        """Why an item cannot be built from its files alone (a required file missing, or in evaluation empty), else
        None. Audio may come from the video's own track. (An empty training file fails to decode and is counted
        with the failed clips.)"""
        m = self.modalities
        required = {"video": paths.video if "video" in m else False, "depth": paths.depth if "depth" in m else False,
                    "audio": (paths.audio or paths.video) if "audio" in m else False}
        for role, path in required.items():
            if path is None:
                folder = {"video": self.split.video_dir, "depth": self.split.depth_dir,
                          "audio": self.split.audio_dir or self.split.video_dir}[role]
                return f"no {role} file in {folder}"
            if path and not self.training and _is_empty(path):
                return f"empty file {path} (0 bytes)"
        return None

    def _check_complete(self, allow_missing: bool) -> None:
        """Training drops (and logs) items without media, and counts them with the clips that fail to load towards
        `data.max_failed_fraction`; evaluation refuses to run on an incomplete split (listing every id) unless
        ``allow_missing``. Empty files count as missing in evaluation."""
        reasons = {i: r for i, p in enumerate(self.media_paths) if (r := self._unusable_file(p)) is not None}
        self.missing_ids = ids = [self.records[i].video_id for i in reasons]
        if not reasons:
            return
        if not self.training:
            report_unusable(str(self.split.annotations), {self.records[i].video_id: r for i, r in reasons.items()},
                            self.report_dir, allow_missing, MissingMediaError)
        else:
            limit = self.data.max_failed_fraction
            if len(ids) > limit * len(self.records):
                folders = ", ".join(str(f) for f in (self.split.video_dir, self.split.audio_dir, self.split.depth_dir)
                                    if f)
                raise TooManyFailedSamplesError(
                    f"{self.split.annotations}: {len(ids)} of {len(self.records)} training items have no media file "
                    f"in {folders} ({shown_ids(ids)}), more than data.max_failed_fraction={limit}; add the files, fix "
                    f"the split's media folders, or run scripts/check_dataset.py")
            log.warning("%s: %d of %d items have no media file and are left out (first: %s)",
                        self.split.annotations, len(ids), len(self.records), ids[0])
        self.records = [r for i, r in enumerate(self.records) if i not in reasons]
        self.media_paths = [p for i, p in enumerate(self.media_paths) if i not in reasons]

    @property
    def missing_fraction(self) -> float:
        """Fraction of the annotated items left out for lack of a media file."""
        return len(self.missing_ids) / max(self.num_annotated, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def media(self, index: int) -> MediaSource:
        paths = self.media_paths[index]
        files = {"video": paths.video, "depth": paths.depth, "audio": paths.audio or paths.video}
        return lambda role: contextlib.nullcontext(files[role])

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``index``, or ``(epoch, index)``: persistent loader workers hold their own copy of the
        dataset, so the training sampler sends the epoch with every index (``set_epoch`` here would not
        reach them)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, index))
        return self.build(self.records[index], self.media(index), generator)


class Collator:
    """Stacks media, tokenizes text and subtitles, and drops (but reports) samples that failed to load."""

    def __init__(self, tokenizer, max_text_len: int, max_subtitle_len: int):
        self.tokenizer, self.max_text_len, self.max_subtitle_len = tokenizer, max_text_len, max_subtitle_len

    def tokenize(self, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if "failed" not in it]
        batch: dict[str, Any] = {"skipped": [it["failed"] for it in items if "failed" in it],
                                 "ids": [it["id"] for it in good],
                                 # (position in the batch, id, reason): evaluation keeps its rows in place
                                 "failed_items": [(i, it["id"], it["failed"]) for i, it in enumerate(items)
                                                  if "failed" in it]}
        if not good:
            return batch
        batch["text"] = self.tokenize([it["caption"] for it in good], self.max_text_len)
        if "subtitle" in good[0]:
            batch["subtitle"] = self.tokenize([it["subtitle"] for it in good], self.max_subtitle_len)
        for key in ("video", "audio", "depth"):
            if key in good[0]:
                batch[key] = torch.stack([it[key] for it in good]).float()
        if "audio_mask" in good[0]:
            batch["audio_mask"] = torch.tensor([it["audio_mask"] for it in good])
        return batch
