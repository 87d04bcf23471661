"""data.video_backend: decord and torchcodec select the same frames as PyAV and return its pixels; a missing
backend is one clear line; files a backend cannot decode fail (or fall back) naming the file."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from gram.cli import UserError
from gram.config import DataConfig
from gram.data import video_backends
from gram.data.audio import MediaDecodeError
from gram.data.dataset import ItemBuilder
from gram.data.video import decode_frames, load_video_frames, sample_frame_indices
from tests.test_video import write_video

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "media"
SHARED_VIDEOS = ["video1.mp4", "video2.mp4", "video3.mp4", "video4.mp4"]


def _installed(backend: str) -> None:
    try:
        video_backends.require_backend(backend)
    except UserError as error:
        pytest.skip(str(error))


def _shared(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"shared media {path} is absent")
    return path


def _decode_recording_total(path: Path, backend: str, training: bool, seed: int) -> tuple[list[int], np.ndarray]:
    """(frame positions asked for, frames) with the frame count the backend itself reported."""
    seen: list[list[int]] = []
    generator = torch.Generator().manual_seed(seed)

    def positions(total: int) -> list[int]:
        seen.append(sample_frame_indices(total, 8, training, generator))
        return seen[-1]

    frames = decode_frames(path, positions, backend=backend).numpy()
    return seen[0], frames


@pytest.mark.parametrize("name", SHARED_VIDEOS)
@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_backends_pick_the_same_frames_and_return_pyavs_pixels(backend, name):
    """Tolerance 0: on these H.264 yuv420p clips all three decoders are FFmpeg's h264 decoder followed by the
    same BT.601 limited-range YUV->RGB conversion, so every pixel is equal (measured on all four clips)."""
    _installed(backend)
    path = _shared(name)
    for training, seed in ((False, 0), (True, 1), (True, 2)):
        want_idx, want = _decode_recording_total(path, "pyav", training, seed)
        got_idx, got = _decode_recording_total(path, backend, training, seed)
        assert got_idx == want_idx
        assert got.dtype == np.uint8 and got.shape == want.shape == (8, *want.shape[1:3], 3)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_repeated_and_unordered_positions_and_the_clip_loader(backend, tmp_path):
    _installed(backend)
    path = tmp_path / "small.mp4"
    reference = write_video(path, 40, size=(48, 64))  # 64 px wide: a width decord2 can decode
    positions = [39, 0, 17, 17, 5]
    got = decode_frames(path, positions, backend=backend).numpy()
    np.testing.assert_array_equal(got, decode_frames(path, positions).numpy())
    # The right frames: each frame's brightness ramps with its position (the lossy encoder keeps the mean).
    np.testing.assert_allclose(got.mean(axis=(1, 2, 3)), reference[positions].mean(axis=(1, 2, 3)), atol=3)
    clip = load_video_frames(path, 4, True, None, torch.Generator().manual_seed(3), backend=backend)
    same = load_video_frames(path, 4, True, None, torch.Generator().manual_seed(3))
    assert clip.shape == (4, 3, 48, 64) and torch.equal(clip, same)


def _rotated_video(path: Path, size=(32, 64)) -> Path:
    image = np.zeros((*size, 3), dtype=np.uint8)
    image[:8, :8] = 255
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_rotated_videos_come_out_upright_like_pyav(backend, tmp_path):
    """torchcodec applies the display rotation; decord2 cannot decode such files, so PyAV decodes them."""
    _installed(backend)
    path = _rotated_video(tmp_path / "phone.mp4")
    got = decode_frames(path, [0, 2], backend=backend).numpy()
    assert got.shape == (2, 64, 32, 3)
    np.testing.assert_array_equal(got, decode_frames(path, [0, 2]).numpy())


def test_decord_falls_back_to_pyav_on_widths_it_cannot_copy(tmp_path, caplog):
    _installed("decord")
    path = tmp_path / "w96.mp4"
    write_video(path, 12, size=(64, 96))  # 96 px * 3 bytes is not a multiple of 64: decord2 raises
    monkey_flag = video_backends._warned_fallback
    video_backends._warned_fallback = False
    try:
        with caplog.at_level("WARNING", logger="gram.data.video_backends"):
            got = decode_frames(path, [0, 11], backend="decord").numpy()
    finally:
        video_backends._warned_fallback = monkey_flag
    np.testing.assert_array_equal(got, decode_frames(path, [0, 11]).numpy())
    assert "decoded with PyAV" in caplog.text and "w96.mp4" in caplog.text


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_undecodable_files_name_the_file(backend, tmp_path):
    _installed(backend)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(MediaDecodeError, match="garbage.mp4"):
        decode_frames(garbage, [0], backend=backend)


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_a_half_downloaded_mp4_is_truncated_for_every_backend(backend, sample_root, tmp_path):
    from gram.data.errors import TruncatedMediaError
    from tests.test_faults_eval import half_downloaded

    _installed(backend)
    half = half_downloaded(sample_root / "videos" / "clip00000.mp4", tmp_path / "half.mp4")
    with pytest.raises(TruncatedMediaError, match="half.mp4 is truncated"):
        decode_frames(half, [0], backend=backend)


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_a_missing_backend_is_one_line_naming_the_setting_and_the_install(backend, monkeypatch, tmp_path):
    def unavailable(name):
        raise (RuntimeError if name == "torchcodec" else ImportError)(f"No module named '{name}'\nmore lines")

    monkeypatch.setattr(video_backends, "_import", unavailable)
    with pytest.raises(UserError) as info:
        video_backends.require_backend(backend)
    message = str(info.value)
    assert "\n" not in message and f"data.video_backend='{backend}'" in message
    assert f"pip install 'gram[{backend}]'" in message
    if backend == "torchcodec":
        assert "apt-get install libavcodec59" in message
    # The dataset checks at start, so no worker ever counts a clip as failed for it.
    data = DataConfig(video_backend=backend)
    with pytest.raises(UserError, match="data.video_backend"):
        ItemBuilder(data, ["video", "audio"], training=True)
    ItemBuilder(data, ["audio"], training=True)  # no video decoded: no backend needed
    path = tmp_path / "v.mp4"
    write_video(path, 4)
    with pytest.raises(UserError, match="data.video_backend"):
        decode_frames(path, [0], backend=backend)


def test_the_setting_is_validated():
    assert DataConfig().video_backend == "pyav"
    with pytest.raises(ValueError, match="data.video_backend"):
        DataConfig(video_backend="ffmpeg")


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_the_dataset_decodes_with_the_configured_backend_and_gives_the_same_items(backend, sample_root,
                                                                                 monkeypatch):
    """data.video_backend reaches the decoder through the dataset; decord2 cannot decode the sample clips (their
    width), so they come from its PyAV fallback: the items are the same either way."""
    from gram.config import DatasetConfig
    from gram.data.dataset import VideoTextDataset

    _installed(backend)
    split = DatasetConfig(annotations=str(sample_root / "annotations" / "test.json"),
                          video_dir=str(sample_root / "videos"), audio_dir=str(sample_root / "audios"))
    small = {"num_frames": 2, "test_num_frames": 3, "image_size": 32, "audio_target_length": 64}
    from gram.data import video as video_module

    calls = []
    real = video_module.read_frames
    monkeypatch.setattr(video_module, "read_frames", lambda b, *a, **k: calls.append(b) or real(b, *a, **k))
    items = {}
    for name in ("pyav", backend):
        dataset = VideoTextDataset(split, DataConfig(video_backend=name, **small), ["video"], training=False)
        assert dataset.build.data.video_backend == name
        items[name] = [dataset[i]["video"] for i in range(2)]
    assert calls == [backend, backend]  # pyav decodes in gram.data.video itself
    for ours, theirs in zip(items["pyav"], items[backend]):
        assert ours.shape == (3, 3, 32, 32)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
