"""Benchmark: the full-size GRAM finetune step on one GPU, unattended, in a few minutes.

Random weights at the real shapes (``experiment=finetune_msrvtt_tvas``: EVA01-CLIP-g/14 + BEATs + BERT-base with
cross-attention, T-VAS, nothing downloaded) and synthetic inputs at the paper's shapes (4 train / 8 test frames of
224 px, one 1024-frame fbank clip, 40-token captions, 70-token subtitles). Sections, each guarded so that an OOM,
a compile error or its time limit is recorded in the table and the rest still runs:

* ``attention``: each encoder's forward in bf16 with SDPA restricted to the fused kernels (flash, memory-efficient,
  cuDNN; no math fallback), and the count of SDPA vs explicit softmax calls;
* ``step``: forward, GRAM + DAM loss, backward and AdamW through the trainer's own engine
  (``gram.train.engine.TorchEngine``, bf16 autocast), batch sizes doubling until one does not fit, with and
  without gradient checkpointing: samples/s, step ms, peak memory, and MFU = model FLOPs per sample
  (``torch.utils.flop_counter`` on one eager step without checkpointing, so recomputation is not counted) x
  samples/s / the card's dense bf16 peak (``PEAK_BF16_TFLOPS``, by device name); and the trainer's own step with
  its numbers read at once (the host waits for the device every step) vs one step late, as ``Trainer.fit`` does;
* ``compile``: the same step with every transformer block of the three encoders compiled (``torch.compile``,
  regional, so 40 identical EVA blocks compile once) against eager, at one batch size;
* ``zero2``: the same step under DeepSpeed ZeRO-2 on one rank (``gram.train.engine.DeepSpeedEngine``) against the
  plain engine at the same batch size: the plumbing cost;
* ``loss``: the GRAM loss alone (``bench/loss.py``'s inputs and method) at B = 1024-8192, k = 3/4/5, bf16, forward
  and forward+backward as ratios to one B x B x d matmul;
* ``eval``: the streamed volume retrieval metrics (``bench/eval.py``'s inputs) at N = 5000-20000 as a ratio to one
  N x N x d matmul.

It prints one table, writes the results as JSON (``--out``) and appends the table to ``bench/README.md`` with the
date, card, driver and torch version (``--no-readme`` to skip). ``--budget-s`` bounds the whole run (default 420 s);
each section gets a share and stops cleanly at it.

    python bench/gpu.py                     # one GPU, under 8 minutes on an H100/H200
    python bench/gpu.py --smoke             # CPU, tiny model (configs/model/tiny.yaml), a few seconds
    python bench/gpu.py --sections step loss --budget-s 200
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECTIONS = ("attention", "step", "compile", "zero2", "loss", "eval")
SMOKE_SECTIONS = ("attention", "step", "compile", "loss", "eval")  # zero2: DeepSpeed JIT-builds an op on CPU (~36 s)
# Share of the overall budget each section may use (the rest is model building and slack).
SHARES = {"attention": 0.04, "step": 0.34, "compile": 0.2, "zero2": 0.16, "loss": 0.1, "eval": 0.06}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in this order as a
# substring of torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM card).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800 PCIe", 756.0), ("H800", 989.4), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.05), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("A6000", 154.8),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 0.0),  # V100: no bf16 tensor cores
)


class SectionTimeout(Exception):
    """A section ran past its share of the time budget."""


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops or None
    return None


# ------------------------------------------------------------------------------------------------ set-up
def compose(smoke: bool, extra: list[str]):
    """The typed GramConfig of the finetune experiment (or the tiny sample run for --smoke), encoder weights off."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from gram.config import register_configs, without_pretrained

    register_configs()
    overrides = ["experiment=sample" if smoke else "experiment=finetune_msrvtt_tvas", "output_dir=unused",
                 "init_from=null", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))
    without_pretrained(cfg.model)
    if smoke:  # exercise the same modalities as the finetune (T-VAS) at tiny sizes
        cfg.model.modalities = ["video", "audio", "subtitle"]
    return cfg


def build_task(cfg, device, grad_checkpointing: bool = False):
    """GramTask with random weights, built directly on ``device`` (a 1.4 B model initialises in seconds there)."""
    import torch

    from gram.models.gram_model import GramModel
    from gram.train.task import GramTask

    torch.manual_seed(0)
    with torch.device(device):
        task = GramTask(GramModel(cfg.model), cfg.loss)
    set_checkpointing(task, grad_checkpointing)
    return task.to(device).train()


