"""Sharded streaming data for pretraining at scale (millions of clips): webdataset tar shards.

Writing (:func:`write_shards`, ``scripts/make_shards.py``)
    Each sample of ``shard-%06d.tar`` is keyed by a sanitised id (:func:`sample_key`) and holds the
    ORIGINAL encoded media bytes, one member per role and true extension (``<key>.video.mp4``,
    ``<key>.audio.mp3``, ``<key>.depth.npy``: roles keep a video and an audio or depth file with the same
    extension apart), plus ``<key>.json``: the annotation record (``video_id``, ``captions``, ``subtitle``,
    ``extra``). ``index.json`` lists the shards with their sample counts; ``missing_ids.txt`` the ids skipped
    for want of media. Shards are planned up front and written atomically, so a rerun keeps every finished
    shard whose members (names and sizes) are still the planned ones and rewrites only the rest.

Reading (:class:`ShardStream`)
    For a training epoch ``e`` every source (a shard set, from its ``index.json``) is cut into passes. Pass
    ``j`` shuffles the shard list with the seed ``(seed, source, e, j)`` and deals shard ``i`` to slot
    ``i % num_slots``, a slot being one (rank, loader worker) pair: within a pass no sample reaches two
    slots, and each slot reads its own shards only. A slot groups its shards into blocks of at least
    ``shuffle_buffer`` samples (whole shards) and yields every block in a seeded random order; a slot that
    exhausts its pass goes on with pass ``j + 1``. Which source each sample comes from is drawn per slot from
    the mixture weights with the seed ``(seed, e, slot)``.

    Every rank yields the same number of batches per epoch (``samples_per_epoch // (world * micro_batch)``),
    dealt round-robin to the loader workers, so the position of every slot follows from
    ``(epoch, batches_done)`` alone: resuming skips whole blocks without reading them and re-reads at most
    one block per source and slot. That resume is exact when the world size and worker count are unchanged;
    with other counts it restarts at the same epoch and batch count under the new slot layout.

Decoding uses the map-style dataset's functions, so an item is exactly what
:meth:`gram.data.dataset.VideoTextDataset.__getitem__` returns for the same clip. Those functions read
paths, so each media member is spooled to a temporary file (``TMPDIR``; a tmpfs there saves the disk
write) for the duration of its decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gram import distributed as dist
from gram.config import DataConfig, DatasetConfig, ShardsConfig
from gram.data.annotations import AnnotationRecord, resolve_media
from gram.data.audio import MediaError
from gram.data.dataset import ItemBuilder, _sample_seed
from gram.data.errors import shown_ids
from gram.data.loader import EpochStream, leave_signals_to_main

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
MISSING_FILE = "missing_ids.txt"
SHARD_NAME = "shard-{:06d}.tar"
INDEX_FORMAT = 1
MEDIA_ROLES = ("video", "audio", "depth")
# Fixed member times make a shard a pure function of its samples (byte-identical reruns).
TAR_MTIME = 0.0

MediaResolver = Callable[[AnnotationRecord], dict[str, Path | None]]


class ShardError(ValueError):
    """A shard set cannot be used as configured; the message names the file or source and the fix."""


# ============================================================================================== writing


def sample_key(video_id: str) -> str:
    """A webdataset sample key for ``video_id``: only ``[A-Za-z0-9_-]``, unique per id.

    webdataset splits a member name at its first dot into key and field, so dots, slashes and other
    characters become ``_``; an id that had to change gets a short hash of the original appended, so two
    ids never collide (``a.b`` -> ``a_b-<hash>``, while ``a_b`` stays ``a_b``).
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", video_id)
    if clean == video_id:
        return clean
    return f"{clean}-{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"


def media_resolver(split: DatasetConfig) -> MediaResolver:
    """The media files of a record under ``split``'s folders: ``{"video", "audio", "depth"}`` -> Path or None.

    Uses the exact id-to-file mapping of :func:`gram.data.annotations.resolve_media`.
    """
    folders = {"video": (split.video_dir, split.video_extensions), "audio": (split.audio_dir, split.audio_extensions),
               "depth": (split.depth_dir, split.depth_extensions)}

    def resolve(record: AnnotationRecord) -> dict[str, Path | None]:
        return {role: resolve_media(folder, record.video_id, exts) if folder else None
                for role, (folder, exts) in folders.items()}

    return resolve


