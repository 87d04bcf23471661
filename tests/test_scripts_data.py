"""scripts/prepare_dataset.py and scripts/check_dataset.py on a folder of generated tiny videos."""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from gram.cli import UserError
from gram.data.audio import load_waveform
from gram.data.video import decode_frames
from tests.conftest import load_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

prepare = load_script("prepare_dataset")
check = load_script("check_dataset")


def write_clip(path: Path, seconds: float = 1.0, fps: int = 20, size=(48, 32), audio_rate: int | None = 22050):
    """A tiny H.264 mp4, with a stereo AAC track of a 440 Hz tone when ``audio_rate`` is set."""
    w, h = size
    frames = int(seconds * fps)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream("aac", rate=audio_rate, layout="stereo") if audio_rate else None
        for i in range(frames):
            image = np.full((h, w, 3), (i * 9) % 256, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            t = np.arange(int(seconds * audio_rate)) / audio_rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            chunk = audio.codec_context.frame_size
            for start in range(0, len(tone), chunk):
                piece = np.stack([tone[start : start + chunk]] * 2)  # (2, n) planar stereo
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = audio_rate, start, Fraction(1, audio_rate)
                container.mux(audio.encode(frame))
            container.mux(audio.encode())


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """clip_a (audio, 1 s), clip.b_1.000 (dotted id, audio), silent (no audio), broken (not a video)."""
    folder = tmp_path_factory.mktemp("downloads")
    write_clip(folder / "clip_a.mp4", seconds=1.0)
    write_clip(folder / "clip.b_1.000.mp4", seconds=0.6, size=(64, 40))
    write_clip(folder / "silent.mp4", audio_rate=None)
    (folder / "broken.mp4").write_bytes(b"\x00\x01 this is not a video" * 50)
    (folder / "notes.txt").write_text("not a video extension")
    return folder


def test_prepare_extracts_16k_mono_audio_and_writes_a_manifest(downloads, tmp_path):
    out = tmp_path / "prepared"
    code = prepare.main(["--videos", str(downloads), "--out", str(out), "--workers", "1", "--audio-format", "wav"])
    assert code == 1  # the broken file is reported through the exit status
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["video_id"]: e for e in manifest["entries"]}
    assert set(entries) == {"clip_a", "clip.b_1.000", "silent", "broken"}
    assert entries["broken"]["error"] and entries["broken"]["audio"] is None
    assert entries["silent"]["has_audio"] is False and entries["silent"]["audio"] is None
    assert not (out / "audios" / "silent.wav").exists()
    assert entries["clip_a"]["frames"] == 20 and entries["clip_a"]["width"] == 48
    for video_id, seconds in (("clip_a", 1.0), ("clip.b_1.000", 0.6)):
        path = out / "audios" / f"{video_id}.wav"
        assert entries[video_id]["audio"] == str(path)
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            assert (stream.rate, stream.channels) == (16000, 1)
        wave = load_waveform(path)
        assert abs(len(wave) / 16000 - seconds) < 0.05
        spectrum = np.abs(np.fft.rfft(wave.numpy()))
        assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 5  # the tone survived resampling


