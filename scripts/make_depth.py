r"""Precompute depth videos for the depth modality (T-VASD) with a monocular depth model from transformers.

    python scripts/make_depth.py --videos data/msrvtt/videos --out data/msrvtt/depth \
        --model depth-anything/Depth-Anything-V2-Small-hf [--fps 2] [--short-side 224]

For every `<id>.mp4` it writes `<out>/<id>.mp4`: the estimated depth of each kept frame as a colour-mapped
H.264 video, which the loader reads like RGB (same frame sampling and crop; set the split's `depth_dir`). The
reference used ChronoDepth (a video diffusion model) and saved `.npy` frame arrays; `.npy` files of shape
(n, H, W, 3) uint8 in `depth_dir` are read too. Existing outputs are kept, so the script can be re-run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from PIL import Image

from gram.cli import UserError, run_with_clear_errors


def colourise(depth: np.ndarray) -> np.ndarray:
    """(H, W) float depth -> (H, W, 3) uint8, min-max normalised per frame, as the reference's colour maps."""
    from matplotlib import colormaps

    span = float(depth.max() - depth.min())
    unit = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    return (colormaps["Spectral_r"](unit)[..., :3] * 255).astype(np.uint8)


def depth_video(src: Path, dst: Path, estimate: Callable[[Image.Image], np.ndarray], fps: float,
                short_side: int) -> int:
    """Write the depth video of `src` to `dst` (via a temporary name); returns the number of frames."""
    tmp = dst.with_name(dst.name + ".part.mp4")
    frames = 0
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        stream_in = inp.streams.video[0]
        step = max(1, round(float(stream_in.average_rate or fps) / fps))
        stream = None
        for i, frame in enumerate(inp.decode(stream_in)):
            if i % step:
                continue
            image = frame.to_image()
            scale = short_side / min(image.size)
            size = (2 * round(image.width * scale / 2), 2 * round(image.height * scale / 2))
            coloured = colourise(estimate(image.resize(size)))
            if stream is None:
                stream = out.add_stream("libx264", rate=round(fps))
                stream.width, stream.height, stream.pix_fmt = coloured.shape[1], coloured.shape[0], "yuv420p"
            out.mux(stream.encode(av.VideoFrame.from_ndarray(coloured, format="rgb24")))
            frames += 1
        if stream is not None:
            out.mux(stream.encode())
    tmp.replace(dst)
    return frames


def hf_estimator(model: str, device: str) -> Callable[[Image.Image], np.ndarray]:
    from transformers import pipeline

    pipe = pipeline("depth-estimation", model=model, device=device)

    def estimate(image: Image.Image) -> np.ndarray:
        depth = pipe(image)["predicted_depth"]
        depth = depth.squeeze().float().cpu().numpy()
        return np.asarray(Image.fromarray(depth).resize(image.size))

    return estimate


def main(argv: list[str] | None = None, estimator: Callable[[Image.Image], np.ndarray] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="depth-anything/Depth-Anything-V2-Small-hf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--short-side", type=int, default=224)
    args = parser.parse_args(argv)
    videos = sorted(p for p in args.videos.iterdir() if p.suffix.lower() in {".mp4", ".mkv", ".webm", ".avi", ".mov"})
    if not videos:
        raise UserError(f"no videos in {args.videos}")
    estimate = estimator or hf_estimator(args.model, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    for src in videos:
        dst = args.out / f"{src.stem}.mp4"
        if dst.exists():
            continue
        print(f"{src.name}: {depth_video(src, dst, estimate, args.fps, args.short_side)} depth frames -> {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_with_clear_errors(main))