@dataclass
class _Planned:
    """One sample to write: its key, record and media files (role -> path)."""

    key: str
    record: AnnotationRecord
    media: dict[str, Path]

    def size(self) -> int:
        """Bytes of the media files (the json is negligible), for ``max_shard_size``."""
        return sum(path.stat().st_size for path in self.media.values())


def _collect(records: Iterable[AnnotationRecord], resolve: MediaResolver, required: Sequence[str]
             ) -> tuple[list[_Planned], list[str], list[str], list[str]]:
    """(samples to write, ids missing a required file, ids repeated in the annotations, ids whose captions are
    all empty). Records without a caption cannot be trained on: they are skipped like records without media."""
    planned, missing, duplicates, empty, seen = [], [], [], [], set()
    for record in records:
        key = sample_key(record.video_id)
        if key in seen:
            duplicates.append(record.video_id)
            continue
        if not record.captions:
            empty.append(record.video_id)
            continue
        media = {role: Path(p) for role, p in resolve(record).items() if p is not None}
        if any(role not in media for role in required):
            missing.append(record.video_id)
            continue
        seen.add(key)
        planned.append(_Planned(key, record, media))
    if empty:
        shown = shown_ids([repr(i) for i in empty], 5)
        log.warning("skipping %d record(s) whose captions are all empty: %s (listed in the index's "
                    "empty_caption_ids)", len(empty), shown)
    return planned, missing, duplicates, empty


def _plan_shards(samples: list[_Planned], samples_per_shard: int, max_shard_size: int | None) -> list[list[_Planned]]:
    """Consecutive groups of at most ``samples_per_shard`` samples and (unless one sample alone is larger)
    at most ``max_shard_size`` media bytes."""
    shards: list[list[_Planned]] = []
    current: list[_Planned] = []
    current_bytes = 0
    for sample in samples:
        size = sample.size() if max_shard_size else 0
        full = len(current) >= samples_per_shard or (max_shard_size and current_bytes + size > max_shard_size)
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _record_json(record: AnnotationRecord) -> bytes:
    return json.dumps(dataclasses.asdict(record), ensure_ascii=False, sort_keys=True).encode("utf-8")


def _tar_sample(sample: _Planned) -> dict[str, Any]:
    """The webdataset sample dict: ``__key__``, ``<role>.<ext>`` -> original bytes, ``json``."""
    out: dict[str, Any] = {"__key__": sample.key, "json": _record_json(sample.record)}
    for role, path in sample.media.items():
        out[f"{role}.{path.suffix.lstrip('.').lower()}"] = path.read_bytes()
    return out


def _write_shard(path: Path, samples: list[_Planned]) -> None:
    """Write one shard to a temporary name and rename it: a ``.tar`` that exists is always complete."""
    partial = path.with_name(path.name + ".partial")
    with wds.TarWriter(str(partial), encoder=False, mtime=TAR_MTIME) as writer:
        for sample in samples:
            writer.write(_tar_sample(sample))
    os.replace(partial, path)


