"""Benchmark the GRAM encoders: per-encoder forward time and peak memory, and full-size train steps on a GPU.

Default (CPU, the sizes of ``configs/model/tiny.yaml``): for each encoder (text BERT, the DAM cross-encoder, i.e.
the text BERT with cross-attention over video+audio tokens, EVA vision per frame, BEATs audio) the forward time
(best and median of the repeats, eval mode, no grad) and the peak memory of one forward: parameters + activations +
inputs alive at the peak, tracked per tensor by ``torch.distributed._tools.mem_tracker.MemTracker`` (a
dispatch-mode tracker that works on CPU; torch has no CPU allocator statistics). ``--train`` adds the time of one
tiny train step (forward, backward, AdamW step of the whole task on CPU).

``--full``: the full-size model (EVA01-g/14, BEATs, BERT-base; random weights) on CUDA, one train step
(GramTask forward with the volume + DAM losses, backward, AdamW) in bf16 autocast, at batch 8 and 32, with and
without gradient checkpointing of the three encoders: median step time and ``torch.cuda.max_memory_allocated``.
Without CUDA it prints a message and skips. A configuration that runs out of memory is reported as OOM.

    python bench/models.py                 # tiny, CPU
    python bench/models.py --train         # + tiny train step
    python bench/models.py --full          # full size, GPU (8 frames of 224 px, 1 clip of 1024x64 fbank)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gram.config import ModelConfig, TrainerConfig
from gram.losses import LossConfig
from gram.models.gram_model import GramModel
from gram.train.engine import TorchEngine
from gram.train.task import GramTask

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size of the tiny forward benchmark")
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--audio-frames", type=int, default=256, help="fbank frames per clip (tiny)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op CPU threads (default 1: stable timings on a shared machine; 0: torch's)")
    parser.add_argument("--train", action="store_true", help="also time one tiny train step on the CPU")
    parser.add_argument("--full", action="store_true", help="full-size train steps on CUDA (bf16)")
    parser.add_argument("--full-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--full-repeats", type=int, default=5)
    return parser.parse_args()


def tiny_config() -> ModelConfig:
    """configs/model/tiny.yaml as a ModelConfig (no weight files)."""
    node = OmegaConf.load(TINY_YAML)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def full_config(checkpointing: bool) -> ModelConfig:
    """gram_base (the schema defaults), random weights, every encoder checkpointed or none."""
    cfg = ModelConfig()
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, grad_checkpointing=checkpointing),
        audio=dataclasses.replace(cfg.audio, grad_checkpointing=checkpointing),
        text=dataclasses.replace(cfg.text, grad_checkpointing=checkpointing))


def make_batch(cfg: ModelConfig, batch: int, text_len: int, audio_frames: int, device: torch.device) -> dict:
    """Synthetic inputs: token ids (B, L), frames (B, n, 3, S, S), fbanks (B, clips, T, 64)."""
    size = cfg.vision.image_size
    ids = torch.randint(1, cfg.text.vocab_size, (batch, text_len), device=device)
    return {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "video": torch.randn(batch, cfg.max_frames, 3, size, size, device=device),
            "audio": torch.randn(batch, cfg.max_audio_clips, audio_frames, 64, device=device)}


# ------------------------------------------------------------------------------------------------ tiny forward
def encoder_calls(model: GramModel, batch: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """One forward per encoder; the cross-encoder attends over the video + audio condition tokens."""
    text = batch["text"]
    with torch.no_grad():
        tokens = {m: model.encode_tokens(m, batch[m]) for m in ("video", "audio")}
        condition = model.condition_tokens(tokens)  # (B, n*P + clips*N, H)
    return {
        "text (BERT)": lambda: model.encoders["text"](text["input_ids"], text["attention_mask"]),
        "cross-encoder (DAM)": lambda: model.encoders["text"](text["input_ids"], text["attention_mask"], condition),
        "vision (EVA, per frame)": lambda: model.encoders["vision"](batch["video"].flatten(0, 1)),
        "audio (BEATs)": lambda: model.encoders["audio"](batch["audio"].flatten(0, 1)),
    }


def step_times(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def ms(times: list[float]) -> str:
    """'best / median' in milliseconds: on a shared machine the best is the least disturbed run."""
    return f"{min(times) * 1e3:.2f} / {statistics.median(times) * 1e3:.2f}"


def peak_forward_memory(module: torch.nn.Module, fn: Callable[[], object]) -> int:
    """Peak bytes (params + buffers + inputs + activations) of one no-grad forward, tracked per tensor."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module)
    with torch.no_grad(), tracker:
        fn()
    return sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())


