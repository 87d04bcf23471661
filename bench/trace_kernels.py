"""Which GPU kernels the full-size finetune step runs: bf16 tensor-core GEMMs, fused attention, and the rest.

tests/test_tensor_cores.py pins on the CPU what lets a GPU use its tensor cores (aligned sizes, head dims for the
fused attention kernels, bf16 operands under autocast); only a profiler trace shows which kernels cuBLAS, cuDNN and
SDPA then pick. This profiles a few training steps of ``experiment=finetune_msrvtt_tvas`` (random weights, the
paper's input shapes, the trainer's own engine; bench/gpu.py builds them) and prints the GPU kernels by time, each
put in a class by its name (``KERNEL_CLASSES``), the share of GPU time per class, and writes a Chrome trace.

    python bench/trace_kernels.py                # one GPU: B=8, checkpointing off, 2 warm-up + 3 profiled steps
    python bench/trace_kernels.py --smoke        # CPU, tiny model: the plumbing only (CPU ops, no kernels)

What to look for (bench/README.md, "Tensor cores"): every GEMM in a bf16 class, none in "GEMM fp32/tf32";
EVA's attention in flash (or cuDNN) kernels, BEATs' and BERT's (which take masks) in memory-efficient or cuDNN
ones, no "softmax" kernels of the math fallback; convolutions and NCHW<->NHWC transposes under 1 % of GPU time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# (class, pattern on the lower-cased kernel name), first match wins. The names are those of cuBLAS (sm80/sm90
# "xmma"/"s16816" kernels, Hopper's "nvjet"), cuDNN, CUTLASS and PyTorch's own flash / memory-efficient kernels.
KERNEL_CLASSES = (
    ("attention: cuDNN", r"cudnn.*sdpa|sdpa.*cudnn"),
    ("attention: flash", r"flash_(fwd|bwd)|flash::|flash_attn"),
    ("attention: memory-efficient", r"fmha|cutlass[fb]_|attentionkernel|attentionbackwardkernel"),
    ("softmax (the loss's, or attention's math fallback)", r"softmax"),
    ("layout: NCHW<->NHWC", r"nchwtonhwc|nhwctonchw"),
    ("convolution", r"fprop|dgrad|wgrad|convolution|conv2d|implicit_gemm"),
    ("GEMM fp32/tf32 (not bf16)", r"sgemm|tf32|gemm.*f32f32_f32f32|gemm_f32"),
    ("GEMM bf16 (tensor cores)", r"gemm|nvjet|xmma|wgmma|cutlass"),
)
OTHER = "other (elementwise, norms, reductions, copies, optimizer)"


def classify(name: str) -> str:
    """The class of a kernel (or, on the CPU, an aten op) by its name."""
    lowered = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, lowered):
            return label
    return OTHER


def profile_steps(args) -> tuple[list[dict], str]:
    """Rows {name, class, calls, ms} of the profiled steps' GPU kernels (CPU ops with --smoke), and the device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(BENCH))
    import gpu  # bench/gpu.py: the same config, model, batch and step as the benchmark

    from gram.train.engine import TorchEngine

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = gpu.compose(args.smoke, args.override)
    task = gpu.build_task(cfg, device, args.checkpointing)
    engine = TorchEngine(task, gpu.trainer_config(cfg, device), device)
    step = gpu.train_step_fn(engine, gpu.synthetic_batch(cfg, args.batch, device))
    for _ in range(args.warmup):
        step()
    gpu.sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        gpu.sync(device)
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.trace))
    rows = []
    for event in prof.key_averages():
        on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_gpu or (not cuda and not event.key.startswith("aten::")):
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key, "class": classify(event.key), "calls": event.count, "ms": us / 1000})
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return sorted(rows, key=lambda r: -r["ms"]), name


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Milliseconds and share of the total per class, largest first."""
    total = sum(r["ms"] for r in rows) or 1.0
    by_class: dict[str, float] = {}
    for row in rows:
        by_class[row["class"]] = by_class.get(row["class"], 0.0) + row["ms"]
    return {k: {"ms": round(v, 3), "share": round(v / total, 4)} for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the plumbing in seconds")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 8; smoke 2)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (cuBLAS/cuDNN autotuning)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides of the config")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results", help="where the trace and JSON go")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 8)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.trace = args.out_dir / f"kernels-{stamp}.trace.json"
    args.summary = args.out_dir / f"kernels-{stamp}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, device_name = profile_steps(args)
    import torch

    classes = summary(rows)
    what = "GPU kernels" if device_name != "cpu" else "CPU aten ops (--smoke: no kernels to classify)"
    print(f"# {what} of {args.steps} steps, B={args.batch}, checkpointing={'on' if args.checkpointing else 'off'},"
          f" {device_name}, torch {torch.__version__}\n")
    print("| class | ms | share |\n|---|---|---|")
    for label, numbers in classes.items():
        print(f"| {label} | {numbers['ms']:.1f} | {numbers['share']:.1%} |")
    print("\n| class | calls | ms | kernel |\n|---|---|---|---|")
    for row in rows[: args.top]:
        print(f"| {row['class']} | {row['calls']} | {row['ms']:.2f} | {row['name'][:120]} |")
    args.summary.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "batch": args.batch,
                                        "checkpointing": args.checkpointing, "steps": args.steps,
                                        "classes": classes, "kernels": rows}, indent=1))
    print(f"\ntrace: {args.trace} (open in https://ui.perfetto.dev)\nsummary: {args.summary}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from gram.cli import run_with_clear_errors

    sys.exit(run_with_clear_errors(main))
