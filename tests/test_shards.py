"""webdataset shards: writing (round trip, rerun), decoding parity with the map-style dataset, rank/worker
splitting, mixture weights and exact resume, on shards built from a small generated sample dataset."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gram.config import DataConfig, DatasetConfig
from gram.data.annotations import read_annotations
from gram.data.dataset import Collator, VideoTextDataset
from gram.data.sample import generate_sample_dataset
from gram.data.shards import (
    ShardDecoder,
    ShardError,
    ShardsConfig,
    ShardStream,
    iter_slot,
    iter_source,
    load_shard_set,
    media_resolver,
    mixture_choices,
    read_shard,
    sample_key,
    slot_shards,
    write_shards,
)
from gram.data.tokenizer import load_tokenizer
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"
MODALITIES = ("video", "audio", "subtitle")


def small_data(**overrides) -> DataConfig:
    """Tiny frames and audio clips so decoding stays fast."""
    return DataConfig(num_frames=2, test_num_frames=2, image_size=32, audio_target_length=64, transform="crop_flip",
                      **overrides)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return generate_sample_dataset(tmp_path_factory.mktemp("sample"), num_train=16, num_test=8, seed=3)


def split_config(sample: dict, split: str, annotations: Path | None = None) -> DatasetConfig:
    return DatasetConfig(annotations=str(annotations or sample["annotations"][split]),
                         video_dir=str(sample["videos"]), audio_dir=str(sample["audios"]))


def build(sample: dict, split: str, out: Path, per_shard: int, annotations: Path | None = None, **kw) -> dict:
    cfg = split_config(sample, split, annotations)
    return write_shards(read_annotations(cfg.annotations), media_resolver(cfg), out, per_shard,
                        source=cfg.annotations, **kw)


@pytest.fixture(scope="module")
def train_shards(sample, tmp_path_factory) -> Path:
    """16 clips in 4 shards of 4."""
    out = tmp_path_factory.mktemp("train_shards")
    build(sample, "train", out, 4)
    return out / "index.json"


@pytest.fixture(scope="module")
def test_shards(sample, tmp_path_factory) -> Path:
    """8 clips in 4 shards of 2."""
    out = tmp_path_factory.mktemp("test_shards")
    build(sample, "test", out, 2)
    return out / "index.json"


def all_samples(index: Path) -> list[dict]:
    return [s for url in load_shard_set(str(index)).urls for s in read_shard(url)]


# ------------------------------------------------------------------------------------------------ writing


def test_round_trip_keeps_bytes_and_records_and_reports_missing(sample, tmp_path):
    records = json.loads(Path(sample["annotations"]["train"]).read_text())
    ghost = {"video_id": "ghost/clip.1", "desc": "a clip whose video was never downloaded"}
    annotations = tmp_path / "train_plus_ghost.json"
    annotations.write_text(json.dumps([*records, ghost]))
    index = build(sample, "train", tmp_path / "out", 5, annotations=annotations)

    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 1]
    assert index["total"] == 16 and index["num_missing"] == 1
    assert (tmp_path / "out" / "missing_ids.txt").read_text().split() == ["ghost/clip.1"]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["total"] == 16
    expected = {r.video_id: r for r in read_annotations(annotations) if r.video_id != "ghost/clip.1"}
    seen = Counter()
    for shard in load_shard_set(str(tmp_path / "out")).urls:
        for s in read_shard(shard):
            record = json.loads(s["json"])
            seen[record["video_id"]] += 1
            assert record == dataclasses.asdict(expected[record["video_id"]])
            assert s["__key__"] == sample_key(record["video_id"])
            assert s["video.mp4"] == (Path(sample["videos"]) / f"{record['video_id']}.mp4").read_bytes()
            audio = [name for name in s if name.startswith("audio.")]
            files = sorted(Path(sample["audios"]).glob(f"{record['video_id']}.*"))
            assert [f"audio{f.suffix}" for f in files] == audio
            if files:
                assert s[audio[0]] == files[0].read_bytes()
    assert seen == Counter(list(expected))  # every clip with media, each in exactly one shard


def test_rerun_reuses_finished_shards_and_rewrites_damaged_ones(sample, tmp_path):
    first = build(sample, "test", tmp_path, 3)
    assert first["written"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    original = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(original[:1000])  # an interrupted copy
    (tmp_path / "shard-000007.tar").write_bytes(b"left from a larger earlier plan")
    again = build(sample, "test", tmp_path, 3)
    assert again["written"] == ["shard-000001.tar"]
    assert again["reused"] == ["shard-000000.tar", "shard-000002.tar"]
    assert again["removed"] == ["shard-000007.tar"]
    assert (tmp_path / "shard-000001.tar").read_bytes() == original  # a shard is a pure function of its samples
    changed = tmp_path / "changed.json"  # a caption edited in place: only the shard holding it is rewritten
    records = json.loads(Path(sample["annotations"]["test"]).read_text())
    records[4]["desc"] += " at dusk"
    changed.write_text(json.dumps(records))
    assert build(sample, "test", tmp_path, 3, annotations=changed)["written"] == ["shard-000001.tar"]


def test_max_shard_size_bounds_media_bytes(sample, tmp_path):
    sizes = {p.stem: p.stat().st_size for p in Path(sample["videos"]).glob("*.mp4")}
    sizes.update({p.stem: sizes[p.stem] + p.stat().st_size for p in Path(sample["audios"]).iterdir()})
    limit = 100_000  # about two mp4+mp3 clips; a clip with a WAV file is larger alone
    index = build(sample, "test", tmp_path, 100, max_shard_size=limit)
    assert len(index["shards"]) > 2 and index["total"] == 8
    for shard in load_shard_set(str(tmp_path)).urls:
        media = [sizes[json.loads(s["json"])["video_id"]] for s in read_shard(shard)]
        assert sum(media) <= limit or len(media) == 1


def test_sample_keys_are_clean_and_unique():
    ids = ["clip_1-x", "a.b", "a_b", "a/b", "v 1", "v.1"]
    keys = [sample_key(i) for i in ids]
    assert keys[0] == "clip_1-x" and keys[2] == "a_b"
    assert len(set(keys)) == len(ids)
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for k in keys)


def test_make_shards_script(sample, tmp_path, capsys):
    script = load_script("make_shards")
    assert script.parse_size("2GB") == 2 * 10**9 and script.parse_size("512MiB") == 512 * 2**20
    code = script.main(["--annotations", str(sample["annotations"]["test"]), "--video-dir", str(sample["videos"]),
                        "--audio-dir", str(sample["audios"]), "--out", str(tmp_path), "--samples-per-shard", "3",
                        "--require-audio-file"])
    assert code == 0
    index = json.loads((tmp_path / "index.json").read_text())
    without_audio = sorted(r.video_id for r in read_annotations(sample["annotations"]["test"])
                           if not list(Path(sample["audios"]).glob(f"{r.video_id}.*")))
    assert index["num_missing"] == len(without_audio) > 0
    assert (tmp_path / "missing_ids.txt").read_text().split() == without_audio
    assert f"samples:       {8 - len(without_audio)}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ decoding


def test_decoding_from_shards_equals_the_map_dataset(sample, train_shards):
    data = small_data()
    dataset = VideoTextDataset(split_config(sample, "train"), data, MODALITIES, training=False)
    # audio from the mp4's own track, from an MP3 file, from a WAV file (decoding every clip only adds time)
    chosen = ["clip00000", "clip00001", "clip00005"]
    reference = {r.video_id: dataset[i] for i, r in enumerate(dataset.records) if r.video_id in chosen}
    decode = ShardDecoder(data, MODALITIES, training=False)
    samples = [s for s in all_samples(train_shards) if json.loads(s["json"])["video_id"] in chosen]
    assert sorted(name for s in samples for name in s if "." in name) == ["audio.mp3", "audio.wav", "video.mp4",
                                                                          "video.mp4", "video.mp4"]
    decoded = [decode(s, torch.Generator().manual_seed(0)) for s in samples]
    assert sorted(item["id"] for item in decoded) == chosen
    for item in decoded:
        ref = reference[item["id"]]
        assert item["video"].shape == (2, 3, 32, 32) and torch.equal(item["video"], ref["video"])
        assert item["audio"].shape == (1, 64, 64) and torch.equal(item["audio"], ref["audio"])
        assert (item["caption"], item["subtitle"], item["audio_mask"]) == (ref["caption"], ref["subtitle"],
                                                                           ref["audio_mask"])
    # clip00000 has no separate audio file: its audio comes from the mp4's own track, as in the map dataset
    assert next(item for item in decoded if item["id"] == "clip00000")["audio_mask"] is True


def test_undecodable_member_is_a_failed_item_naming_the_shard_and_sample(train_shards):
    """Training drops and counts it; evaluation collects it with every other unusable id (test_faults_eval)."""
    good = all_samples(train_shards)[0]
    broken = {**good, "video.mp4": b"not a video at all"}
    generator = torch.Generator().manual_seed(0)
    for training in (True, False):
        item = ShardDecoder(small_data(), MODALITIES, training=training)(broken, generator)
        assert set(item) == {"id", "failed"} and item["id"] == json.loads(good["json"])["video_id"]
        assert good["__url__"] in item["failed"] and f"{good['__key__']}.video.mp4" in item["failed"]


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("num_slots", [1, 3, 4])
def test_slots_partition_every_pass(train_shards, num_slots):
    shard_set = load_shard_set(str(train_shards))
    everything = sorted(s["__key__"] for s in all_samples(train_shards))
    for epoch, pass_index in [(0, 0), (0, 1), (2, 0)]:
        keys = []
        for slot in range(num_slots):
            sizes = [sum(shard_set.counts[s] for s in slot_shards(len(shard_set.urls), 7, 0, epoch, p, slot,
                                                                  num_slots)) for p in range(pass_index + 1)]
            stream = iter_source(shard_set, 0, 7, epoch, slot, num_slots, shuffle_buffer=6, skip=sum(sizes[:-1]))
            keys += [next(stream)["__key__"] for _ in range(sizes[-1])]
        assert sorted(keys) == everything  # each sample exactly once over all slots of the pass


def test_shuffle_is_seeded(train_shards):
    shard_set = load_shard_set(str(train_shards))

    def order(seed: int, epoch: int) -> list[str]:
        stream = iter_source(shard_set, 0, seed, epoch, 0, 1, shuffle_buffer=8)
        return [next(stream)["__key__"] for _ in range(16)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert order(1, 0) != sorted(order(1, 0))  # 16! orders: sorted by chance is impossible in practice


def test_ranks_and_workers_see_every_sample_once_per_epoch(sample, train_shards):
    """2 ranks x 2 loader workers = 4 readers of 4 shards; an epoch of 16 samples covers the set exactly."""
    config = ShardsConfig(sources=[str(train_shards)], shuffle_buffer=4, samples_per_epoch=16)
    ids = []
    for rank in range(2):
        stream = ShardStream(config, ShardDecoder(small_data(), MODALITIES, training=True), _stack, micro_batch=2,
                             num_workers=2, seed=5, rank=rank, world_size=2)
        assert stream.batches_per_epoch == 4
        ids += [i for _ in range(4) for i in next(stream)["ids"]]
        assert stream.state()["epoch"] == 0
    expected = [r.video_id for r in read_annotations(sample["annotations"]["train"])]
    assert sorted(ids) == sorted(expected)


def test_mixture_follows_the_weights(train_shards, test_shards):
    weights = [3.0, 1.0]
    # chi-square goodness of fit of many cheap draws: 99.9 % quantile of chi2(1) is 10.83
    counts = np.bincount(mixture_choices(weights, 11, 0, 0, 20000), minlength=2)
    expected = 20000 * np.array(weights) / sum(weights)
    assert ((counts - expected) ** 2 / expected).sum() < 10.83
    # the samples really come from the drawn source (binomial bound of 4 sd on 400 draws)
    sets = [load_shard_set(str(train_shards)), load_shard_set(str(test_shards))]
    keys = [{s["__key__"] for s in all_samples(p)} for p in (train_shards, test_shards)]
    drawn = list(iter_slot(sets, weights, 11, 0, 0, 1, shuffle_buffer=4, num_samples=400))
    assert all(s["__key__"] in keys[source] for source, s in drawn)
    first = sum(1 for source, _ in drawn if source == 0)
    assert abs(first - 300) <= 4 * math.sqrt(400 * 0.75 * 0.25)
    first_pass = [s["__key__"] for source, s in drawn if source == 1][:8]
    assert sorted(first_pass) == sorted(keys[1])  # a source repeats nothing before it has given everything


# ------------------------------------------------------------------------------------------------ stream


def _stack(items: list[dict]) -> dict:
    """A tokenizer-free collate for the splitting test."""
    good = [it for it in items if "failed" not in it]
    return {"ids": [it["id"] for it in good], "skipped": [it["failed"] for it in items if "failed" in it]}


def test_resume_gives_the_same_next_batches(sample, train_shards, test_shards):
    """Mixture, shuffle, 2 workers, random frames/crops/captions: k batches, save, restore == continue."""
    collate = Collator(load_tokenizer(sample["vocab"]), max_text_len=16, max_subtitle_len=16)
    config = ShardsConfig(sources=[str(train_shards), str(test_shards)], weights=[2.0, 1.0], shuffle_buffer=6,
                          samples_per_epoch=10)

    def make() -> ShardStream:
        return ShardStream(config, ShardDecoder(small_data(), MODALITIES, training=True), collate, micro_batch=2,
                           num_workers=2, seed=9, rank=0, world_size=1)

    stream = make()
    assert stream.batches_per_epoch == 5
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state()))  # survives a JSON checkpoint
    assert sum(state["samples_per_source"]) == 6
    continued = [next(stream) for _ in range(4)]  # crosses into epoch 1
    assert stream.state()["epoch"] == 1
    restored = make()
    restored.load_state(state)
    resumed = [next(restored) for _ in range(4)]
    for a, b in zip(continued, resumed):
        assert a["ids"] == b["ids"]
        for key in ("video", "audio", "audio_mask"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["text"]["input_ids"], b["text"]["input_ids"])
    assert len({i for b in continued[:2] for i in b["ids"]}) == 4  # real, distinct samples


def test_config_and_layout_errors(train_shards, test_shards):
    with pytest.raises(ValueError, match="weights"):
        ShardsConfig(sources=[str(train_shards)], weights=[1.0, 2.0])
    with pytest.raises(ShardError, match="index"):
        load_shard_set(str(Path(train_shards).parent / "nowhere"))
    config = ShardsConfig(sources=[str(test_shards)], samples_per_epoch=64)
    with pytest.raises(ShardError, match="fewer than the 6 readers"):
        ShardStream(config, ShardDecoder(small_data(), MODALITIES, True), _stack, 2, num_workers=3, seed=0,
                    rank=0, world_size=2)


def test_pattern_source_counts_samples_from_the_tars(train_shards):
    pattern = str(Path(train_shards).parent / "shard-{000000..000003}.tar")
    assert load_shard_set(pattern).counts == load_shard_set(str(train_shards)).counts == (4, 4, 4, 4)


def test_items_left_out_at_build_time_count_towards_the_failure_limit(sample, train_shards, tmp_path, caplog):
    """A clip without media never reaches a shard; the index counts it, the stream weighs it by the mixture, and
    the trainer adds it to the clips that fail to load (and refuses to start when it alone passes the limit)."""
    from gram.main import to_dataclass
    from gram.train.trainer import TooManyFailedSamplesError, Trainer
    from tests.conftest import compose_config

    records = json.loads(Path(sample["annotations"]["train"]).read_text())
    ghosts = [{"video_id": f"ghost{i}", "desc": "never downloaded"} for i in range(4)]
    annotations = tmp_path / "train_plus_ghosts.json"
    annotations.write_text(json.dumps([*records, *ghosts]))
    build(sample, "train", tmp_path / "holes", 4, annotations=annotations)
    holes = tmp_path / "holes" / "index.json"
    assert load_shard_set(str(holes)).missing_fraction == pytest.approx(4 / 20)
    assert load_shard_set(str(train_shards)).missing_fraction == 0

    def stream(weights: list[float]) -> ShardStream:
        config = ShardsConfig(sources=[str(holes), str(train_shards)], weights=weights, shuffle_buffer=4)
        return ShardStream(config, ShardDecoder(small_data(), MODALITIES, training=True), _stack, micro_batch=2,
                           num_workers=0, seed=1, rank=0, world_size=1)

    assert stream([1.0, 3.0]).missing_fraction == pytest.approx(0.25 * 0.2)  # by the mixture weights
    assert "4 of 20 annotated items were left out when the shards were built" in caplog.text

    def trainer(limit: float) -> Trainer:
        cfg = to_dataclass(compose_config("trainer.device=cpu", "logger.wandb.mode=disabled",
                                          f"data.max_failed_fraction={limit}"))
        return Trainer(cfg, torch.nn.Linear(2, 2), stream([1.0, 3.0]), torch.device("cpu"), {}, str(tmp_path))

    assert trainer(0.1).missing_fraction == pytest.approx(0.05)
    with pytest.raises(TooManyFailedSamplesError, match=r"^5\.0% of the annotated training items .*=0\.04;"):
        trainer(0.04)