def bench_tiny(args: argparse.Namespace) -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GramModel(cfg).eval()
    batch = make_batch(cfg, args.batch, args.text_len, args.audio_frames, torch.device("cpu"))
    print(f"tiny encoders on CPU ({torch.get_num_threads()} threads), batch {args.batch}: text {args.text_len} "
          f"tokens, {cfg.max_frames} frames of {cfg.vision.image_size} px, {cfg.max_audio_clips} clip of "
          f"{args.audio_frames}x64 fbank; {args.repeats} repeats")
    print(f"{'encoder':26s} {'params':>10s} {'forward ms best / median':>25s} {'peak MiB':>9s}")
    encoders = {"text (BERT)": "text", "cross-encoder (DAM)": "text", "vision (EVA, per frame)": "vision",
                "audio (BEATs)": "audio"}
    for name, fn in encoder_calls(model, batch).items():
        module = model.encoders[encoders[name]]
        with torch.no_grad():
            times = step_times(fn, args.repeats)
        params = sum(p.numel() for p in module.parameters())
        print(f"{name:26s} {params:>10,d} {ms(times):>25s} {peak_forward_memory(module, fn) / MIB:>9.2f}")
    if args.train:
        step = train_step_fn(cfg, args.batch, torch.device("cpu"), "fp32", args.text_len, args.audio_frames)
        print(f"tiny train step (fp32, CPU, batch {args.batch}), ms best / median: {ms(step_times(step, args.repeats))}")


# ------------------------------------------------------------------------------------------------ train steps
def train_step_fn(cfg: ModelConfig, batch_size: int, device: torch.device, precision: str, text_len: int,
                  audio_frames: int) -> Callable[[], None]:
    """A closure running one full train step (forward with both losses, backward, AdamW) of a fresh task."""
    task = GramTask(GramModel(cfg), LossConfig()).to(device).train()
    engine = TorchEngine(task, TrainerConfig(precision=precision, max_steps=1000), device)
    batch = make_batch(cfg, batch_size, text_len, audio_frames, device)

    def step() -> None:
        losses = engine.forward_backward(batch, 1, last=True)
        engine.step(finite=bool(torch.isfinite(losses["loss"])))

    return step


def bench_full(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("--full: no CUDA device visible; the full-size train-step benchmark needs a GPU (skipped)")
        return
    device = torch.device("cuda")
    print(f"full-size train step on {torch.cuda.get_device_name(device)}, bf16 autocast, AdamW, text 40 tokens, "
          f"8 frames of 224 px, 1 clip of 1024x64 fbank; median of {args.full_repeats}")
    print(f"{'batch':>5s} {'checkpointing':>13s} {'step s':>8s} {'peak GiB':>9s}")
    for batch_size in args.full_batches:
        for checkpointing in (False, True):
            print(f"{batch_size:>5d} {str(checkpointing):>13s} {full_step(args, device, batch_size, checkpointing)}")


def full_step(args: argparse.Namespace, device: torch.device, batch_size: int, checkpointing: bool) -> str:
    """'<median step s> <peak GiB>' of one configuration, or 'OOM'."""
    gc.collect()  # the previous configuration's task (and an OOM traceback's tensors) must be gone
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step = train_step_fn(full_config(checkpointing), batch_size, device, "bf16", 40, 1024)
        seconds = statistics.median(step_times(step, args.full_repeats, sync=torch.cuda.synchronize))
    except torch.cuda.OutOfMemoryError:
        return f"{'OOM':>8s} {'-':>9s}"
    finally:
        step = None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return f"{seconds:>8.2f} {peak:>9.1f}"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_tiny(args)
    if args.full:
        bench_full(args)


if __name__ == "__main__":
    main()
