"""Training throughput of the tiny model on the sample dataset: 1 process vs 2 processes (torchrun, gloo), CPU.

Prints samples/s (median over the steps after warm-up, from each run's metrics.jsonl) and peak resident memory
per process, and their ratios measured in this one run. (Full-size DDP vs DeepSpeed ZeRO-2 on GPUs is not in
this script yet: no GPU was available to the session that wrote it.)

    python bench/train.py [--steps 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Runs a command and prints the peak RSS of its largest descendant process: a fresh wrapper per measurement, because
# RUSAGE_CHILDREN only ever grows within one process.
WRAPPER = """import json, resource, subprocess, sys
subprocess.run(json.loads(sys.argv[1]), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def launch(nproc: int, out: Path, overrides: list[str]) -> dict[str, float]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    entry = [sys.executable, str(ROOT / "run.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "run.py")]
    command = [*entry, *overrides, f"output_dir={out}"]
    peak_kb = int(subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(command)], cwd=ROOT, env=env,
                                 check=True, capture_output=True, text=True).stdout.split()[-1])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [h["samples_per_s"] for h in history[len(history) // 3:]]  # skip start-up steps
    return {"samples_per_s": statistics.median(rates), "peak_rss_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--sample-dir", default=str(ROOT / "data" / "sample"))
    args = parser.parse_args()
    overrides = [f"data.sample_dir={args.sample_dir}", f"trainer.max_steps={args.steps}", f"data.batch_size={args.batch}",
                 "logger.progress_bar=false", "logger.wandb.mode=disabled", "data.test_batch_size=50",
                 "trainer.device=cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: launch(n, Path(tmp) / f"p{n}", overrides) for n in (1, 2)}
    print(f"tiny GRAM model, sample dataset, global batch {args.batch}, {args.steps} steps, CPU")
    print(f"{'processes':>9} | {'samples/s':>9} | {'peak RSS (MB, max over processes)':>34}")
    for n, r in results.items():
        print(f"{n:>9} | {r['samples_per_s']:>9.1f} | {r['peak_rss_mb']:>34.0f}")
    one, two = results[1], results[2]
    print(f"ratio 2 processes / 1 process: throughput {two['samples_per_s'] / one['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