def test_prepare_reencodes_with_lower_fps_and_size_and_is_resumable(downloads, tmp_path):
    out = tmp_path / "prepared"
    args = ["--videos", str(downloads), "--out", str(out), "--workers", "2", "--reencode", "--fps", "10",
            "--short-side", "16", "--annotations"]
    annotations = tmp_path / "anno.json"
    annotations.write_text(json.dumps([{"video_id": "clip_a", "desc": "x"}, {"video_id": "gone", "desc": "y"}]))
    assert prepare.main([*args, str(annotations)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["missing_video_ids"] == ["gone"]
    (entry,) = manifest["entries"]
    video = out / "videos" / "clip_a.mp4"
    assert entry["video"] == str(video) and (entry["width"], entry["height"]) == (24, 16)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == 10 and not container.streams.audio
    frames = decode_frames(video, lambda total: list(range(total)))
    assert frames.shape == (10, 16, 24, 3)
    # Frame i of the 10 fps copy is frame 2i of the 20 fps source (grey level 9 * 2i).
    assert np.allclose(frames.float().mean(dim=(1, 2, 3)).numpy(), [(18 * i) % 256 for i in range(10)], atol=4)
    stamp = video.stat().st_mtime_ns
    assert prepare.main([*args, str(annotations)]) == 0
    assert video.stat().st_mtime_ns == stamp  # kept, not redone


def test_prepare_rejects_fps_without_reencode(downloads, tmp_path):
    with pytest.raises(SystemExit):
        prepare.main(["--videos", str(downloads), "--out", str(tmp_path), "--fps", "5"])


@pytest.fixture
def dataset(downloads, tmp_path) -> dict:
    """An annotation file over the downloads plus a prepared audio folder missing one file."""
    audios = tmp_path / "audios"
    audios.mkdir()
    prepare.extract_audio(downloads / "clip_a.mp4", audios / "clip_a.mp3")
    (audios / "broken.mp3").write_bytes(b"no audio here" * 20)
    records = [
        {"video_id": "clip_a", "desc": "a grey clip", "subtitle": ""},
        {"video_id": "clip.b_1.000", "desc": ["", " "]},  # empty caption; audio from the video track
        {"video_id": "silent", "desc": "no sound"},  # no audio file, no track
        {"video_id": "broken", "desc": "bad file"},  # undecodable video and audio
        {"video_id": "clip", "desc": "prefix of clip_a, has no file"},  # missing video
    ]
    annotations = tmp_path / "anno.json"
    annotations.write_text(json.dumps(records))
    return {"annotations": annotations, "videos": downloads, "audios": audios}


def test_check_dataset_counts_every_problem_and_writes_the_ids(dataset, tmp_path, capsys):
    missing = tmp_path / "out" / "missing.txt"
    code = check.main(["--annotations", str(dataset["annotations"]), "--video-dir", str(dataset["videos"]),
                       "--audio-dir", str(dataset["audios"]), "--missing-out", str(missing), "--workers", "1",
                       "--strict"])
    assert code == 1
    table = capsys.readouterr().out
    expected = {"records": 5, "empty caption": 1, "missing video": 1, "missing audio": 2,
                "undecodable video": 1, "undecodable audio": 1, "audio from video track": 1, "empty subtitle": 1}
    for row, count in expected.items():
        assert any(line.split() == [*row.split(), str(count)] for line in table.splitlines()), row
    lines = [line.split("\t") for line in missing.read_text().splitlines()]
    assert sorted((i, p) for i, p, _ in lines) == sorted([
        ("clip.b_1.000", "empty caption"), ("clip", "missing video"), ("clip", "missing audio"),
        ("silent", "missing audio"), ("broken", "undecodable video"), ("broken", "undecodable audio"),
    ])


def test_check_dataset_reads_a_data_config(dataset, tmp_path):
    data_dir = dataset["annotations"].parent
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "test:\n"
        "  annotations: ${paths.data_dir}/anno.json\n"
        f"  video_dir: {dataset['videos']}\n"
        "  audio_dir: ${paths.data_dir}/audios\n"
    )
    split = check.load_split(config, "test", str(data_dir))
    assert split.annotations == str(data_dir / "anno.json") and split.audio_dir == str(data_dir / "audios")
    result = check.check_split(split, decode="none", workers=2)
    assert result["counts"]["missing video"] == 1 and result["counts"]["undecodable video"] == 0
    with pytest.raises(UserError, match="no .train. split"):
        check.load_split(config, "train", str(data_dir))


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SHARED_ANNOTATIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "annotations"
# Shard configs stream their training data from shards (no `train` split); the sample dataset is generated.
REAL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.stem != "sample" and not p.stem.endswith("_shards"))


def test_every_real_dataset_config_has_both_splits_under_the_data_dir():
    assert {p.stem for p in REAL_CONFIGS} >= {"msrvtt_ret", "didemo_ret", "activitynet_ret", "vatex_ret",
                                              "audiocaps_ret", "youcook_ret", "vast150k"}
    for config in REAL_CONFIGS:
        for split in ("train", "test"):
            values = check.load_split(config, split, "/DATA")
            assert values.annotations.startswith("/DATA/") and values.video_dir.startswith("/DATA/"), config
            assert values.audio_dir.startswith("/DATA/"), config


