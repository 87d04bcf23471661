"""Benchmark: streaming volume retrieval metrics vs a naive Gram-tensor implementation.

For each N (queries = candidates = N, one caption per video), d = 512 and k = 3 (text, video, audio):

* ``matmul``: one (N, d) @ (d, N) product, the yardstick;
* ``ours``: ``retrieval_metrics_from_embeddings(..., kind="volume")``: -volume scores and both
  directions (t2v and v2t), streamed over tiles;
* ``naive``: the reference's approach: the full (N, N, k, k) Gram tensor, ``torch.det``, then an (N, N)
  argsort per direction. Skipped (and said so) when its estimated peak memory exceeds half the RAM
  that is available.

Each measurement runs in a fresh subprocess. Time is the minimum over ``--repeats`` runs. Peak memory is
the rise of the process's peak resident set size (``resource.getrusage().ru_maxrss``, which covers
torch's C++ allocations, unlike tracemalloc) above the RSS right before the measured call, with the
inputs already allocated; it includes the outputs (the matmul's (N, N) result, the naive score matrix).

    python bench/eval.py                  # N = 1000, 5000, 20000
    python bench/eval.py --quick          # N = 500, 1000, one repeat
    python bench/eval.py --sizes 2000 8000 --chunk-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reference_gram import reference_gram  # bench/, on the path when run as a script

from gram.eval.scoring import DEFAULT_CHUNK_SIZE, retrieval_metrics_from_embeddings

# Naive peak bytes per (query, candidate) pair: the float32 Gram tensor (k*k), its stacked inputs and
# det workspace (about the same again), the volume matrix and two int64 argsorts.
NAIVE_BYTES_PER_PAIR = {3: 2 * 9 * 4 + 4 + 2 * 8, 4: 2 * 16 * 4 + 4 + 2 * 8, 5: 2 * 25 * 4 + 4 + 2 * 8}


def make_inputs(n: int, dim: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """k unit-norm feature matrices (n, dim): text first, then the k - 1 data modalities."""
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, dim, generator=gen), dim=-1) for _ in range(k)]


def naive_metrics(text: torch.Tensor, data: list[torch.Tensor]) -> dict:
    """Both directions via det and argsort (diagonal targets); returns R@1 of each direction."""
    volume = torch.det(reference_gram(text, data)).abs().sqrt()  # (N, N)
    diag = torch.arange(volume.shape[0]).unsqueeze(1)  # (N, 1)
    t2v = (volume.argsort(dim=1) == diag).float().argmax(dim=1)  # (N,) ascending volume = best first
    v2t = (volume.T.argsort(dim=1) == diag).float().argmax(dim=1)  # (N,)
    return {"t2v_r1": 100 * (t2v < 1).double().mean().item(), "v2t_r1": 100 * (v2t < 1).double().mean().item()}


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(method: str, n: int, dim: int, k: int, chunk_size: int, repeats: int) -> dict:
    """Time one method in this (fresh) process; memory = peak RSS rise over the pre-call RSS."""
    text, *data = make_inputs(n, dim, k)
    calls = {
        "matmul": lambda: text @ data[0].T,  # (N, d) @ (d, N) -> (N, N)
        "ours": lambda: retrieval_metrics_from_embeddings(text, data, torch.arange(n), "volume", chunk_size),
        "naive": lambda: naive_metrics(text, data),
    }
    before = current_rss_bytes()
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous output first so it does not inflate the peak
        start = time.perf_counter()
        result = calls[method]()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes() - before
    r1 = {key: result[key] for key in ("t2v_r1", "v2t_r1")} if isinstance(result, dict) else {}
    return {"time_s": min(times), "peak_mib": max(peak, 0) / 2**20, **r1}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo; this benchmark needs Linux")


def measure(method: str, n: int, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter so peak RSS belongs to that method alone."""
    cmd = [sys.executable, __file__, "--worker", method, "--sizes", str(n), "--dim", str(args.dim), "--k",
           str(args.k), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} N={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def naive_fits(n: int, k: int) -> bool:
    """Whether the naive run's estimated peak stays under half the available memory."""
    return n * n * NAIVE_BYTES_PER_PAIR[k] < available_bytes() / 2


def bench_size(n: int, args: argparse.Namespace) -> dict:
    """All methods for one N."""
    row = {"n": n, "matmul": measure("matmul", n, args), "ours": measure("ours", n, args), "naive": None}
    if args.no_naive:
        row["skip"] = "skipped (--no-naive)"
    elif not naive_fits(n, args.k):
        row["skip"] = f"skipped: needs ~{n * n * NAIVE_BYTES_PER_PAIR[args.k] / 2**30:.0f} GiB"
    else:
        row["naive"] = measure("naive", n, args)
    return row


def format_row(row: dict) -> str:
    """One table line with the ratios of this run."""
    mm, ours, naive = row["matmul"], row["ours"], row["naive"]
    text = (f"| {row['n']:>6} | {mm['time_s']:8.3f} | {ours['time_s']:8.3f} | {ours['time_s'] / mm['time_s']:6.2f}x "
            f"| {ours['peak_mib']:9.1f} | ")
    if naive is None:
        return text + row["skip"] + " | - | - | - | - |"
    return text + (f"{naive['time_s']:8.3f} | {naive['peak_mib']:9.1f} | {naive['time_s'] / ours['time_s']:6.1f}x "
                   f"| {naive['peak_mib'] / max(ours['peak_mib'], 1e-9):6.1f}x | "
                   f"{'yes' if abs(naive['t2v_r1'] - ours['t2v_r1']) < 1e-9 else 'NO'} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--quick", action="store_true", help="N = 500 and 1000, one repeat")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=3, choices=sorted(NAIVE_BYTES_PER_PAIR))
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
    parser.add_argument("--worker", choices=["matmul", "ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [500, 1000], 1
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.sizes[0], args.dim, args.k, args.chunk_size, args.repeats)))
        return
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"d={args.dim}, k={args.k}, chunk={args.chunk_size}, min of {args.repeats} runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| N | matmul s | ours s | ours/matmul | ours peak MiB | naive s | naive peak MiB | naive/ours time "
          "| naive/ours mem | same R@1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        print(format_row(bench_size(n, args)), flush=True)


if __name__ == "__main__":
    main()