def set_checkpointing(task, enable: bool) -> None:
    for encoder in task.model.encoders.values():
        encoder.set_grad_checkpointing(enable)


def synthetic_batch(cfg, batch_size: int, device, training: bool = True, seed: int = 0) -> dict[str, Any]:
    """A batch in the dataset's layout (gram/data/dataset.py) at the config's shapes, on ``device``."""
    import torch

    data, model = cfg.data, cfg.model
    gen = torch.Generator().manual_seed(seed)
    vocab = model.text.vocab_size

    def tokens(length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch_size, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    frames = data.num_frames if training else data.test_num_frames
    out: dict[str, Any] = {"ids": [str(i) for i in range(batch_size)], "skipped": [], "text": tokens(data.max_text_len)}
    for modality in model.modalities:
        if modality in ("video", "depth"):
            out[modality] = torch.randn(batch_size, frames, 3, data.image_size, data.image_size, generator=gen)
        elif modality == "audio":
            out["audio"] = torch.randn(batch_size, data.num_audio_clips, data.audio_target_length,
                                       data.audio_mel_bins, generator=gen)
            out["audio_mask"] = torch.ones(batch_size, dtype=torch.bool)
        elif modality == "subtitle":
            out["subtitle"] = tokens(data.max_subtitle_len)
    from gram.data.batch import move_to

    return move_to(out, device)


def trainer_config(cfg, device, **changes):
    precision = "bf16" if device.type == "cuda" else "fp32"
    return dataclasses.replace(cfg.trainer, precision=precision, grad_accum_steps=1, **changes)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------ guards
class Run:
    """The run's budget, records and per-section guards."""

    def __init__(self, budget_s: float, smoke: bool, min_case_s: float = 0.0):
        self.start, self.budget_s, self.smoke, self.min_case_s = time.perf_counter(), budget_s, smoke, min_case_s
        self.records: list[dict[str, Any]] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def guard(self, section: str, name: str, limit_s: float, alarm: bool = True) -> Iterator[dict[str, Any]]:
        """Yield a record; an exception or the time limit becomes its status, and the run goes on.

        Only the innermost guard arms the timer (``alarm``): a section's guard catches what its cases do not.
        """
        record: dict[str, Any] = {"section": section, "name": name, "status": "ok"}
        self.records.append(record)
        limit = min(max(limit_s, self.min_case_s), self.left())
        if limit <= 1:
            record.update(status="skipped (time budget spent)", seconds=0.0)
            print(format_record(record), flush=True)
            yield record
            return
        started = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _raise_timeout) if alarm and hasattr(signal, "SIGALRM") else None
        if previous is not None:
            # Fires again every 2 s: a timeout raised inside a callback that swallows it (dynamo's weakref
            # finalisers) is repeated until it lands in the section's own code.
            signal.setitimer(signal.ITIMER_REAL, limit, 2.0)
        try:
            yield record
        except SectionTimeout:
            record["status"] = f"timeout ({limit:.0f} s)"
        except Exception as error:  # a failure is a result: record it, keep going
            if "SectionTimeout" in str(error) or isinstance(error.__cause__, SectionTimeout):  # wrapped by dynamo
                record["status"] = f"timeout ({limit:.0f} s)"
            else:
                record["status"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: " + \
                    " ".join(str(error).split())[:160]
            if os.environ.get("GRAM_DEBUG") == "1":
                traceback.print_exc()
        finally:
            if previous is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
            record["seconds"] = round(time.perf_counter() - started, 1)
            if alarm or record["status"] != "ok":
                print(format_record(record), flush=True)


def _raise_timeout(signum, frame) -> None:
    raise SectionTimeout


# ------------------------------------------------------------------------------------------------ sections
def time_steps(step: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls (the peak-memory counter restarts after warm-up)."""
    for _ in range(warmup):
        step()
    sync(device)
    reset_memory(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def train_step_fn(engine, batch) -> Callable[[], object]:
    def step():
        engine.forward_backward(batch, 1, last=True)
        engine.step(True)

    return step


def count_step_flops(engine, batch) -> int:
    """FLOPs of one training step (matmuls, convolutions and attention; forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step_fn(engine, batch)()
    return counter.get_total_flops()


def section_attention(run: Run, cfg, device, args) -> None:
    """Each encoder in bf16 with the math SDPA kernel excluded; SDPA and softmax calls counted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    task = build_task(cfg, device).eval()
    batch = synthetic_batch(cfg, 2, device)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    model = task.model
    for modality in ("text", *model.modalities):
        with run.guard("attention", modality, args.share["attention"] / 4) as record:
            counts = AttentionCallCounter()
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                with counts:
                    model.encode_tokens(modality, batch[modality])
                if device.type == "cuda":
                    with sdpa_kernel(fused):  # raises if only the math kernel could run
                        model.encode_tokens(modality, batch[modality])
            record.update(sdpa_calls=counts.sdpa, softmax_calls=counts.softmax,
                          fused_kernels="yes" if device.type == "cuda" else "n/a (CPU)")
    del task
    reset_memory(device)


class AttentionCallCounter:
    """Counts calls of ``F.scaled_dot_product_attention`` and of any softmax while active."""

    def __init__(self) -> None:
        self.sdpa = self.softmax = 0
        self._mode = None

    def __enter__(self):
        from torch.overrides import TorchFunctionMode

        counter = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                counter.sdpa += name == "scaled_dot_product_attention"
                counter.softmax += "softmax" in name
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def batch_ladder(args) -> list[int]:
    return args.batch_sizes


def section_step(run: Run, cfg, device, args, results: dict) -> None:
    """The finetune step at doubling batch sizes, without and with gradient checkpointing."""
    from gram.train.engine import TorchEngine

    task = build_task(cfg, device)
    engine = TorchEngine(task, trainer_config(cfg, device), device)
    flops_per_sample = None
    peak = args.peak_tflops
    per_setting = args.share["step"] / 2
    for checkpointing in (False, True):
        set_checkpointing(task, checkpointing)
        setting_end = time.perf_counter() + per_setting
        for batch_size in batch_ladder(args):
            left = setting_end - time.perf_counter()
            name = f"B={batch_size} ckpt={'on' if checkpointing else 'off'}"
            with run.guard("step", name, left) as record:
                batch = synthetic_batch(cfg, batch_size, device)
                seconds = time_steps(train_step_fn(engine, batch), device, args.warmup, args.iters)
                if flops_per_sample is None and not checkpointing:
                    flops_per_sample = count_step_flops(engine, batch) / batch_size
                    results["flops_per_sample"] = flops_per_sample
                record.update(batch=batch_size, checkpointing=checkpointing, step_ms=round(1000 * seconds, 1),
                              samples_per_s=round(batch_size / seconds, 2), peak_gib=_round(peak_gib(device)))
                if flops_per_sample and peak:
                    record["mfu"] = round(flops_per_sample * batch_size / seconds / (peak * 1e12), 4)
                results.setdefault("step", {})[name] = dict(record)
            engine.optimizer.zero_grad(set_to_none=True)
            batch = None
            reset_memory(device)
            if record["status"] != "ok":
                break  # OOM (or time): larger batches will not fit either
        if not checkpointing:
            measure_trainer_reads(run, cfg, device, args, engine, results)
    del engine, task
    reset_memory(device)


class RepeatStream:
    """The trainer's data stream, serving one prepared batch every step."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch, self.micro_batch = batch, len(batch["ids"])

    def __next__(self) -> dict[str, Any]:
        return self.batch

    def state(self) -> dict[str, int]:
        return {}


def measure_trainer_reads(run: Run, cfg, device, args, engine, results: dict) -> None:
    """The trainer's own step (``gram.train.trainer.Trainer``, on the section's engine) with its numbers read at
    once (``train_step``: the host waits for the device every step) vs read one step late, as ``fit`` does
    (``launch_step`` then ``settle`` of the previous step: the device never waits for the host)."""
    import tempfile

    from gram.train.trainer import Trainer

    batch_size = largest_fitting(results, False, args.compile_batch) or min(args.batch_sizes)
    stream = RepeatStream(synthetic_batch(cfg, batch_size, device))
    with tempfile.TemporaryDirectory() as scratch:  # the trainer writes nothing without fit
        trainer = Trainer(dataclasses.replace(cfg, trainer=trainer_config(cfg, device)), engine.task, stream, device,
                          {}, scratch)
    trainer.engine = engine  # its optimizer state exists already
    pending: list = []

    def read_late() -> None:
        pending.append(trainer.launch_step())
        if len(pending) > 1:
            trainer.settle(pending.pop(0))

    timings = {}
    for name, step in (("trainer reads at once", trainer.train_step), ("trainer reads late", read_late)):
        with run.guard("step", f"{name} B={batch_size}", args.share["step"] / 10) as record:
            seconds = time_steps(step, device, args.warmup, args.iters)
            timings[name] = seconds
            record.update(batch=batch_size, step_ms=round(1000 * seconds, 1),
                          samples_per_s=round(batch_size / seconds, 2))
            if name.endswith("late") and len(timings) == 2:
                record["speedup"] = round(timings["trainer reads at once"] / seconds, 3)
    while pending:
        trainer.settle(pending.pop(0))


def largest_fitting(results: dict, checkpointing: bool, cap: int) -> int | None:
    fits = [r["batch"] for r in results.get("step", {}).values()
            if r["status"] == "ok" and r["checkpointing"] == checkpointing and r["batch"] <= cap]
    return max(fits) if fits else None


def compile_blocks(module, backend: str = "inductor") -> int:
    """Compile every block of each stack of identical layers (timm EVA ``blocks``, BEATs ``layers``, BERT
    ``layer``) in place; returns how many were compiled."""
    import torch

    count = 0
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(c) for c in child}) == 1:
            for block in child:
                block.compile(backend=backend)
                count += 1
    return count


def section_compile(run: Run, cfg, device, args, results: dict) -> None:
    from gram.train.engine import TorchEngine

    batch_size = largest_fitting(results, False, args.compile_batch) or min(args.batch_sizes)
    task = build_task(cfg, device)
    engine = TorchEngine(task, trainer_config(cfg, device), device)
    batch = synthetic_batch(cfg, batch_size, device)
    timings = {}
    for mode in ("eager", "compiled"):
        limit = args.share["compile"] * (0.3 if mode == "eager" else 0.7)
        if run.smoke and mode == "compiled":
            limit = max(limit, 150.0)  # tracing takes 10-60 s on a small shared CPU
        with run.guard("compile", f"{mode} B={batch_size}", limit) as record:
            if mode == "compiled":
                record["blocks_compiled"] = sum(compile_blocks(e, args.compile_backend)
                                                for e in task.model.encoders.values())
                start = time.perf_counter()
                train_step_fn(engine, batch)()  # compiles forward and backward
                sync(device)
                record["compile_s"] = round(time.perf_counter() - start, 1)
            seconds = time_steps(train_step_fn(engine, batch), device, args.warmup, args.iters)
            timings[mode] = seconds
            record.update(batch=batch_size, step_ms=round(1000 * seconds, 1),
                          samples_per_s=round(batch_size / seconds, 2), peak_gib=_round(peak_gib(device)))
            if mode == "compiled" and "eager" in timings:
                record["speedup"] = round(timings["eager"] / seconds, 3)
    results["compile"] = {k: round(1000 * v, 1) for k, v in timings.items()}
    del engine, task, batch
    import torch._dynamo

    torch._dynamo.reset()
    reset_memory(device)


@contextlib.contextmanager
def single_rank_group(device) -> Iterator[None]:
    """A one-process torch.distributed group, as torchrun would set up for one rank."""
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def section_zero2(run: Run, cfg, device, args, results: dict) -> None:
    """The plain engine and DeepSpeed ZeRO-2 on one rank, same batch, checkpointing on (as the finetune runs)."""
    from gram.train.engine import DeepSpeedEngine, TorchEngine

    batch_size = largest_fitting(results, True, args.zero_batch) or min(args.batch_sizes)
    timings = {}
    with single_rank_group(device):
        for backend in ("torch", "deepspeed"):
            with run.guard("zero2", f"{backend} B={batch_size} ckpt=on", args.share["zero2"] / 2) as record:
                task = build_task(cfg, device, grad_checkpointing=True)
                if backend == "torch":
                    engine = TorchEngine(task, trainer_config(cfg, device), device)
                else:
                    tcfg = trainer_config(cfg, device, backend="deepspeed", zero_stage=2)
                    engine = DeepSpeedEngine(task, tcfg, device, micro_batch=batch_size)
                batch = synthetic_batch(cfg, batch_size, device)
                seconds = time_steps(train_step_fn(engine, batch), device, args.warmup, args.iters)
                timings[backend] = seconds
                record.update(batch=batch_size, step_ms=round(1000 * seconds, 1),
                              samples_per_s=round(batch_size / seconds, 2), peak_gib=_round(peak_gib(device)))
                if backend == "deepspeed" and "torch" in timings:
                    record["overhead"] = round(seconds / timings["torch"] - 1, 3)
            task = engine = batch = None
            reset_memory(device)
    results["zero2"] = {k: round(1000 * v, 1) for k, v in timings.items()}


def section_loss(run: Run, device, args) -> None:
    """bench/loss.py's GRAM loss at bf16 vs one B x B x d matmul of the same inputs."""
    import torch

    sys.path.insert(0, str(BENCH))
    import loss as loss_bench  # bench/loss.py

    methods = {"ours": loss_bench.build_methods(with_grad=False)["ours"]}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    bench_args = argparse.Namespace(device=str(device), dtype=dtype)
    for batch_size in args.loss_batch_sizes:
        for k in args.ks:
            with run.guard("loss", f"B={batch_size} k={k}",
                           args.share["loss"] / (len(args.loss_batch_sizes) * len(args.ks))) as record:
                emb = loss_bench.make_embeddings(batch_size, k, args.dim, str(device))
                mine = loss_bench.bench_case(methods, emb, args.iters, bench_args)["ours"]
                a, b = (emb[name].detach().to(getattr(torch, dtype)) for name in list(emb)[:2])
                matmul = loss_bench.best_seconds({"mm": lambda a=a, b=b: a @ b.T}, args.iters, str(device))["mm"]
                record.update(fwd_ms=round(1000 * mine["fwd"], 3), fwdbwd_ms=round(1000 * mine["fwdbwd"], 3),
                              matmul_ms=round(1000 * matmul, 3), fwd_vs_matmul=round(mine["fwd"] / matmul, 2),
                              fwdbwd_vs_matmul=round(mine["fwdbwd"] / matmul, 2), peak_mib=round(mine["mib"], 1))
            reset_memory(device)


def section_eval(run: Run, device, args) -> None:
    """bench/eval.py's streamed volume retrieval (t2v and v2t) on ``device`` vs one N x N x d matmul."""
    import torch

    sys.path.insert(0, str(BENCH))
    import eval as eval_bench  # bench/eval.py

    from gram.eval.scoring import retrieval_metrics_from_embeddings

    for n in args.eval_sizes:
        with run.guard("eval", f"N={n} k=3", args.share["eval"] / len(args.eval_sizes)) as record:
            text, *data = (x.to(device) for x in eval_bench.make_inputs(n, args.dim, 3))
            targets = torch.arange(n)  # the evaluator's convention: targets on the host, embeddings on the device
            calls = {"matmul": lambda t=text, d=data: t @ d[0].T,
                     "ours": lambda t=text, d=data, y=targets: retrieval_metrics_from_embeddings(t, d, y, "volume")}
            times = {name: min(_timed(fn, device) for _ in range(max(2, args.iters // 2))) for name, fn in calls.items()}
            record.update(ours_ms=round(1000 * times["ours"], 2), matmul_ms=round(1000 * times["matmul"], 3),
                          vs_matmul=round(times["ours"] / times["matmul"], 1))
        reset_memory(device)


def _timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# ------------------------------------------------------------------------------------------------ output
KEYS = ("batch", "step_ms", "samples_per_s", "peak_gib", "mfu", "speedup", "overhead", "compile_s",
        "blocks_compiled", "sdpa_calls", "softmax_calls", "fused_kernels", "fwd_ms", "fwdbwd_ms", "matmul_ms",
        "fwd_vs_matmul", "fwdbwd_vs_matmul", "peak_mib", "ours_ms", "vs_matmul")


def format_record(record: dict[str, Any]) -> str:
    values = []
    for key in KEYS:
        if record.get(key) is not None:
            value = record[key]
            values.append(f"{key}={100 * value:.1f}%" if key in ("mfu", "overhead") else f"{key}={value}")
    return f"| {record['section']} | {record['name']} | {record['status']} | {' '.join(values)} | {record['seconds']} |"


def environment(device) -> dict[str, Any]:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    driver=_driver_version(), peak_bf16_tflops=peak_tflops(props.name))
    else:
        info.update(card=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", driver="n/a", peak_bf16_tflops=None)
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table(env: dict[str, Any], records: list[dict[str, Any]], command: str, wall_s: float) -> str:
    lines = [f"### GPU run {env['date']}: {env['card']}, driver {env['driver']}, torch {env['torch']}",
             "", f"`{command}` ({wall_s:.0f} s; dense bf16 peak used for MFU: {env.get('peak_bf16_tflops')} TFLOP/s)",
             "", "| section | case | status | numbers | s |", "|---|---|---|---|---|"]
    lines += [format_record(r) for r in records]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes: a few seconds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help=f"default: all ({' '.join(SECTIONS)})")
    parser.add_argument("--budget-s", type=float, default=None, help="whole-run time limit (default 420; smoke 240, an upper bound)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="step ladder, stops at the first that does not fit (default 8 16 32 64 128 256 512)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/gpu-<time>.json)")
    parser.add_argument("--no-readme", action="store_true", help="do not append the table to bench/README.md")
    parser.add_argument("--device", default=None, help="default: cuda when visible (cpu with --smoke)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides of the config")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; smoke: aot_eager, which traces the same graphs "
                             "without generating C++ code, minutes on a small CPU)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.sections = args.sections or list(SMOKE_SECTIONS if smoke else SECTIONS)
    args.budget_s = args.budget_s or (240.0 if smoke else 420.0)
    args.compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    args.batch_sizes = args.batch_sizes or ([2, 4] if smoke else [8, 16, 32, 64, 128, 256, 512])
    args.loss_batch_sizes = [64, 128] if smoke else [1024, 4096, 8192]
    args.ks = [3] if smoke else [3, 4, 5]
    args.eval_sizes = [200] if smoke else [5000, 10000, 20000]
    args.dim = 64 if smoke else 512
    args.warmup, args.iters = (1, 2) if smoke else (2, 4)
    args.compile_batch, args.zero_batch = (2, 2) if smoke else (16, 32)
    args.share = {name: SHARES[name] * args.budget_s for name in SECTIONS}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gram.cli import UserError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --smoke for the CPU run")
    if device.type != "cuda":  # (on a GPU the trainer's own settings: fp32 matmuls, the loss's, stay fp32)
        torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared CPU
    run = Run(args.budget_s, args.smoke, min_case_s=10.0 if args.smoke else 0.0)
    env = environment(device)
    args.peak_tflops = env.get("peak_bf16_tflops")
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}  {json.dumps(env)}", flush=True)
    cfg = compose(args.smoke, args.override)
    results: dict[str, Any] = {}
    sections = {"attention": lambda: section_attention(run, cfg, device, args),
                "step": lambda: section_step(run, cfg, device, args, results),
                "compile": lambda: section_compile(run, cfg, device, args, results),
                "zero2": lambda: section_zero2(run, cfg, device, args, results),
                "loss": lambda: section_loss(run, device, args),
                "eval": lambda: section_eval(run, device, args)}
    print("| section | case | status | numbers | s |\n|---|---|---|---|---|", flush=True)
    for name in args.sections:
        with run.guard(name, "(section)", run.left(), alarm=False) as record:
            sections[name]()
        if record["status"] == "ok":
            run.records.remove(record)  # the section's own rows say it all
    wall = time.perf_counter() - run.start
    out = args.out or BENCH / "results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "command": command.strip(), "wall_s": round(wall, 1),
                               "records": run.records, "summary": results}, indent=1))
    print(f"\nresults: {out}  ({wall:.0f} s)")
    if not args.no_readme and not args.smoke:
        with open(BENCH / "README.md", "a") as readme:
            readme.write("\n" + table(env, run.records, command.strip(), wall))
        print("table appended to bench/README.md")
    failed = [r for r in run.records if r["status"] not in ("ok",) and not r["status"].startswith("OOM")]
    return 1 if args.smoke and failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from gram.cli import run_with_clear_errors

    sys.exit(run_with_clear_errors(main))
