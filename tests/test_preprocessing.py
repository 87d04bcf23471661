"""data.preprocessing presets: each step of `reference` against an independent formula, and the preset's path
from the config to dataset items and from a checkpoint's config.json to load_model and mode=test."""

from __future__ import annotations

import json
import logging

import av
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf

from gram import checkpoint_format as ckpt
from gram.config import DataConfig, DatasetConfig
from gram.data.audio import load_waveform, quantize_int16, reads_as_int16
from gram.data.dataset import VideoTextDataset
from gram.data.preprocessing import LEGACY_PRESET, recorded_preset
from gram.data.tokenizer import load_tokenizer
from gram.data.video import CLIP_MEAN, CLIP_STD, VideoTransform, decode_frames, sample_frame_indices
from gram.inference import load_model
from gram.main import build_model, to_dataclass
from gram.train.task import GramTask
from tests.conftest import compose_config, sample_overrides, shared_path

# ------------------------------------------------------------------------------------------------ colour


def _write_yuv_clip(path, planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], colorspace: int) -> None:
    """Losslessly encode yuv420p planes (Y (H, W), U and V (H/2, W/2)) as H.264 tagged ``colorspace``."""
    height, width = planes[0][0].shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qp": "0"}  # lossless: the decoded planes are the ones written
        stream.codec_context.colorspace = colorspace
        for y, u, v in planes:
            packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(height * 3 // 2, width)
            frame = av.VideoFrame.from_ndarray(packed, format="yuv420p")
            frame.colorspace = colorspace
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _rgb_by_hand(y: np.ndarray, u: np.ndarray, v: np.ndarray, kr: float, kb: float) -> np.ndarray:
    """Limited-range Y'CbCr -> R'G'B' (0-255) with luma weights kr, kb (BT.601: .299/.114; BT.709: .2126/.0722);
    chroma repeated over its 2x2 pixels. (H, W, 3) float."""
    u, v = (c.astype(float).repeat(2, 0).repeat(2, 1) for c in (u, v))
    luma, cb, cr = (y - 16.0) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
    kg = 1 - kr - kb
    r, b = luma + 2 * (1 - kr) * cr, luma + 2 * (1 - kb) * cb
    g = luma - (2 * kb * (1 - kb) * cb + 2 * kr * (1 - kr) * cr) / kg
    return np.clip(np.stack([r, g, b], -1), 0, 255)


def test_reference_converts_a_bt709_clip_with_bt601(tmp_path):
    rng = np.random.default_rng(0)
    size, block = 64, 8  # chroma constant over 8x8 chroma blocks, so how chroma is upsampled cannot matter inside
    y = rng.integers(16, 236, (size, size), dtype=np.uint8)
    u, v = (rng.integers(16, 241, (size // 2 // block,) * 2, dtype=np.uint8).repeat(block, 0).repeat(block, 1)
            for _ in range(2))
    path = tmp_path / "bt709.mp4"
    _write_yuv_clip(path, [(y, u, v)], colorspace=1)  # AVCOL_SPC_BT709
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).colorspace == 1
    inner = np.ones((size, size), dtype=bool)  # pixels away from chroma block edges
    edges = [i for i in range(size) if i % (2 * block) in (0, 2 * block - 1)]
    inner[edges, :] = inner[:, edges] = False
    bt601, bt709 = _rgb_by_hand(y, u, v, 0.299, 0.114), _rgb_by_hand(y, u, v, 0.2126, 0.0722)
    reference = decode_frames(path, [0], bt601=True)[0].numpy().astype(float)[inner]
    accurate = decode_frames(path, [0])[0].numpy().astype(float)[inner]
    # swscale's fixed-point conversion is within 3 levels of the exact matrix; the two matrices are ~40 apart.
    assert np.abs(reference - bt601[inner]).max() <= 3 and np.abs(reference - bt601[inner]).mean() < 1
    assert np.abs(accurate - bt709[inner]).max() <= 3 and np.abs(accurate - bt709[inner]).mean() < 1
    assert np.abs(reference - bt709[inner]).max() > 20


def test_bt601_reaches_every_pyav_decoding_path():
    """Seeking, threaded and sequential decodes all convert with the flag (here against one in-order decode)."""
    path = shared_path("data", "media", "video1.mp4")  # tagged BT.709
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24", src_colorspace="ITU601", src_color_range="MPEG")
                  for f in container.decode(video=0)]
    wanted = [3, 40, 41, 90, 130]
    for threads in (1, 3):
        assert np.array_equal(decode_frames(path, wanted, threads=threads, bt601=True).numpy(),
                              np.stack([frames[i] for i in wanted]))
    assert not np.array_equal(decode_frames(path, wanted).numpy(), np.stack([frames[i] for i in wanted]))


# ------------------------------------------------------------------------------------------------ resize

_NORMALIZE = T.Normalize(CLIP_MEAN, CLIP_STD)


def test_reference_resize_is_torchvision_float_resize_without_antialias():
    clip = torch.randint(0, 256, (3, 3, 45, 70), dtype=torch.uint8)
    floats = clip.float() / 255  # the reference divides first
    squash = VideoTransform(24, mode="none", preprocessing="reference")(clip)
    assert torch.equal(squash, _NORMALIZE(T.Resize((24, 24), antialias=False)(floats)))
    centre = VideoTransform(24, mode="crop_flip", training=False, preprocessing="reference")(clip)
    assert torch.equal(centre, _NORMALIZE(T.CenterCrop(24)(T.Resize(24, antialias=False)(floats))))
    # not the antialiased uint8 resize of the accurate preset
    accurate = VideoTransform(24, mode="none", preprocessing="accurate")(clip)
    assert (accurate - squash).abs().max() > 0.1


def test_reference_training_crop_resizes_the_float_clip_without_antialias():
    clip = torch.randint(0, 256, (2, 3, 30, 30), dtype=torch.uint8)
    whole = VideoTransform(20, mode="crop_flip", training=True, scale=(1.0, 1.0), preprocessing="reference")
    expected = _NORMALIZE(T.Resize((20, 20), antialias=False)(clip.float() / 255))  # the crop is the whole frame
    outs = [whole(clip, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(torch.equal(o, expected) or torch.equal(o, expected.flip(-1)) for o in outs)
    assert any(torch.equal(o, expected.flip(-1)) for o in outs) and any(torch.equal(o, expected) for o in outs)


# ------------------------------------------------------------------------------------------------ audio


def _write_audio(path, fmt: str, codec: str, wave: np.ndarray, rate: int = 16000) -> None:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        sample_format = "flt" if codec == "pcm_f32le" else "fltp"
        frame = av.AudioFrame.from_ndarray(wave[None, :].astype(np.float32), format=sample_format, layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_float_wav_stays_float_in_both_presets(tmp_path):
    wave = (0.5 * np.sin(np.arange(16000) * 0.05) + 1e-6).astype(np.float32)  # not on the 16-bit grid
    path = tmp_path / "float.wav"
    _write_audio(path, "wav", "pcm_f32le", wave)
    for preset in ("reference", "accurate"):
        assert torch.equal(load_waveform(path, preprocessing=preset), torch.from_numpy(wave))


def test_aac_named_mp3_is_rounded_to_16_bit_and_clipped(tmp_path):
    t = np.arange(32000) / 16000
    wave = np.sign(np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # full-scale square: AAC overshoots past 1
    path = tmp_path / "aac.mp3"
    _write_audio(path, "mp4", "aac", wave)
    with av.open(str(path)) as container:
        names = container.format.name, container.streams.audio[0].codec_context.name
    assert reads_as_int16(*names)
    accurate = load_waveform(path, preprocessing="accurate")
    reference = load_waveform(path, preprocessing="reference")
    assert accurate.abs().max() > 1  # the clipping below is exercised
    assert torch.equal(reference * 32768, (reference * 32768).round())  # multiples of 1/32768
    assert reference.max() == 32767 / 32768 and reference.min() >= -1
    assert (reference - accurate.clamp(-1, 32767 / 32768)).abs().max() <= 0.5 / 32768
    # FFmpeg's own float -> s16 conversion (what audioread's ffmpeg pipe delivers) gives the same samples.
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16")
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    ffmpeg_s16 = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768
    assert np.array_equal(quantize_int16(accurate.numpy()), ffmpeg_s16)
    assert np.array_equal(reference.numpy(), ffmpeg_s16)


def test_the_shared_mp3_files_are_told_apart_by_content():
    """audio1/3.mp3 are really MP4/AAC (librosa's FFmpeg fallback), audio2/4.mp3 real MP3 (libsndfile)."""
    for name, int16 in (("audio1.mp3", True), ("audio2.mp3", False), ("audio3.mp3", True), ("audio4.mp3", False)):
        with av.open(str(shared_path("data", "media", name))) as container:
            assert reads_as_int16(container.format.name, container.streams.audio[0].codec_context.name) == int16
    real_mp3 = shared_path("data", "media", "audio2.mp3")
    assert torch.equal(load_waveform(real_mp3, preprocessing="reference"),
                       load_waveform(real_mp3, preprocessing="accurate"))


# ------------------------------------------------------------------------------------------------ config to items


def test_unknown_preset_fails_at_config_time_naming_the_key():
    with pytest.raises(ValueError, match=r"data\.preprocessing.*'fancy'.*reference, accurate"):
        to_dataclass(compose_config("data.preprocessing=fancy"))
    with pytest.raises(ValueError, match="preprocessing"):
        VideoTransform(8, preprocessing="fancy")
    assert DataConfig().preprocessing == "reference"


def test_the_preset_reaches_dataset_items(tmp_path):
    media = shared_path("data", "media")
    annotations = tmp_path / "test.json"
    annotations.write_text(json.dumps([{"video_id": "video1", "desc": "a clip"}]))
    split = DatasetConfig(annotations=str(annotations), video_dir=str(media), audio_dir=str(media))
    items = {}
    for preset in ("reference", "accurate"):
        data = DataConfig(image_size=64, test_num_frames=2, audio_target_length=256, preprocessing=preset)
        items[preset] = VideoTextDataset(split, data, ["video", "audio"], training=False)[0]
    reference, accurate = items["reference"], items["accurate"]
    assert (reference["video"] - accurate["video"]).abs().max() > 0.1
    assert (reference["audio"] - accurate["audio"]).abs().max() > 0.01  # audio1.mp3 is AAC: quantised
    test_frames = lambda total: sample_frame_indices(total, 2, training=False)  # noqa: E731
    frames = decode_frames(media / "video1.mp4", test_frames, bt601=True).permute(0, 3, 1, 2)
    assert torch.equal(reference["video"], VideoTransform(64, preprocessing="reference")(frames))


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoint(sample_root, tmp_path_factory):
    """An untrained tiny checkpoint of the sample config (weights do not matter for the preset's path)."""
    node = compose_config(*sample_overrides(sample_root))
    cfg = to_dataclass(node)
    task = GramTask(build_model(cfg.model, load_tokenizer(cfg.data.tokenizer)), cfg.loss)
    folder = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    folder.mkdir()
    ckpt.save_weights(task, folder / ckpt.WEIGHTS)
    (folder / ckpt.CONFIG).write_text(json.dumps(OmegaConf.to_container(node, resolve=True)))
    return folder


def _record(folder, preset: str | None) -> None:
    config = json.loads((folder / ckpt.CONFIG).read_text())
    config["data"].pop("preprocessing", None)
    if preset is not None:
        config["data"]["preprocessing"] = preset
    (folder / ckpt.CONFIG).write_text(json.dumps(config))


def test_load_model_uses_the_recorded_preset(checkpoint, caplog):
    for recorded, expected in (("accurate", "accurate"), ("reference", "reference"), (None, LEGACY_PRESET)):
        _record(checkpoint, recorded)
        with caplog.at_level(logging.INFO, logger="gram.inference"):
            predictor = load_model(checkpoint)
        assert predictor.data.preprocessing == expected
        assert predictor.transform.preset.float_resize == (expected == "reference")
        assert f"preprocessing preset {expected!r}" in caplog.text
    assert recorded_preset({"data": {}}) == "accurate"
    _record(checkpoint, "reference")
    with pytest.warns(UserWarning, match="'accurate' overrides 'reference'"):
        assert load_model(checkpoint, preprocessing="accurate").data.preprocessing == "accurate"


def test_mode_test_uses_the_recorded_preset(checkpoint, sample_root, monkeypatch, caplog):
    import gram.main

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, training):
        seen.append(cfg.data.preprocessing)
        raise Stop

    monkeypatch.setattr(gram.main, "datasets", capture)
    _record(checkpoint, "accurate")
    node = compose_config(*sample_overrides(sample_root, "mode=test", f"checkpoint={checkpoint}",
                                            "data.preprocessing=reference"), output_dir=checkpoint.parent / "eval")
    with caplog.at_level(logging.INFO, logger="gram"), pytest.raises(Stop):
        gram.main.run(node)
    assert seen == ["accurate"]
    assert "data.preprocessing=reference is ignored" in caplog.text


def test_scripts_run_the_recorded_preset(checkpoint, sample_root, tmp_path, capsys):
    from tests.test_scripts_inference import diagnose, retrieve

    _record(checkpoint, "accurate")
    videos = tmp_path / "videos"
    videos.mkdir()
    for source in sorted((sample_root / "videos").glob("*.mp4"))[:2]:
        (videos / source.name).symlink_to(source)
    argv = ["--checkpoint", str(checkpoint), "--videos", str(videos), "--device", "cpu", "--query", "a clip"]
    retrieve.main(argv)
    assert "preprocessing preset: accurate" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="'reference' overrides 'accurate'"):
        retrieve.main([*argv, "--preprocessing", "reference"])
    assert "preprocessing preset: reference" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="data.preprocessing=reference is ignored"):
        diagnose.warn_ignored_preset(["data.sample_dir=x", "data.preprocessing=reference"], "accurate")