@pytest.mark.parametrize("dataset, split, records, dropped", [
    ("msrvtt", "test", 1000, 0), ("didemo", "train", 8360, 3), ("vatex", "test", 1500, 0),
])
def test_check_dataset_on_the_shipped_annotations_without_media(tmp_path, dataset, split, records, dropped):
    if not SHARED_ANNOTATIONS.is_dir():
        pytest.skip("shared annotations are absent")
    (tmp_path / dataset).mkdir()
    (tmp_path / dataset / "annotations").symlink_to(SHARED_ANNOTATIONS / dataset)
    split_config = check.load_split(CONFIGS / f"{dataset}_ret.yaml", split, str(tmp_path))
    result = check.check_split(split_config, decode="none", workers=1)
    counts = result["counts"]
    assert (counts["records"], counts["dropped as corrupted"]) == (records, dropped)
    assert counts["missing video"] == records and counts["missing audio"] == records


def test_segment_ids_are_parsed_from_the_right():
    from gram.data.annotations import segment_of

    assert segment_of("G9zN5TTuGO4_000179_000189") == ("G9zN5TTuGO4", 179.0, 189.0)  # VATEX
    assert segment_of("xHr8X2Wpmno_47_60") == ("xHr8X2Wpmno", 47.0, 60.0)  # YouCook2
    assert segment_of("GOD8Bt5LfDE_100.000_110.000") == ("GOD8Bt5LfDE", 100.0, 110.0)  # AudioCaps
    assert segment_of("a_b_c_1_2") == ("a_b_c", 1.0, 2.0)  # YouTube ids may contain "_"
    assert segment_of("video7010") is None and segment_of("clip_5_5") is None and segment_of("x_9_3") is None


def test_prepare_cuts_annotated_segments_out_of_full_videos(tmp_path):
    """VATEX/AudioCaps-style clip ids are cut (video frame-exact, audio sample-exact) from <source>.mp4."""
    downloads, fps, seconds = tmp_path / "full", 20, 6
    downloads.mkdir()
    with av.open(str(downloads / "yt_id_A.mp4"), "w") as container:  # frame i is grey level 2 i
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        video.options = {"g": "50", "crf": "10"}
        audio = container.add_stream("aac", rate=22050, layout="stereo")
        for i in range(fps * seconds):
            image = np.full((32, 32, 3), 2 * i, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        t = np.arange(22050 * seconds) / 22050
        tone = ((0.05 + 0.1 * t) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # louder over time
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([tone[start : start + 1024]] * 2), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 22050, start, Fraction(1, 22050)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    annotation = tmp_path / "clips.json"
    ids = ["yt_id_A_000002_000004", "yt_id_A_3.500_5.000", "gone_000001_000003"]
    annotation.write_text(json.dumps([{"video_id": i, "desc": "a clip"} for i in ids]))

    out = tmp_path / "out"
    code = prepare.main(["--videos", str(downloads), "--out", str(out), "--annotations", str(annotation),
                         "--audio-format", "wav", "--workers", "1"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["missing_video_ids"] == ["gone_000001_000003"]
    entries = {e["video_id"]: e for e in manifest["entries"]}
    for clip_id, (start, end) in (("yt_id_A_000002_000004", (2, 4)), ("yt_id_A_3.500_5.000", (3.5, 5))):
        assert entries[clip_id]["segment"] == [start, end]
        frames = decode_frames(out / "videos" / f"{clip_id}.mp4", lambda n: list(range(n))).numpy()
        assert len(frames) == round((end - start) * fps)
        levels = frames.reshape(len(frames), -1).mean(1)
        expected = 2 * (np.arange(len(frames)) + round(start * fps))
        assert np.abs(levels - expected).max() < 3, (levels[:3], expected[:3])
        with av.open(str(out / "audios" / f"{clip_id}.wav")) as written:
            assert written.streams.audio[0].rate == 16000 and written.streams.audio[0].channels == 1
        waveform = load_waveform(out / "audios" / f"{clip_id}.wav")  # (T,) at 16 kHz
        assert abs(waveform.shape[-1] - (end - start) * 16000) <= 2
        # the amplitude ramp dates the cut: mean |sine| = 2 / pi of the envelope at the segment's ends
        for edge, at in ((waveform[:1600], start + 0.05), (waveform[-1600:], end - 0.05)):
            assert edge.abs().mean().item() == pytest.approx(2 / np.pi * (0.05 + 0.1 * at), rel=0.1)
