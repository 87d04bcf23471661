"""The depth precomputation script with a stand-in estimator (the real one needs downloaded weights)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import torch

from gram.data.video import VideoTransform, load_video_frames
from tests.conftest import ROOT


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_depth", ROOT / "scripts" / "make_depth.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_depth_videos_are_written_and_load_as_the_depth_modality(sample_root, tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in sorted((sample_root / "videos").iterdir())[:2]:
        (videos / name.name).write_bytes(name.read_bytes())
    calls = []

    def vertical_ramp(image):  # a fake monocular estimate: depth grows towards the bottom of the frame
        calls.append(image.size)
        return np.tile(np.linspace(0.0, 1.0, image.height)[:, None], (1, image.width))

    assert script.main(["--videos", str(videos), "--out", str(tmp_path / "depth"), "--fps", "4",
                        "--short-side", "64"], estimator=vertical_ramp) == 0
    outputs = sorted((tmp_path / "depth").glob("*.mp4"))
    assert [p.name for p in outputs] == [p.name for p in sorted(videos.iterdir())]
    assert calls and all(min(size) == 64 for size in calls)
    frames = load_video_frames(outputs[0], 2, False, None)  # (2, 3, H, W) uint8
    top, bottom = frames[:, :, :4].float().mean(), frames[:, :, -4:].float().mean()
    assert not torch.isclose(top, bottom, atol=5.0)  # the ramp survives encoding
    clip = load_video_frames(outputs[0], 2, False, VideoTransform(32))
    assert clip.shape == (2, 3, 32, 32)
    mtime = outputs[0].stat().st_mtime_ns
    script.main(["--videos", str(videos), "--out", str(tmp_path / "depth")], estimator=vertical_ramp)
    assert outputs[0].stat().st_mtime_ns == mtime  # existing outputs are kept