def _tar_members(path: Path) -> list[tuple[str, int]] | None:
    """(name, size) of every member of a tar (headers only, data is seeked over); None when unreadable."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [(member.name, member.size) for member in tar.getmembers()]
    except (OSError, tarfile.TarError):
        return None


def _expected_members(samples: list[_Planned]) -> list[tuple[str, int]]:
    """(name, size) of the members :func:`_write_shard` writes (webdataset writes a sample's fields sorted).

    Comparing sizes too makes a rerun rewrite a shard whose media or record changed under the same name.
    """
    members = []
    for sample in samples:
        fields = {"json": len(_record_json(sample.record))}
        fields.update({f"{role}.{p.suffix.lstrip('.').lower()}": p.stat().st_size for role, p in sample.media.items()})
        members.extend((f"{sample.key}.{name}", fields[name]) for name in sorted(fields))
    return members


def _remove_stale(out_dir: Path, num_shards: int) -> list[str]:
    """Delete shards of an earlier, larger plan (only our own ``shard-NNNNNN.tar`` names) and partial files."""
    removed = []
    for path in sorted(out_dir.glob("shard-*.tar*")):
        match = re.fullmatch(r"shard-(\d{6})\.tar(\.partial)?", path.name)
        if match and (match.group(2) or int(match.group(1)) >= num_shards):
            path.unlink()
            removed.append(path.name)
    return removed


def write_shards(
    records: Iterable[AnnotationRecord],
    media_resolver: MediaResolver,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    max_shard_size: int | None = None,
    required: Sequence[str] = ("video",),
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``records`` and their media as webdataset shards under ``out_dir``; returns the index.

    Args:
        records: annotation records (e.g. from :func:`gram.data.annotations.read_annotations`).
        media_resolver: record -> ``{"video"|"audio"|"depth": Path or None}`` (see :func:`media_resolver`).
        samples_per_shard: the most samples in one shard.
        max_shard_size: the most media bytes in one shard (None: no limit); a larger single sample gets
            a shard of its own.
        required: roles a record must have a file for; records without are skipped, listed in
            ``missing_ids.txt`` and counted in the index (never dropped silently). Records whose captions are
            all empty (``check_dataset.py``'s "empty caption") are skipped too, with one warning, and listed in
            the index's ``empty_caption_ids``.
        source: the annotation file, recorded in the index.

    Returns:
        The ``index.json`` content: ``shards`` ([{"file", "samples", "bytes"}]), ``total``, ``source``,
        ``num_missing``, ``missing_ids_file``, ``duplicate_ids``, ``empty_caption_ids``, and this run's
        ``written``/``reused`` shard names (those two are not stored in the file).
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planned, missing, duplicates, empty = _collect(records, media_resolver, required)
    if not planned:
        raise ShardError(f"no record has the required media ({', '.join(required)}) and a caption; "
                         f"{len(missing)} missing media, {len(empty)} with only empty captions; see the media "
                         f"folders and captions given for {source or 'the annotations'}")
    plan = _plan_shards(planned, samples_per_shard, max_shard_size)
    (out / INDEX_FILE).unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    written, reused = [], []
    for number, samples in enumerate(plan):
        path = out / SHARD_NAME.format(number)
        if _tar_members(path) == _expected_members(samples):
            reused.append(path.name)
            continue
        _write_shard(path, samples)
        written.append(path.name)
    removed = _remove_stale(out, len(plan))
    (out / MISSING_FILE).write_text("".join(f"{i}\n" for i in missing), encoding="utf-8")
    index = {
        "format": INDEX_FORMAT, "source": source, "samples_per_shard": samples_per_shard,
        "max_shard_size": max_shard_size, "total": len(planned), "num_missing": len(missing),
        "missing_ids_file": MISSING_FILE, "duplicate_ids": duplicates, "empty_caption_ids": empty,
        "shards": [{"file": SHARD_NAME.format(i), "samples": len(s), "bytes": (out / SHARD_NAME.format(i)).stat().st_size}
                   for i, s in enumerate(plan)],
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return {**index, "written": written, "reused": reused, "removed": removed}


# ============================================================================================== shard sets


@dataclass(frozen=True)
class ShardSet:
    """One source of a mixture: its shard urls and their sample counts (the counts drive exact resume)."""

    name: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    missing: int = 0  # annotated items left out when the shards were built (no media, empty caption)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def missing_fraction(self) -> float:
        """Fraction of the annotated items that did not make it into the shards."""
        return self.missing / max(self.total + self.missing, 1)


def load_shard_set(source: str) -> ShardSet:
    """A shard set from an ``index.json`` (or a folder holding one) or a brace pattern of local tars.

    A pattern (``dir/shard-{000000..000099}.tar``) has its samples counted from the tar headers, a one-off
    scan at start-up; an index (written by ``scripts/make_shards.py``) needs none.
    """
    path = Path(source)
    if path.is_dir():
        path = path / INDEX_FILE
    if path.name.endswith(".json"):
        return _read_index(path)
    urls = wds.shardlists.expand_urls(source)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardError(f"shard source {source!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}; give an "
                         f"index.json written by scripts/make_shards.py or a pattern of existing .tar files")
    return ShardSet(source, tuple(urls), tuple(_count_samples(Path(u)) for u in urls))


def _read_index(path: Path) -> ShardSet:
    if not path.is_file():
        raise ShardError(f"shard index {path} not found; build it with scripts/make_shards.py --out {path.parent}")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != INDEX_FORMAT or not index.get("shards"):
        raise ShardError(f"{path} is not a shard index of format {INDEX_FORMAT} with shards; rebuild it with "
                         f"scripts/make_shards.py")
    urls = tuple(str(path.parent / s["file"]) for s in index["shards"])
    left_out = int(index.get("num_missing", 0)) + len(index.get("empty_caption_ids", ()))
    return ShardSet(str(path), urls, tuple(int(s["samples"]) for s in index["shards"]), left_out)


def _count_samples(path: Path) -> int:
    members = _tar_members(path)
    if members is None:
        raise ShardError(f"cannot read shard {path} (not a tar file?)")
    return len({wds.tariterators.base_plus_ext(name)[0] for name, _ in members} - {None})


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in order: ``{"__key__", "__url__", "json", "<role>.<ext>": bytes}``."""
    return wds.tariterators.tarfile_samples([{"url": url}])


# ============================================================================================== sampling


def slot_shards(num_shards: int, seed: int, source: int, epoch: int, pass_index: int, slot: int,
                num_slots: int) -> list[int]:
    """Shard numbers slot ``slot`` of ``num_slots`` reads in one pass, in its reading order.

    The pass's shard permutation is shared by all slots (same seed) and dealt round-robin, so the slots of
    a pass partition the shards.
    """
    order = np.random.default_rng([seed, source, epoch, pass_index]).permutation(num_shards)
    return order[slot::num_slots].tolist()


def shard_blocks(shards: Sequence[int], counts: Sequence[int], shuffle_buffer: int) -> list[list[int]]:
    """Consecutive groups of whole shards holding at least ``shuffle_buffer`` samples (the last may hold fewer)."""
    blocks, current, held = [], [], 0
    for shard in shards:
        current.append(shard)
        held += counts[shard]
        if held >= shuffle_buffer:
            blocks.append(current)
            current, held = [], 0
    if current:
        blocks.append(current)
    return blocks


def _read_block(shard_set: ShardSet, block: Sequence[int]) -> list[dict[str, Any]]:
    """Every raw sample of the block's shards; a count that differs from the index is an error (the index
    positions are what resume relies on)."""
    samples = []
    for shard in block:
        found = list(read_shard(shard_set.urls[shard]))
        if len(found) != shard_set.counts[shard]:
            raise ShardError(f"{shard_set.urls[shard]} holds {len(found)} samples but {shard_set.name} says "
                             f"{shard_set.counts[shard]}; the shards changed after indexing: rebuild the index")
        samples.extend(found)
    return samples


def iter_source(shard_set: ShardSet, source: int, seed: int, epoch: int, slot: int, num_slots: int,
                shuffle_buffer: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Endless raw samples of one source for one slot in epoch ``epoch``, after skipping the first ``skip``.

    Skipped blocks are never read; only the block holding the resume point is (then its head dropped).
    """
    if len(shard_set.urls) < num_slots:
        raise ShardError(f"{shard_set.name} has {len(shard_set.urls)} shards, fewer than the {num_slots} readers "
                         f"(ranks x loader workers); write smaller shards (make_shards.py --samples-per-shard)")
    for pass_index in itertools.count():
        shards = slot_shards(len(shard_set.urls), seed, source, epoch, pass_index, slot, num_slots)
        for block in shard_blocks(shards, shard_set.counts, shuffle_buffer):
            size = sum(shard_set.counts[s] for s in block)
            if skip >= size:
                skip -= size
                continue
            samples = _read_block(shard_set, block)
            order = np.arange(size)
            if shuffle_buffer > 1:
                order = np.random.default_rng([seed, source, epoch, pass_index, block[0]]).permutation(size)
            for i in order[skip:]:
                yield samples[i]
            skip = 0


def mixture_choices(weights: Sequence[float], seed: int, epoch: int, slot: int, num_samples: int) -> np.ndarray:
    """The source of each of a slot's ``num_samples`` samples in one epoch, drawn with probabilities
    proportional to ``weights``: (num_samples,) int64."""
    p = np.asarray(weights, dtype=np.float64)
    return np.random.default_rng([seed, epoch, slot]).choice(len(p), size=num_samples, p=p / p.sum())


def iter_slot(sets: Sequence[ShardSet], weights: Sequence[float], seed: int, epoch: int, slot: int, num_slots: int,
              shuffle_buffer: int, num_samples: int, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(source index, raw sample) for positions ``start .. num_samples - 1`` of a slot's epoch."""
    choices = mixture_choices(weights, seed, epoch, slot, num_samples)
    done = np.bincount(choices[:start], minlength=len(sets))
    # Generators start lazily: a source this slot never draws from is never opened.
    streams = [iter_source(s, i, seed, epoch, slot, num_slots, shuffle_buffer, int(done[i]))
               for i, s in enumerate(sets)]
    for choice in choices[start:]:
        yield int(choice), next(streams[choice])


# ============================================================================================== decoding


def _member(sample: dict[str, Any], role: str) -> tuple[str, bytes] | None:
    """(extension, bytes) of the sample's ``<role>.<ext>`` member, or None."""
    for name, value in sample.items():
        if name.startswith(role + "."):
            return name[len(role) + 1:], value
    return None


@contextlib.contextmanager
def _spooled(data: bytes, ext: str) -> Iterator[Path]:
    """The bytes as a temporary file with their extension (the decoders take paths and dispatch on ``.npy``)."""
    with tempfile.NamedTemporaryFile(suffix=f".{ext}") as handle:
        handle.write(data)
        handle.flush()
        yield Path(handle.name)


class ShardDecoder:
    """Raw shard sample -> the item dict of :meth:`VideoTextDataset.__getitem__` (the same `ItemBuilder`).

    Items: ``{"id", "caption", "video": (n, 3, S, S), "audio": (n_a, T, F), "audio_mask", "subtitle",
    "depth"}`` for the requested modalities, or ``{"id", "failed": message}`` when a member cannot be decoded
    (the message names the shard and sample): training drops and counts it, evaluation collects it with the other
    unusable ids (`gram.eval.retrieval.usable_items`).
    """

    def __init__(self, data: DataConfig, modalities: Sequence[str], training: bool):
        self.build = ItemBuilder(data, modalities, training)

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        record = AnnotationRecord(**json.loads(sample["json"]))
        return self.build(record, lambda role: _member_file(sample, role), generator)


@contextlib.contextmanager
def _member_file(sample: dict[str, Any], role: str) -> Iterator[Path | None]:
    """The sample's ``role`` member as a temporary file (audio falls back to the video's own track), or None;
    decoding errors inside the block are re-raised naming the shard and sample."""
    if role == "audio" and _member(sample, "audio") is None:
        role = "video"
    member = _member(sample, role)
    if member is None:
        yield None
        return
    ext, data = member
    try:
        with _spooled(data, ext) as path:
            yield path
    except MediaError as err:
        raise type(err)(f"{sample.get('__url__')}:{sample['__key__']}.{role}.{ext}: {err}") from err


# ============================================================================================== stream


@dataclass(frozen=True)
class _EpochPlan:
    """Everything a loader worker needs to produce its share of one epoch from a resume point."""

    sets: tuple[ShardSet, ...]
    weights: tuple[float, ...]
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    workers: int  # reader slots per rank: max(1, num_workers)
    num_slots: int
    micro_batch: int
    batches: int  # per rank in this epoch
    batches_done: int


def _worker_batches(total: int, workers: int, worker: int) -> int:
    """Batches among the first ``total`` of a rank that come from worker ``worker`` (batch i from worker i % workers)."""
    return max(0, (total - worker + workers - 1) // workers)


class _ShardIterable(IterableDataset):
    """One epoch (from ``plan.batches_done`` on) of decoded items for this rank, split over the loader workers.

    DataLoader takes batches from its workers round-robin starting at worker 0, so loader worker ``k``
    serves slot ``(k + batches_done) % workers``: the next batch then comes from the slot that owns it.
    """

    def __init__(self, plan: _EpochPlan, decoder: ShardDecoder):
        self.plan, self.decoder = plan, decoder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        info = get_worker_info()
        worker = ((info.id if info else 0) + p.batches_done) % p.workers
        start = _worker_batches(p.batches_done, p.workers, worker) * p.micro_batch
        stop = _worker_batches(p.batches, p.workers, worker) * p.micro_batch
        slot = p.rank * p.workers + worker
        samples = iter_slot(p.sets, p.weights, p.seed, p.epoch, slot, p.num_slots, p.shuffle_buffer, stop, start)
        for source, sample in samples:
            generator = torch.Generator().manual_seed(_sample_seed(p.seed, p.epoch, source, sample["__key__"]))
            yield self.decoder(sample, generator)


class ShardStream(EpochStream):
    """Endless training batches from a shard mixture; the interface of :class:`gram.data.loader.TrainStream`.

    ``state()`` is ``{"epoch", "batches_done", ...}`` and is the same on every rank; ``load_state`` resumes
    exactly when world size and worker count are those of the saved run (see the module docstring).
    """

    def __init__(self, config: ShardsConfig, decoder: ShardDecoder, collate: Callable, micro_batch: int,
                 num_workers: int, seed: int, rank: int | None = None, world_size: int | None = None):
        self.config, self.decoder, self.collate = config, decoder, collate
        self.micro_batch, self.num_workers, self.seed = micro_batch, num_workers, seed
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.sets = tuple(load_shard_set(s) for s in config.sources)
        self.workers = max(1, num_workers)
        self._check_shard_counts()
        per_epoch = config.samples_per_epoch or sum(s.total for s in self.sets)
        self.batches_per_epoch = per_epoch // (self.world_size * micro_batch)
        if self.batches_per_epoch < 1:
            raise ShardError(f"an epoch of {per_epoch} samples is less than one global batch ({micro_batch} x "
                             f"{self.world_size} ranks); raise data.shards.samples_per_epoch or lower the batch size")
        self.epoch, self.batches_done = 0, 0
        self._iterator: Iterator[Any] | None = None
        for shard_set in self.sets:
            if shard_set.missing:
                log.warning("%s: %d of %d annotated items were left out when the shards were built (their ids are in %s "
                            "and the index's empty_caption_ids); they count towards data.max_failed_fraction",
                            shard_set.name, shard_set.missing, shard_set.total + shard_set.missing, MISSING_FILE)

    @property
    def missing_fraction(self) -> float:
        """Fraction of the items drawn that the shards lack (left out at build time), by the mixture weights."""
        weights = self.config.source_weights()
        return sum(w * s.missing_fraction for w, s in zip(weights, self.sets)) / sum(weights)

    def _check_shard_counts(self) -> None:
        slots = self.world_size * self.workers
        for s in self.sets:
            if len(s.urls) < slots:
                raise ShardError(f"{s.name} has {len(s.urls)} shards, fewer than the {slots} readers ({self.world_size} "
                                 f"ranks x {self.workers} workers); write smaller shards (--samples-per-shard)")

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world_size": self.world_size,
                "num_workers": self.num_workers, "sources": [s.name for s in self.sets],
                "samples_per_source": self.samples_per_source()}

    def samples_per_source(self) -> list[int]:
        """Samples this rank drew from each source so far in the current epoch (for logs)."""
        counts = np.zeros(len(self.sets), dtype=np.int64)
        for worker in range(self.workers):
            n = _worker_batches(self.batches_done, self.workers, worker) * self.micro_batch
            choices = mixture_choices(self.config.source_weights(), self.seed, self.epoch,
                                      self.rank * self.workers + worker, n)
            counts += np.bincount(choices, minlength=len(self.sets))
        return counts.tolist()

    def load_state(self, state: dict[str, Any]) -> None:
        saved = (state.get("world_size"), state.get("num_workers"), state.get("sources"))
        now = (self.world_size, self.num_workers, [s.name for s in self.sets])
        if saved != now:
            log.warning("shard stream resumed with (world size, workers, sources) %s instead of %s: it restarts at "
                        "epoch %d batch %d under the new layout, not at the exact sample", now, saved,
                        state["epoch"], state["batches_done"])
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self._iterator = None

    def _start_epoch(self) -> Iterator[Any]:
        plan = _EpochPlan(self.sets, tuple(self.config.source_weights()), self.config.shuffle_buffer, self.seed,
                          self.epoch, self.rank, self.workers, self.world_size * self.workers, self.micro_batch,
                          self.batches_per_epoch, self.batches_done)
        # An own generator: starting a loader must not draw from the global RNG (resumed runs would drift).
        loader = DataLoader(_ShardIterable(plan, self.decoder), batch_size=self.micro_batch,
                            num_workers=self.num_workers, collate_fn=self.collate, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.seed + self.epoch),
                            pin_memory=torch.cuda.is_available(), worker_init_fn=leave_signals_to_main)
        return iter(loader)

