"""The generated sample dataset: real decodable media, parseable annotations, determinism,
caching, and content that matches what the captions say (the tie a model has to learn)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from gram.data.sample import (
    BEEPS_PER_SECOND,
    COLOUR_RGB,
    MOTION_DIRECTION,
    PITCH_HZ,
    SAMPLE_ATTRIBUTES,
    SYNONYMS,
    MediaSpec,
    generate_sample_dataset,
)
from gram.data.tokenizer import load_tokenizer

NUM_TRAIN, NUM_TEST = 12, 6
MEDIA = MediaSpec()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return generate_sample_dataset(root, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3, workers=1)


def load_records(info, split):
    return json.loads(info["annotations"][split].read_text(encoding="utf-8"))


def all_records(info):
    return load_records(info, "train") + load_records(info, "test")


def decode_video(path):
    """RGB frames [T, H, W, 3] uint8 of an mp4's video stream."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def decode_audio(path):
    """(mono waveform [N] float32, sample rate) of a file's first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        # Convert every codec's sample format (s16 for WAV, fltp for AAC/MP3) to float in [-1, 1].
        to_float = av.AudioResampler(format="flt", layout="mono", rate=stream.sample_rate)
        frames = [out for frame in container.decode(stream) for out in to_float.resample(frame)]
        frames += to_float.resample(None)
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames]), stream.sample_rate


def separate_audio_file(info, video_id):
    matches = sorted(info["audios"].glob(f"{video_id}.*"))
    assert len(matches) <= 1
    return matches[0] if matches else None


def foreground_mask(frame):
    """Pixels that differ from the background colour (the frame's corner pixel). frame: [H, W, 3]."""
    return np.abs(frame.astype(int) - frame[0, 0].astype(int)).sum(axis=-1) > 60  # [H, W]


# ------------------------------------------------------------------ files and formats


def test_video_files_are_h264_with_an_aac_track(dataset):
    for record in all_records(dataset):
        path = dataset["videos"] / f"{record['video_id']}.mp4"
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert (video.codec_context.name, video.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert audio.codec_context.name == "aac"
            assert audio.sample_rate == MEDIA.video_sample_rate
        frames = decode_video(path)
        assert frames.shape == (round(MEDIA.fps * MEDIA.duration_s), MEDIA.frame_size, MEDIA.frame_size, 3)


def test_separate_audio_files_decode_and_some_clips_have_none(dataset):
    records = all_records(dataset)
    files = {rec["video_id"]: separate_audio_file(dataset, rec["video_id"]) for rec in records}
    missing = [vid for vid, path in files.items() if path is None]
    assert 2 <= len(missing) < len(records) / 2
    assert dataset["num_without_audio_file"] == len(missing)
    suffixes = {path.suffix for path in files.values() if path is not None}
    assert suffixes == {".mp3", ".wav"}
    for path in filter(None, files.values()):
        wave, rate = decode_audio(path)
        assert rate == MEDIA.audio_file_sample_rate
        assert len(wave) >= MEDIA.duration_s * rate
        assert 0.05 < np.abs(wave).max() <= 1.0


def test_annotations_parse_as_records(dataset):
    ids = set()
    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        records = load_records(dataset, split)
        assert isinstance(records, list) and len(records) == count
        for rec in records:
            assert isinstance(rec["video_id"], str) and rec["video_id"] not in ids
            ids.add(rec["video_id"])
            assert isinstance(rec["desc"], str) and rec["desc"]
            assert isinstance(rec["subtitle"], str)
            assert set(rec["attributes"]) == set(SAMPLE_ATTRIBUTES)
            for name, value in rec["attributes"].items():
                assert value in SAMPLE_ATTRIBUTES[name]
            assert rec["label"] == rec["attributes"]["shape"]
    test_combos = [tuple(rec["attributes"].values()) for rec in load_records(dataset, "test")]
    assert len(set(test_combos)) == len(test_combos)


def test_bad_counts_raise(tmp_path):
    with pytest.raises(ValueError, match="num_train=0"):
        generate_sample_dataset(tmp_path, num_train=0, num_test=2)
    with pytest.raises(ValueError, match="num_test=5000"):
        generate_sample_dataset(tmp_path, num_train=1, num_test=5000)


# ------------------------------------------------------------------ determinism and cache


def test_same_seed_same_dataset_other_seed_differs(dataset, tmp_path):
    again = generate_sample_dataset(tmp_path / "a", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3, workers=2)
    other = generate_sample_dataset(tmp_path / "b", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=4, workers=1)
    for split in ("train", "test"):
        assert again["annotations"][split].read_bytes() == dataset["annotations"][split].read_bytes()
        assert other["annotations"][split].read_bytes() != dataset["annotations"][split].read_bytes()
    assert again["vocab"].read_bytes() == dataset["vocab"].read_bytes()
    first_id = load_records(dataset, "train")[0]["video_id"]
    reference = decode_video(dataset["videos"] / f"{first_id}.mp4")
    assert np.array_equal(decode_video(again["videos"] / f"{first_id}.mp4"), reference)
    assert not np.array_equal(decode_video(other["videos"] / f"{first_id}.mp4"), reference)


def test_second_call_is_cached_and_a_new_key_regenerates(tmp_path):
    first = generate_sample_dataset(tmp_path, num_train=4, num_test=2, workers=1)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    second = generate_sample_dataset(tmp_path, num_train=4, num_test=2, workers=1)
    assert first["generated"] and not second["generated"]
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    smaller = generate_sample_dataset(tmp_path, num_train=2, num_test=2, workers=1)
    assert smaller["generated"]
    assert len(load_records(smaller, "train")) == 2
    # Files of the old, larger generation are removed, not left to be picked up by a loader.
    assert len(list(smaller["videos"].glob("*.mp4"))) == 4


def test_deleted_file_triggers_regeneration(tmp_path):
    info = generate_sample_dataset(tmp_path, num_train=2, num_test=1, workers=1)
    video = next(info["videos"].glob("*.mp4"))
    video.unlink()
    assert generate_sample_dataset(tmp_path, num_train=2, num_test=1, workers=1)["generated"]
    assert video.is_file()


# ------------------------------------------------------------------ content matches the text


def nearest_colour(rgb):
    names = list(COLOUR_RGB)
    distances = [np.linalg.norm(np.array(COLOUR_RGB[name]) - rgb) for name in names]
    return names[int(np.argmin(distances))]


def test_dominant_colour_of_middle_frame_is_the_caption_colour(dataset):
    for rec in all_records(dataset):
        frames = decode_video(dataset["videos"] / f"{rec['video_id']}.mp4")
        middle = frames[len(frames) // 2]
        mask = foreground_mask(middle)
        assert mask.sum() > 30
        colour = nearest_colour(middle[mask].astype(float).mean(axis=0))
        assert colour == rec["attributes"]["colour"]
        assert colour in rec["desc"].split()


def test_motion_and_size_match_the_attributes(dataset):
    areas = {"small": [], "large": []}
    for rec in all_records(dataset):
        frames = decode_video(dataset["videos"] / f"{rec['video_id']}.mp4")
        centroids = [np.argwhere(foreground_mask(frame)).mean(axis=0)[::-1] for frame in frames[[0, -1]]]
        shift = centroids[1] - centroids[0]  # (dx, dy) in pixels
        assert np.dot(shift, MOTION_DIRECTION[rec["attributes"]["motion"]]) > 0.3 * MEDIA.frame_size
        areas[rec["attributes"]["size"]].append(foreground_mask(frames[0]).sum())
        motion_phrases = SYNONYMS["motion"][rec["attributes"]["motion"]]
        assert any(phrase in rec["desc"] for phrase in motion_phrases)
    if areas["small"] and areas["large"]:
        assert max(areas["small"]) < min(areas["large"])


def quiet_runs(wave, rate):
    """Loud/quiet state per 10 ms block and the number of loud runs (beeps) in it."""
    block = rate // 100
    energy = np.sqrt((wave[: len(wave) // block * block].reshape(-1, block) ** 2).mean(axis=1))  # [blocks]
    loud = energy > 0.5 * energy.max()
    return loud, int(np.sum(np.diff(loud.astype(int)) == 1) + loud[0])


def test_audio_pitch_and_rhythm_match_the_attributes(dataset):
    for rec in all_records(dataset):
        source = separate_audio_file(dataset, rec["video_id"]) or dataset["videos"] / f"{rec['video_id']}.mp4"
        wave, rate = decode_audio(source)
        spectrum = np.abs(np.fft.rfft(wave))
        peak_hz = np.fft.rfftfreq(len(wave), 1 / rate)[int(np.argmax(spectrum))]
        assert abs(peak_hz / PITCH_HZ[rec["attributes"]["pitch"]] - 1) < 0.05
        loud, beeps = quiet_runs(wave, rate)
        expected = BEEPS_PER_SECOND[rec["attributes"]["rhythm"]] * MEDIA.duration_s
        if expected == 0:
            assert loud.mean() > 0.85
        else:
            assert 0.3 < loud.mean() < 0.7
            assert abs(beeps - expected) <= 1.5


def test_vocab_covers_the_captions(dataset):
    tokenizer = load_tokenizer(dataset["vocab"].parent)
    for rec in all_records(dataset):
        ids = tokenizer(rec["desc"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
