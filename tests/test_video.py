"""Frame sampling, decoding (exact frames, seeking, short videos, errors) and the clip transform."""

import os
import types
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gram.data import video as video_module
from gram.data.audio import MediaDecodeError, MediaNotFoundError
from gram.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoTransform,
    decode_frames,
    load_video_frames,
    sample_frame_indices,
    square_crop_params,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEDIA = SHARED / "data" / "media"
FRAME_COUNTS = {"video1.mp4": 131, "video2.mp4": 442, "video3.mp4": 173, "video4.mp4": 202}


def _shared_video(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"shared media {path} is absent")
    return path


def write_video(
    path: Path,
    num_frames: int,
    size=(48, 64),
    gop: int = 12,
    fps: int = 25,
    codec: str = "libx264",
    options: dict | None = None,
) -> np.ndarray:
    """Encode ``num_frames`` distinct frames (H, W = size) with B-frames; returns them (n, H, W, 3)."""
    h, w = size
    rng = np.random.default_rng(num_frames)
    frames = rng.integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8) // 4
    frames += (np.arange(num_frames, dtype=np.uint8) * (192 // max(num_frames, 1)))[:, None, None, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = options if options is not None else {"g": str(gop), "bf": "2", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return frames


def decode_all(path: Path, bt601: bool = False) -> np.ndarray:
    """Independent reference: every frame, decoded in order without seeking or skipping (``bt601``: with the
    BT.601 matrix and limited range, whatever the tags, as the reference preset decodes)."""
    convert = {"src_colorspace": "ITU601", "src_color_range": "MPEG"} if bt601 else {}
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24", **convert) for f in container.decode(video=0)])


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("total, n", [(131, 8), (442, 8), (8, 8), (100, 3), (17, 4)])
def test_test_sampling_is_the_lower_middle_of_array_split_segments(total, n):
    expected = [int(c[(len(c) + 1) // 2 - 1]) for c in np.array_split(np.arange(total), n)]
    assert sample_frame_indices(total, n, training=False) == expected


def test_training_sampling_stays_in_its_segment_and_follows_the_seed():
    segments = np.array_split(np.arange(131), 8)
    draws = [sample_frame_indices(131, 8, True, torch.Generator().manual_seed(s)) for s in range(20)]
    for draw in draws:
        assert all(int(seg[0]) <= i <= int(seg[-1]) for i, seg in zip(draw, segments))
    assert draws[3] == sample_frame_indices(131, 8, True, torch.Generator().manual_seed(3))
    assert len({tuple(d) for d in draws}) > 15


@pytest.mark.parametrize("training", [False, True])
def test_short_videos_repeat_frames_in_order(training):
    got = sample_frame_indices(3, 8, training, torch.Generator().manual_seed(0))
    assert got == [0, 0, 0, 1, 1, 1, 2, 2]
    assert sample_frame_indices(1, 4, training) == [0, 0, 0, 0]


def test_sampling_rejects_empty_videos():
    with pytest.raises(ValueError, match="positive"):
        sample_frame_indices(0, 8, False)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", sorted(FRAME_COUNTS))
def test_shared_videos_decode_to_the_right_shape(name):
    path = _shared_video(name)
    seen = []
    frames = decode_frames(path, lambda total: seen.append(total) or sample_frame_indices(total, 8, False))
    assert seen == [FRAME_COUNTS[name]]
    assert frames.shape == (8, 640, 360, 3) and frames.dtype == torch.uint8


@pytest.mark.parametrize("threads", [1, 2])
def test_seeking_decoder_returns_exactly_the_sequential_frames(threads):
    path = _shared_video("video2.mp4")  # 442 frames, 3 keyframes: the decoder seeks
    reference = decode_all(path)
    for indices in ([5, 300, 420, 421], [441, 0, 200, 200, 161, 159]):
        got = decode_frames(path, indices, threads=threads).numpy()
        np.testing.assert_array_equal(got, reference[indices])


@pytest.mark.parametrize(
    "codec, suffix, options",
    [
        ("libx264", "mp4", None),
        ("mpeg4", "avi", {"bf": "2"}),  # AVI and MPEG-TS index by decoding timestamp
        ("mpeg2video", "ts", {"bf": "2"}),
        ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"}),
        ("libx265", "mkv", {"x265-params": "keyint=7:log-level=error"}),
    ],
)
def test_many_keyframes_and_repeated_requests(tmp_path, codec, suffix, options):
    if codec not in av.codecs_available:
        pytest.skip(f"encoder {codec} not in this FFmpeg build")
    path = tmp_path / f"gop.{suffix}"
    write_video(path, 60, gop=7, codec=codec, options=options)
    reference = decode_all(path)
    assert len(reference) == 60
    for indices in ([59, 3, 3, 30, 31, 7, 14, 0, 58], [5, 25, 45]):
        for threads in (1, 3):  # one reader, and runs of keyframe groups decoded in parallel
            got = decode_frames(path, indices, threads=threads).numpy()
            np.testing.assert_array_equal(got, reference[indices])


def test_runs_of_targets_keep_each_keyframe_group_together():
    index = video_module._PacketIndex(  # one byte per frame: a group costs its frame count
        pts=list(range(100)),
        key_pts=[0, 30, 60, 90],
        key_dts=[0, 30, 60, 90],
        start=0,
        bytes_through=list(range(1, 101)),
    )
    targets = [1, 2, 31, 35, 61, 89, 95, 99]  # work from each keyframe: 3, 6, 30, 10
    assert video_module._split_by_keyframe(index, targets, 1) == [targets]
    assert video_module._split_by_keyframe(index, targets, 2) == [[61, 89], [1, 2, 31, 35, 95, 99]]
    runs = video_module._split_by_keyframe(index, targets, 8)
    assert sorted(runs) == [[1, 2], [31, 35], [61, 89], [95, 99]]


def test_groups_are_weighed_by_their_compressed_bytes():
    # Two groups of pictures: 0-5 is long but cheap, 6-9 short with a large keyframe (e.g. a scene cut).
    sizes = [10, 1, 1, 1, 1, 1, 60, 1, 1, 1]  # decoding order = presentation order here
    through = list(np.cumsum(sizes))
    index = video_module._PacketIndex(
        pts=list(range(10)), key_pts=[0, 6], key_dts=[0, 6], start=0, bytes_through=through
    )
    assert index.decoding_cost(0, 5) == 15 and index.decoding_cost(6, 7) == 61
    # One thread each either way; the heavier group goes first (to the reader on the already open file),
    # where counting frames would have put the long, cheap group first.
    assert video_module._split_by_keyframe(index, [2, 5, 7], 2) == [[7], [2, 5]]


def test_both_indexes_count_the_bytes_up_to_each_frame(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 30, gop=10)
    with av.open(str(path)) as container:
        packets = [(p.pts, p.size) for p in container.demux(video=0) if p.size]
    cumulative = dict(zip([pts for pts, _ in packets], np.cumsum([size for _, size in packets]).tolist()))
    indexes = []
    for build in (video_module._packet_index, video_module._container_index):
        with av.open(str(path)) as container:
            indexes.append(build(container, container.streams.video[0]))
    exact, derived = indexes
    assert exact.bytes_through == [cumulative[p] for p in exact.pts]
    assert derived.derived and len(derived.bytes_through) == 30
    assert derived.bytes_through == sorted(cumulative.values())  # the i-th frame decoded, in order


def _reader_of(path: Path):
    container = av.open(str(path))
    stream = container.streams.video[0]
    return container, video_module._FrameReader(
        container, stream, video_module._packet_index(container, stream)
    )


def test_the_decoder_is_drained_at_the_last_target_of_a_keyframe_group(tmp_path):
    path = tmp_path / "bframes.mp4"
    write_video(path, 40, gop=20, options={"g": "20", "bf": "2", "preset": "veryfast"})
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    reference = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    # A P-frame: every packet before it in decoding order is shown earlier, so its packet is the largest fed
    # so far; without draining, its frame only leaves the reorder buffer once later packets are fed.
    target = next(i for i, f in enumerate(decoded) if i > 5 and f.pict_type == av.video.frame.PictureType.P)
    wanted = decoded[target].pts
    for drain in (True, False):
        container, reader = _reader_of(path)
        with container:
            reader.drain = drain
            frames = reader.read([wanted])
        np.testing.assert_array_equal(frames[wanted], reference[target])
        # Draining stops at the target's packet; otherwise later packets are fed to push the frame out.
        assert (reader.fed_max == wanted) == drain and (reader.packets is None) == drain


def test_a_frame_that_draining_does_not_produce_is_decoded_without_draining(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    write_video(path, 30, gop=10)
    reference = decode_all(path)
    feed = video_module._FrameReader._feed_until
    drained = []

    def lose_the_drained_frame(self, target, drain):  # as when a packet's pts is not its frame's
        feed(self, target, drain)
        if drain:
            drained.append(target)
            self.frames.pop(target, None)

    monkeypatch.setattr(video_module._FrameReader, "_feed_until", lose_the_drained_frame)
    got = decode_frames(path, [4, 15, 25], threads=1).numpy()
    np.testing.assert_array_equal(got, reference[[4, 15, 25]])
    assert len(drained) == 1  # the first miss turned draining off for the rest of the reader


class _FakePacket:
    def __init__(self, name, size, pts, fed):
        self.name, self.size, self.pts, self.fed = name, size, pts, fed

    def decode(self):
        self.fed.append(self.name)
        return [self.name]


@pytest.mark.parametrize("end", ["next picture", "end of stream"])
def test_packets_without_timestamp_after_the_target_go_in_before_the_drain(end):
    # As the second field of an interlaced picture in MPEG-TS: packets after the target's without a pts of their
    # own belong to the same picture, so they are decoded before the flush; what follows is not fed.
    fed = []
    after = _FakePacket("next", 100, 7, fed) if end == "next picture" else _FakePacket("eof", 0, None, fed)
    packets = iter([_FakePacket("field2", 50, None, fed), _FakePacket("field2b", 50, None, fed), after])
    flush = types.SimpleNamespace(decode=lambda packet: fed.append(f"flush {packet}") or ["flushed"])
    reader = types.SimpleNamespace(packets=packets, stream=types.SimpleNamespace(codec_context=flush))
    frames = video_module._FrameReader._drain(reader)
    assert fed == ["field2", "field2b", "flush None"]
    assert frames == ["field2", "field2b", "flushed"] and reader.packets is None


class _ThreadsInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return video_module.default_decode_threads()


def test_default_threads_are_one_per_loader_worker_and_the_free_cores_otherwise():
    loader = torch.utils.data.DataLoader(_ThreadsInWorker(), num_workers=1, batch_size=None)
    assert list(loader) == [1]
    assert video_module.default_decode_threads() == min(len(os.sched_getaffinity(0)), 8)


def test_sequential_fallback_without_timestamps_gives_the_same_frames(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    write_video(path, 20)
    expected = decode_frames(path, [0, 9, 19]).numpy()
    monkeypatch.setattr(video_module, "_packet_index", lambda container, stream: None)
    np.testing.assert_array_equal(decode_frames(path, [0, 9, 19]).numpy(), expected)


def test_short_video_gives_repeated_frames(tmp_path):
    path = tmp_path / "three.mp4"
    write_video(path, 3)
    reference = decode_all(path)
    clip = load_video_frames(path, 8, training=False, transform=None)  # (8, 3, H, W) uint8
    assert clip.shape == (8, 3, 48, 64)
    expected = torch.from_numpy(reference[[0, 0, 0, 1, 1, 1, 2, 2]]).permute(0, 3, 1, 2)
    assert torch.equal(clip, expected)


def test_npy_frames_are_read_like_a_video(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 6), dtype=np.uint8)  # grey depth maps
    np.save(tmp_path / "d.npy", frames)
    got = decode_frames(tmp_path / "d.npy", [4, 0])
    assert got.shape == (2, 8, 6, 3)
    assert torch.equal(got[0, ..., 1], torch.from_numpy(frames[4]))


def test_missing_and_undecodable_files_raise_naming_the_path(tmp_path):
    with pytest.raises(MediaNotFoundError, match="absent.mp4"):
        load_video_frames(tmp_path / "absent.mp4", 8, False, None)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaDecodeError, match="garbage.mp4"):
        load_video_frames(garbage, 8, False, None)
    silent = tmp_path / "sound_only.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\x00\x00" * 1600)
    with pytest.raises(MediaDecodeError, match="no video stream in .*sound_only.wav"):
        load_video_frames(silent, 8, False, None)


def test_out_of_range_and_unknown_backend(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 4)
    with pytest.raises(ValueError, match="out of range"):
        decode_frames(path, [4])
    with pytest.raises(ValueError, match="unknown video backend"):
        decode_frames(path, [0], backend="ffmpeg-cli")


@pytest.mark.parametrize("backend, module", [("decord", "decord"), ("opencv", "cv2")])
def test_optional_backends_agree_on_shape_and_content(backend, module):
    pytest.importorskip(module)
    path = _shared_video("video1.mp4")
    indices = sample_frame_indices(131, 8, False)
    ours, theirs = decode_frames(path, indices), decode_frames(path, indices, backend=backend)
    assert theirs.shape == ours.shape
    # Different YUV->RGB conversions differ by a few levels, not by content.
    assert (ours.float() - theirs.float()).abs().mean() < 4


# ---------------------------------------------------------------- transform and composition


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) in [0, 1] -> CLIP-normalised."""
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def test_none_mode_squashes_and_normalises():
    # The accurate preset's antialiased uint8 resize (the reference preset: tests/test_preprocessing.py).
    clip = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    out = VideoTransform(16, mode="none", preprocessing="accurate")(clip)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expected = _normalise(F.interpolate(clip.float() / 255, size=(16, 16), mode="bilinear", antialias=True))
    assert (out - expected).abs().max() < 2.5 / 255 / min(CLIP_STD)  # uint8 rounding of the resize


def test_crop_flip_test_mode_is_short_side_resize_then_centre_crop():
    clip = torch.randint(0, 256, (1, 3, 64, 32), dtype=torch.uint8)  # portrait, short side 32
    out = VideoTransform(16, mode="crop_flip", training=False, preprocessing="accurate")(clip)
    resized = F.interpolate(clip.float() / 255, size=(32, 16), mode="bilinear", antialias=True)
    expected = _normalise(resized[..., 8:24, :])
    assert (out - expected).abs().max() < 2.5 / 255 / min(CLIP_STD)


def test_the_crop_and_flip_are_shared_by_all_frames():
    frames = torch.randint(0, 256, (4, 3, 36, 50), dtype=torch.uint8)
    transform = VideoTransform(12, mode="crop_flip", training=True)
    clip_out = transform(frames, torch.Generator().manual_seed(5))
    for k in range(4):  # each frame alone, same draws: same pixels as inside the clip
        single = transform(frames[k : k + 1], torch.Generator().manual_seed(5))
        assert torch.equal(clip_out[k], single[0])
    assert not torch.equal(clip_out, transform(frames, torch.Generator().manual_seed(6)))


def test_random_flip_happens_for_some_seeds_only():
    frame = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8)
    transform = VideoTransform(20, mode="crop_flip", training=True, scale=(1.0, 1.0))  # crop = whole frame
    plain = VideoTransform(20, mode="none")(frame)
    outs = [transform(frame, torch.Generator().manual_seed(s)) for s in range(16)]
    flipped = [torch.allclose(o, plain.flip(-1)) for o in outs]
    unflipped = [torch.allclose(o, plain) for o in outs]
    assert all(f != u for f, u in zip(flipped, unflipped)) and any(flipped) and any(unflipped)


def test_square_crop_covers_the_requested_area():
    for seed in range(10):
        top, left, h, w = square_crop_params(100, 110, (0.8, 1.0), torch.Generator().manual_seed(seed))
        assert h == w and 0.8 * 100 * 110 - 2 * h <= h * w and top + h <= 100 and left + w <= 110


def test_square_crop_of_a_wide_frame_falls_back_to_the_centre_square():
    # A square holding 80 % of a 16:9 frame does not fit in it, so (as torchvision's RandomResizedCrop
    # with ratio 1) every try fails and the crop is the centred full-height square; only the flip is random.
    assert square_crop_params(360, 640, (0.8, 1.0), torch.Generator().manual_seed(0)) == (0, 140, 360, 360)


def test_transform_rejects_float_or_channel_last_input():
    with pytest.raises(ValueError, match="uint8 clip"):
        VideoTransform(8)(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown video transform"):
        VideoTransform(8, mode="random")


def test_load_video_frames_test_mode_is_deterministic():
    path = _shared_video("video1.mp4")
    transform = VideoTransform(32, mode="crop_flip", training=False)
    a = load_video_frames(path, 8, False, transform)
    b = load_video_frames(path, 8, False, transform)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    # The transform's (reference) preset also decodes with BT.601.
    raw = torch.from_numpy(decode_all(path, bt601=True)[sample_frame_indices(131, 8, False)]).permute(0, 3, 1, 2)
    assert torch.equal(a, transform(raw))


def test_load_video_frames_training_follows_the_generator():
    path = _shared_video("video3.mp4")
    transform = VideoTransform(24, mode="crop_flip", training=True)
    a = load_video_frames(path, 4, True, transform, torch.Generator().manual_seed(1))
    b = load_video_frames(path, 4, True, transform, torch.Generator().manual_seed(1))
    c = load_video_frames(path, 4, True, transform, torch.Generator().manual_seed(2))
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_rotated_videos_are_turned_upright(tmp_path):
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    image[:8, :8] = 255  # a white top-left corner on a landscape frame
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # shown turned a quarter counter-clockwise
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    frames = decode_frames(path, [0, 2]).numpy()
    assert frames.shape == (2, 64, 32, 3)
    np.testing.assert_allclose(frames[:, -8:, :8].mean(), 255, atol=20)  # the corner is now bottom-left
    np.testing.assert_allclose(frames[:, :8, :8].mean(), 0, atol=20)


def test_mp4_frames_come_from_the_sample_table_without_reading_every_packet(tmp_path, monkeypatch):
    path = tmp_path / "cfr.mp4"
    write_video(path, 40, gop=8)
    reference = decode_all(path)

    def exact_index_not_expected(container, stream):
        raise AssertionError("a constant-rate mp4 should not need the full packet scan")

    monkeypatch.setattr(video_module, "_packet_index", exact_index_not_expected)
    np.testing.assert_array_equal(decode_frames(path, [39, 0, 17]).numpy(), reference[[39, 0, 17]])


def test_variable_frame_rate_mp4_falls_back_to_the_exact_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "3", "g": "20"}
        stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(60):
            image = rng.integers(0, 64, (48, 64, 3), dtype=np.uint8) + np.uint8(2 * i)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += int(rng.choice([20, 33, 50, 70]))  # irregular frame durations
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    reference = decode_all(path)
    exact_scans = []
    exact = video_module._packet_index
    monkeypatch.setattr(video_module, "_packet_index", lambda c, s: exact_scans.append(1) or exact(c, s))
    indices = [59, 3, 40, 41, 0, 58]
    np.testing.assert_array_equal(decode_frames(path, indices).numpy(), reference[indices])
    assert exact_scans == [1]  # the inferred timestamps did not match, so the packets were scanned
