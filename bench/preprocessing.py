"""What the two preprocessing presets (data.preprocessing) do to a signal whose truth is known.

Everything is measured in one run on generated inputs (and the shared media when present):

1. Aliasing: a 640x360 frame of stripes finer than the 224-pixel output can hold (period 2.5 source pixels,
   ~7 px after downscaling to 224: above the output's Nyquist frequency), so a correct resize gives flat grey.
   Printed: the RMS deviation from the frame mean, and the peak-to-peak range, in [0, 1] units.
2. Colour: patches of known sRGB colours (the 6 primaries/secondaries at 75 %, skin, sky, grass, greys),
   converted to BT.709 Y'CbCr, encoded losslessly as H.264 tagged BT.709, decoded by each preset.
   Printed: mean and max |decoded - true| in 0-255 levels over all patches and channels.
3. Audio: a tone at -50 dBFS and a voice-like chirp at -70 dBFS encoded as AAC in a file named .mp3 (how the
   shared audio1/3.mp3 are), decoded by each preset. Printed: the SNR of each decode against the float decode
   (the 16-bit rounding noise the reference preset adds), and the largest normalised-fbank difference. The
   shared AAC files give the same fbank difference on real audio.
4. Cost: median ms to transform 8 frames of 640x360 to (8, 3, 224, 224), per preset.
5. The shared videos (when present): how far apart the two presets' model inputs are (8 test frames, the
   ``none`` transform at 224, CLIP-normalised units): max and relative L2 of the difference.

    python bench/preprocessing.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from gram.data.audio import load_waveform, waveform_to_fbank
from gram.data.video import VideoTransform, decode_frames

SHARED_MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "media"
PRESETS = ("reference", "accurate")
KNOWN_COLOURS = {  # sRGB 0-255
    "red75": (191, 0, 0), "green75": (0, 191, 0), "blue75": (0, 0, 191), "yellow75": (191, 191, 0),
    "cyan75": (0, 191, 191), "magenta75": (191, 0, 191), "skin": (224, 172, 138), "sky": (110, 160, 220),
    "grass": (70, 140, 50), "grey25": (64, 64, 64), "grey75": (191, 191, 191),
}


def aliasing() -> dict[str, tuple[float, float]]:
    """{preset: (RMS deviation from the mean, peak-to-peak)} of fine stripes squashed to 224x224, [0, 1] units."""
    x = np.arange(640)
    stripes = (127.5 + 127.5 * np.cos(2 * np.pi * x / 2.5)).round().astype(np.uint8)  # period 2.5 px
    frame = torch.from_numpy(np.broadcast_to(stripes, (360, 640)).copy())[None, None].expand(1, 3, 360, 640)
    out = {}
    for preset in PRESETS:
        transform = VideoTransform(224, mode="none", preprocessing=preset, mean=(0, 0, 0), std=(1, 1, 1))
        channel = transform(frame.contiguous())[0, 0]  # (224, 224) in [0, 1]
        out[preset] = (float((channel - channel.mean()).pow(2).mean().sqrt()), float(channel.max() - channel.min()))
    return out


def colour_error(folder: Path) -> dict[str, tuple[float, float]]:
    """{preset: (mean, max) |decoded - true| in levels} for known colours in a BT.709-tagged lossless clip."""
    size = 32
    truth = np.concatenate([np.full((size, size, 3), rgb, np.uint8) for rgb in KNOWN_COLOURS.values()], axis=1)
    path = folder / "bt709.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = truth.shape[1], truth.shape[0], "yuv444p"
        stream.options = {"qp": "0"}
        stream.codec_context.colorspace = 1  # BT.709
        frame = av.VideoFrame.from_ndarray(truth, format="rgb24").reformat(
            format="yuv444p", dst_colorspace="ITU709", dst_color_range="MPEG")
        frame.colorspace = 1
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    out = {}
    for preset in PRESETS:
        decoded = decode_frames(path, [0], bt601=preset == "reference")[0].numpy().astype(float)
        error = np.abs(decoded - truth)
        out[preset] = (float(error.mean()), float(error.max()))
    return out


def _write_aac(path: Path, wave: np.ndarray, rate: int = 16000) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def audio_quantisation(folder: Path) -> dict[str, tuple[float, float]]:
    """{clip: (SNR dB of the reference decode against the float one, max |fbank difference|)}."""
    t = np.arange(5 * 16000) / 16000
    clips = {
        "tone -50 dBFS": 10 ** (-50 / 20) * np.sin(2 * np.pi * 440 * t),
        "chirp -70 dBFS": 10 ** (-70 / 20) * np.sin(2 * np.pi * (200 + 300 * t) * t),
    }
    paths = {}
    for name, wave in clips.items():
        paths[name] = folder / f"{name.split()[0]}.mp3"  # AAC named .mp3, like the shared audio1.mp3
        _write_aac(paths[name], wave)
    for name in ("audio1.mp3", "audio3.mp3"):
        if (SHARED_MEDIA / name).is_file():
            paths[f"shared {name}"] = SHARED_MEDIA / name
    out = {}
    for name, path in paths.items():
        exact = load_waveform(path, preprocessing="accurate")
        rounded = load_waveform(path, preprocessing="reference")
        snr = 10 * np.log10(float(exact.pow(2).sum()) / max(float((rounded - exact).pow(2).sum()), 1e-30))
        fbank = (waveform_to_fbank(rounded) - waveform_to_fbank(exact)).abs().max()
        out[name] = (snr, float(fbank))
    return out


def transform_cost(repeats: int = 7) -> dict[str, float]:
    """{preset: median ms} to turn 8 uint8 frames of 640x360 into (8, 3, 224, 224), crop_flip test transform."""
    frames = torch.randint(0, 256, (8, 3, 360, 640), dtype=torch.uint8)
    out = {}
    for preset in PRESETS:
        transform = VideoTransform(224, mode="crop_flip", preprocessing=preset)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            transform(frames)
            times.append(1000 * (time.perf_counter() - start))
        out[preset] = statistics.median(times)
    return out


def shared_video_gap() -> dict[str, tuple[float, float]]:
    """{video: (max |reference - accurate|, relative L2)} of the 8 test frames' model inputs (CLIP-normalised)."""
    from gram.data.video import load_video_frames

    out = {}
    for path in sorted(SHARED_MEDIA.glob("video*.mp4")):
        inputs = {preset: load_video_frames(path, 8, False, VideoTransform(224, preprocessing=preset))
                  for preset in PRESETS}
        gap = inputs["reference"] - inputs["accurate"]
        out[path.name] = (float(gap.abs().max()), float(gap.norm() / inputs["reference"].norm()))
    return out


