"""Audio front end for BEATs: decode by content, resample to 16 kHz, Kaldi fbank, clip selection.

This follows the reference's ``beats`` branch (gram-reference.md §5.4):

1. decode the file (any container PyAV/FFmpeg can read: real MP3, MP4/AAC files named ``.mp3``, the audio track of
   an ``.mp4`` video), downmix to mono by averaging the channels (what ``librosa.load`` does);
2. resample to 16 kHz with ``torchaudio.transforms.Resample`` and its defaults (``sinc_interp_hann``, width 6,
   rolloff 0.99), exactly as the reference, so features match the reference's bit for bit on the same waveform.
   PyAV's own resampler (FFmpeg swresample) is faster but uses a different filter;
3. ``torchaudio.compliance.kaldi.fbank`` on the waveform scaled by 2^15, then ``(x - 15.41663) / (2 * 6.55582)``;
4. zero-pad (in normalised units) and cut into ``num_clips`` clips of ``target_length`` frames.

With the ``reference`` preprocessing preset (gram/data/preprocessing.py), audio that libsndfile cannot read is rounded
to 16-bit PCM before the downmix (:func:`reads_as_int16`), as the reference's ``librosa.load`` returns it.

A clip without audio gets :func:`silent_clips`: zeros in normalised units, the same value as the reference's padding.
"""

from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

from gram.data.errors import (  # noqa: F401  (re-exported: the media errors' historical home)
    MediaDecodeError,
    MediaError,
    MediaNotFoundError,
    NoAudioStreamError,
    TruncatedMediaError,
    raise_if_truncated,
)
from gram.data.preprocessing import DEFAULT_PRESET, get_preset

SAMPLE_RATE = 16000
# What libsndfile (soundfile, hence librosa's first choice) decodes: {FFmpeg demuxer name: codecs}. Everything else
# goes through librosa's audioread + FFmpeg fallback, which delivers 16-bit PCM.
SNDFILE_READABLE = {
    "wav": ("pcm_", "adpcm_ima_wav", "adpcm_ms", "gsm_ms"),
    "w64": ("pcm_",),
    "aiff": ("pcm_",),
    "au": ("pcm_",),
    "flac": ("flac",),
    "ogg": ("vorbis", "opus", "flac"),
    "mp3": ("mp1", "mp2", "mp3"),  # libsndfile >= 1.1 reads MPEG audio; FFmpeg names its decoders mp3float etc.
}
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


