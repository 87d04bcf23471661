"""Audio front end: decoding by content, 16 kHz resampling, Kaldi fbank parity, clip selection, errors."""

import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from gram.data.audio import (
    MediaDecodeError,
    MediaError,
    MediaNotFoundError,
    NoAudioStreamError,
    clip_slice_groups,
    load_audio_clips,
    load_waveform,
    select_clips,
    silent_clips,
    waveform_to_fbank,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEDIA = SHARED / "data" / "media"
VECTORS = SHARED / "reference" / "vectors"
MEDIA_FILES = [f"audio{i}.mp3" for i in range(1, 5)] + [f"video{i}.mp4" for i in range(1, 5)]
NORM_ATOL = 1e-4  # vectors README §4: ~1e-3 raw log-mel, ~1e-4 after normalisation


def _media(name: str) -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"shared media not available: {path}")
    return path


@pytest.fixture(scope="module")
def frontend_io() -> dict:
    from safetensors.torch import load_file

    path = VECTORS / "audio_frontend_io.safetensors"
    if not path.is_file():
        pytest.skip(f"reference vectors not available: {path}")
    return load_file(path)


def _write_wav(path: Path, wave: np.ndarray, rate: int) -> Path:
    """Write a mono float32 WAV with PyAV (so the decoder reads back exactly these samples)."""
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_f32le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("bins", [64, 128])
def test_fbank_matches_reference(frontend_io, bins):
    fbank = waveform_to_fbank(frontend_io["wave16k"][0], mel_bins=bins)
    torch.testing.assert_close(fbank, frontend_io[f"fbank{bins}_norm"], atol=NORM_ATOL, rtol=0)
    # Normalisation is the stated affine map of the raw log-mel.
    raw = frontend_io[f"fbank{bins}"]
    torch.testing.assert_close(fbank, (raw - 15.41663) / (2 * 6.55582), atol=NORM_ATOL, rtol=0)
    assert fbank.shape == (1 + (16000 - 400) // 160, bins)


def test_empty_low_mel_bin_sits_at_the_log_floor(frontend_io):
    # At 128 bins mel filter 3 covers no FFT bin: Kaldi floors the log at log(eps) = -15.9424 in every frame.
    fbank = waveform_to_fbank(frontend_io["wave16k"][0], mel_bins=128)
    floor = (np.log(np.finfo(np.float32).eps) - 15.41663) / (2 * 6.55582)
    torch.testing.assert_close(fbank[:, 3], torch.full((fbank.shape[0],), floor, dtype=torch.float32), atol=1e-4, rtol=0)


def test_resampling_from_a_file_matches_reference(frontend_io, tmp_path):
    wav = _write_wav(tmp_path / "tone44k.wav", frontend_io["wave44k"][0].numpy(), 44100)
    wave = load_waveform(wav)
    torch.testing.assert_close(wave, frontend_io["wave44k_to16k"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(waveform_to_fbank(wave, 64), frontend_io["wave44k_fbank64_norm"], atol=NORM_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- real media


def _stream_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        if stream.duration is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base


@pytest.mark.parametrize("name", MEDIA_FILES)
def test_real_media_decodes_to_16k_mono(name):
    path = _media(name)
    wave = load_waveform(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() / 16000 - _stream_duration(path)) < 0.1
    assert 0.01 < wave.abs().max() <= 1.5
    clips = load_audio_clips(path, 2, 1024, 64, False)
    assert clips.shape == (2, 1024, 64) and torch.isfinite(clips).all()


def test_mp4_named_mp3_is_read_by_content(tmp_path):
    source = _media("audio1.mp3")
    with av.open(str(source)) as container:
        assert container.format.name.startswith("mov,mp4")  # really MP4/AAC despite the name
    renamed = shutil.copy(source, tmp_path / "audio1.wav")
    torch.testing.assert_close(load_waveform(renamed), load_waveform(source), rtol=0, atol=0)


def test_test_time_clips_are_deterministic():
    path = _media("audio2.mp3")
    first = load_audio_clips(path, 2, 256, 64, False)
    torch.testing.assert_close(load_audio_clips(path, 2, 256, 64, False), first, rtol=0, atol=0)
    fbank = waveform_to_fbank(load_waveform(path), 64)
    # 14.7 s -> 1472 frames -> padded to 6 slices of 256 -> groups [0,1,2], [3,4,5] -> slices 1 and 4.
    torch.testing.assert_close(first[0], fbank[256:512], rtol=0, atol=0)
    torch.testing.assert_close(first[1], fbank[1024:1280], rtol=0, atol=0)


def test_training_clips_are_random_under_a_generator():
    path = _media("audio2.mp3")
    fbank = waveform_to_fbank(load_waveform(path), 64)

    def draw(seed: int) -> torch.Tensor:
        return select_clips(fbank, 1, 256, training=True, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(3), draw(3), rtol=0, atol=0)
    starts = set()
    for seed in range(12):
        clip = draw(seed)[0]
        matches = [s for s in range(6) if torch.equal(_padded(fbank, 6 * 256)[s * 256:(s + 1) * 256], clip)]
        assert len(matches) == 1
        starts.add(matches[0])
    assert len(starts) >= 3


def _padded(fbank: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([fbank, torch.zeros(length - fbank.shape[0], fbank.shape[1])])


# ----------------------------------------------------------------------------------------------- slicing rule


def _frame_index_fbank(frames: int, bins: int = 2) -> torch.Tensor:
    """fbank whose rows are 1 + frame index, so a slice is identified by its first value (padding is 0)."""
    return (torch.arange(frames, dtype=torch.float32) + 1)[:, None].expand(frames, bins).clone()


def test_reference_example_activitynet_120s():
    fbank = _frame_index_fbank(11998)  # 120 s -> 11998 frames
    padded, groups = clip_slice_groups(11998, 2, 1024)
    assert padded == 12 * 1024 and groups == [list(range(6)), list(range(6, 12))]
    clips = select_clips(fbank, 2, 1024, training=False)
    assert [int(clips[i, 0, 0]) - 1 for i in range(2)] == [2 * 1024, 8 * 1024]  # slices 2 and 8
    for seed in range(5):
        drawn = select_clips(fbank, 2, 1024, training=True, generator=torch.Generator().manual_seed(seed))
        first, second = (int(drawn[i, 0, 0]) - 1 for i in range(2))
        assert first // 1024 in range(6) and second // 1024 in range(6, 12)


def test_padding_rule_edge_cases():
    ten_seconds = select_clips(_frame_index_fbank(998), 1, 1024)  # 10 s -> 998 frames -> one slice
    assert ten_seconds.shape == (1, 1024, 2)
    assert torch.equal(ten_seconds[0, :998, 0], torch.arange(1, 999, dtype=torch.float32))
    assert (ten_seconds[0, 998:] == 0).all()  # padding is zero in normalised units
    # An exact multiple still gets a whole extra slice: 2048 frames -> 3 slices, test picks the middle one.
    assert clip_slice_groups(2048, 1, 1024) == (3072, [[0, 1, 2]])
    assert int(select_clips(_frame_index_fbank(2048), 1, 1024)[0, 0, 0]) == 1025
    # Short input with more clips than content: every clip exists, the later ones are pure padding.
    short = select_clips(_frame_index_fbank(100), 3, 1024)
    assert short.shape == (3, 1024, 2) and short[0, 99, 0] == 100 and (short[1:] == 0).all()
    # Uneven groups: 7 slices in 3 groups -> sizes 3, 2, 2 (larger first).
    assert clip_slice_groups(6 * 1024 + 5, 3, 1024)[1] == [[0, 1, 2], [3, 4], [5, 6]]


def test_too_short_waveform_gives_silent_clips():
    fbank = waveform_to_fbank(torch.zeros(399), 64)
    assert fbank.shape == (0, 64)
    torch.testing.assert_close(select_clips(fbank, 2, 1024), silent_clips(2, 1024, 64), rtol=0, atol=0)


def test_silent_clips():
    clips = silent_clips(3, 512, 64)
    assert clips.shape == (3, 512, 64) and clips.dtype == torch.float32 and not clips.any()


# ----------------------------------------------------------------------------------------------- errors


def _video_only_mp4(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_video_without_audio_raises_no_audio_stream(tmp_path):
    path = _video_only_mp4(tmp_path / "silent.mp4")
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1 and not container.streams.audio
    with pytest.raises(NoAudioStreamError, match="silent.mp4") as err:
        load_audio_clips(path, 1, 1024, 64, False)
    assert isinstance(err.value, MediaError)


def test_corrupt_file_raises_decode_error(tmp_path):
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaDecodeError, match="corrupt.mp3"):
        load_waveform(corrupt)


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(MediaDecodeError, match="nothere.mp3") as err:
        load_waveform(tmp_path / "nothere.mp3")
    assert isinstance(err.value, MediaNotFoundError) and isinstance(err.value, FileNotFoundError)