def main() -> None:
    print(f"torch {torch.__version__}, PyAV {av.__version__}, {torch.get_num_threads()} threads")
    print("\n1. aliasing: stripes of period 2.5 px, 640x360 -> 224x224 (correct: flat grey)")
    for preset, (rms, span) in aliasing().items():
        print(f"   {preset:<10} RMS {rms:.3f}   peak-to-peak {span:.3f}   ([0, 1] units)")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"\n2. colour: {len(KNOWN_COLOURS)} known colours, BT.709-tagged lossless H.264 (error in 0-255 levels)")
        for preset, (mean, worst) in colour_error(Path(tmp)).items():
            print(f"   {preset:<10} mean {mean:.2f}   max {worst:.0f}")
        print("\n3. audio in AAC (.mp3 name): reference (16-bit rounded) against the float decode")
        for name, (snr, fbank) in audio_quantisation(Path(tmp)).items():
            print(f"   {name:<22} SNR {snr:6.1f} dB   max |fbank difference| {fbank:.3f} (normalised units)")
    print("\n4. cost: 8 frames 640x360 -> (8, 3, 224, 224), crop_flip test transform (median ms)")
    for preset, ms in transform_cost().items():
        print(f"   {preset:<10} {ms:.1f} ms")
    gaps = shared_video_gap()
    if gaps:
        print("\n5. shared videos: reference vs accurate model inputs, 8 test frames, none transform (CLIP units)")
        for name, (worst, rel) in gaps.items():
            print(f"   {name:<12} max {worst:.2f}   relative L2 {100 * rel:.1f} %")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