def load_waveform(path: str | Path, sample_rate: int = SAMPLE_RATE, preprocessing: str = DEFAULT_PRESET) -> torch.Tensor:
    """Decode the audio of ``path`` (by content, not by extension) to mono float32 at ``sample_rate``.

    Returns a (T,) float32 tensor in [-1, 1] units. With the ``reference`` preset, a file libsndfile cannot read is
    first rounded to 16-bit PCM per channel (:func:`quantize_int16`). Raises :class:`MediaNotFoundError` for a
    missing file, :class:`NoAudioStreamError` when the file has no audio stream and :class:`MediaDecodeError` when
    it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"audio file not found: {path}")
    int16_fallback = get_preset(preprocessing, "preprocessing").int16_fallback
    channels, native_rate, (container, codec) = _decode_audio(path)
    if int16_fallback and reads_as_int16(container, codec):
        channels = quantize_int16(channels)
    mono = torch.from_numpy(channels.mean(axis=0, dtype=np.float32))
    if native_rate == sample_rate:
        return mono
    # The reference's exact transform (its kernel matches the parity vectors bit for bit; the functional form
    # builds its kernel slightly differently and is off by ~2e-6).
    return _resampler(native_rate, sample_rate)(mono)


def reads_as_int16(container: str, codec: str) -> bool:
    """Whether ``librosa.load`` returns this audio as 16-bit PCM: libsndfile cannot read it (see
    :data:`SNDFILE_READABLE`), so it falls back to audioread + FFmpeg. ``container`` is FFmpeg's demuxer name as
    PyAV reports it (e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"`` for AAC, even in a file named .mp3), ``codec`` the decoder.
    """
    codecs = SNDFILE_READABLE.get(container)
    return codecs is None or not codec.startswith(codecs)


def quantize_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples as FFmpeg converts them to 16-bit PCM and librosa reads them back: round half to even
    (``lrintf``) of x * 2^15, clipped to [-32768, 32767], divided by 2^15. Same shape, float32."""
    return (np.clip(np.rint(samples * np.float32(32768)), -32768, 32767) / np.float32(32768)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _resampler(source_rate: int, target_rate: int) -> torchaudio.transforms.Resample:
    """Building the sinc kernel costs more than applying it; datasets use a handful of rates, so keep them."""
    return torchaudio.transforms.Resample(source_rate, target_rate)


def _decode_audio(path: Path) -> tuple[np.ndarray, int, tuple[str, str]]:
    """Decode the first audio stream of ``path`` to planar float32: ((channels, samples) array, sample rate,
    (container format, codec) names as FFmpeg reports them)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioStreamError(f"no audio stream in {path}; use silent_clips() for such a clip")
            stream = container.streams.audio[0]
            raise_if_truncated(stream, path)
            source = (container.format.name, stream.codec_context.name)
            chunks, rate = _decode_stream(container, stream)
    except (av.FFmpegError, ValueError) as err:
        # PyAV raises ValueError when a stream changes its layout or rate mid-file (the resampler cannot follow).
        raise MediaDecodeError(f"cannot decode audio of {path}: {err}") from err
    if not chunks:
        raise MediaDecodeError(f"no audio samples could be decoded from {path}")
    return np.concatenate(chunks, axis=1), rate, source


def _decode_stream(container: av.container.InputContainer, stream: av.AudioStream) -> tuple[list[np.ndarray], int]:
    """All frames of ``stream`` as planar float32 chunks (channels, samples), and their sample rate."""
    # Converting only the sample format (not layout or rate) keeps every channel so we downmix like librosa.
    resampler = av.AudioResampler(format="fltp")
    frames = []
    for frame in container.decode(stream):
        frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    chunks = [frame.to_ndarray() for frame in frames if frame.samples > 0]
    return chunks, (frames[0].sample_rate if frames else 0)


def waveform_to_fbank(wave: torch.Tensor, mel_bins: int = 64) -> torch.Tensor:
    """Normalised Kaldi log-mel fbank of a 16 kHz waveform, exactly as the reference computes it for BEATs.

    ``wave``: (T,) float in [-1, 1] units at 16 kHz. Returns (frames, mel_bins) float32 with
    frames = 1 + (T - 400) // 160 (25 ms windows every 10 ms, snip_edges), or 0 frames for T < 400.
    """
    if wave.dim() != 1:
        raise ValueError(f"waveform_to_fbank expects a (T,) mono waveform, got shape {tuple(wave.shape)}")
    if wave.numel() < 400:
        # Kaldi fbank needs one full 25 ms window; a shorter wave has no frame (clips are then all padding).
        return torch.zeros(0, mel_bins, dtype=torch.float32)
    fbank = torchaudio.compliance.kaldi.fbank(
        wave.float().unsqueeze(0) * 2**15,  # (1, T): Kaldi expects 16-bit integer scale
        num_mel_bins=mel_bins,
        sample_frequency=SAMPLE_RATE,
        frame_length=25,
        frame_shift=10,
    )
    return (fbank - FBANK_MEAN) / (2 * FBANK_STD)


def clip_slice_groups(num_frames: int, num_clips: int, target_length: int) -> tuple[int, list[list[int]]]:
    """The reference's padding and grouping rule: (padded frame count, ``num_clips`` groups of slice indices).

    The fbank is padded by ``max(T*n - L, T - L % T)`` frames (so at least one frame, and a whole extra slice when
    L is a multiple of T), cut into ``L' // T`` slices, and the slices split into ``n`` contiguous groups whose
    sizes differ by at most one (larger groups first).
    """
    if num_clips < 1 or target_length < 1:
        raise ValueError(f"num_clips and target_length must be >= 1, got {num_clips}, {target_length}")
    pad = max(target_length * num_clips - num_frames, target_length - num_frames % target_length)
    padded = num_frames + pad
    num_slices = padded // target_length
    size, extra = divmod(num_slices, num_clips)
    groups = [
        list(range(i * size + min(i, extra), (i + 1) * size + min(i + 1, extra))) for i in range(num_clips)
    ]
    return padded, groups


def select_clips(
    fbank: torch.Tensor,
    num_clips: int,
    target_length: int = 1024,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pad a normalised fbank with zeros and pick one ``target_length`` slice per group (reference rule).

    ``fbank``: (frames, F). Returns (num_clips, target_length, F). In training a uniformly random slice is taken
    from each group (drawn from ``generator``); otherwise the lower-middle slice of each group, deterministically.
    """
    if fbank.dim() != 2:
        raise ValueError(f"select_clips expects a (frames, mel_bins) fbank, got shape {tuple(fbank.shape)}")
    padded_len, groups = clip_slice_groups(fbank.shape[0], num_clips, target_length)
    padded = torch.nn.functional.pad(fbank, (0, 0, 0, padded_len - fbank.shape[0]))  # (L', F), zeros at the end
    picks = [_pick_slice(group, training, generator) for group in groups]
    slices = padded[: (padded_len // target_length) * target_length].view(-1, target_length, fbank.shape[1])
    return slices[picks]  # (num_clips, target_length, F)


def _pick_slice(group: list[int], training: bool, generator: torch.Generator | None) -> int:
    """A random member of ``group`` in training, else its lower-middle member."""
    if training:
        return group[int(torch.randint(len(group), (1,), generator=generator))]
    return group[(len(group) - 1) // 2]


def load_audio_clips(
    path: str | Path,
    num_clips: int,
    target_length: int,
    mel_bins: int,
    training: bool,
    generator: torch.Generator | None = None,
    preprocessing: str = DEFAULT_PRESET,
) -> torch.Tensor:
    """Decode ``path`` and return BEATs input clips (num_clips, target_length, mel_bins), normalised fbank.

    ``preprocessing``: the preset (see :func:`load_waveform`). Raises the :class:`MediaError` subclasses of
    :func:`load_waveform`.
    """
    fbank = waveform_to_fbank(load_waveform(path, preprocessing=preprocessing), mel_bins)  # (frames, mel_bins)
    return select_clips(fbank, num_clips, target_length, training, generator)


def silent_clips(num_clips: int, target_length: int = 1024, mel_bins: int = 64) -> torch.Tensor:
    """The defined input of a clip without audio: zeros (num_clips, target_length, mel_bins).

    Zero is in normalised units, the value the reference pads with (and what it returns for a missing file); callers
    should also mark the clip as silent so it can be masked and counted.
    """
    return torch.zeros(num_clips, target_length, mel_bins, dtype=torch.float32)
