"""Benchmark the GRAM volume loss against the determinant formulation and pairwise InfoNCE.

For d = 512, B in {256, 1024, 2048} and k in {3, 4, 5} (float32 on the CPU by default) it prints the
forward and forward+backward time (best of the repeats) and the peak memory of one forward+backward of:

* ours:     ``gram.losses`` volume loss (projection / Gram-Schmidt factorisation);
* det:      the reference formulation, written here: an (N1, N2, k, k) Gram tensor and ``torch.det``;
* InfoNCE:  pairwise cosine InfoNCE of the anchor against each of the same k-1 modalities.

All three go through the same ``ContrastiveLoss`` (two-way label-smoothed CE, learnable temperature), so
only the similarity differs. By default every method runs with the reference's gradient semantics, our
default ``gather_with_grad=False``: the determinant version computes both directions separately as the
reference's loss does (M1 = f(t, V.detach(), A.detach()), M2 = f(T.detach(), v, a)), while ours and
InfoNCE compute the matrix once and split its gradients (same values and gradients, tested).
``--full-gradients`` instead gives every method one shared B x B matrix with full gradients
(``gather_with_grad=True``), which isolates the cost of the similarity itself. All ratios come from
this one run. It also times DAM hard-negative sampling (vectorised vs the reference's per-sample loop).

Usage: ``python bench/loss.py`` (full, several minutes) or ``python bench/loss.py --quick`` (smoke run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from reference_gram import reference_gram  # bench/, on the path when run as a script

from gram.losses import ContrastiveLoss, LossConfig, negative_sampling_probs, sample_hard_negatives

MODALITIES = ["anchor", "m1", "m2", "m3", "m4"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--repeats", type=int, default=6, help="timed repeats (x4 at B <= 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16 runs the losses under autocast",
    )
    parser.add_argument(
        "--full-gradients", action="store_true", help="one shared matrix with full gradients for every method"
    )
    parser.add_argument("--sampling-batch", type=int, default=1024)
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.ks, args.repeats, args.sampling_batch = [128, 256], [3, 5], 2, 256
    return args


def det_volume_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: torch.Tensor
) -> torch.Tensor:
    """Reference formulation (§2.7, §3 of the spec): -sqrt|det G| / tau from an explicit Gram tensor.

    Returns (1, N1, N2); ``scale`` is 1 / tau, applied to the volumes as the reference divides them.
    """
    gram = reference_gram(anchor, data)  # (N1, N2, k, k)
    return -(torch.det(gram.float()).abs().sqrt() * scale).unsqueeze(0)


def make_embeddings(batch: int, k: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch + k)
    return {
        name: F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(device).requires_grad_()
        for name in MODALITIES[:k]
    }


def build_methods(with_grad: bool) -> dict[str, ContrastiveLoss]:
    return {
        "ours": ContrastiveLoss(LossConfig(name="volume", gather_with_grad=with_grad)),
        "det": ContrastiveLoss(
            LossConfig(name="volume", gather_with_grad=with_grad), similarity=det_volume_scores
        ),
        "InfoNCE": ContrastiveLoss(LossConfig(name="cosine", gather_with_grad=with_grad)),
    }


def best_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Best-of-``repeats`` wall time of each function, after one warm-up call each.

    The functions run round-robin, so slow drifts in background load hit all of them alike, and the
    minimum (not the median) estimates the undisturbed cost on a shared machine.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by ``fn`` beyond what was live before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """CPU peak from the profiler's allocation events, relative to what was allocated before ``fn``.

    Each event carries the profiler's running total, which also counts what earlier profiled calls left
    allocated, so the baseline is the total just before the first event. Uses the profiler's
    experimental event tree, the only CPU allocation record torch exposes.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    baseline = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - baseline


def bench_case(
    methods: dict[str, ContrastiveLoss], emb: dict[str, torch.Tensor], repeats: int, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Per method: forward and forward+backward best seconds and the peak MiB of one forward+backward."""
    names = list(emb)
    autocast = torch.autocast(
        args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"
    )

    def forward(loss_fn: ContrastiveLoss) -> torch.Tensor:
        with autocast:
            return loss_fn(emb, names[1:], anchor=names[0])["loss"]

    def forward_backward(loss_fn: ContrastiveLoss) -> None:
        for t in emb.values():
            t.grad = None
        forward(loss_fn).backward()

    calls: dict[str, Callable[[], object]] = {}
    for name, loss_fn in methods.items():
        calls[f"{name}/fwd"] = lambda fn=loss_fn: forward(fn)
        calls[f"{name}/fwdbwd"] = lambda fn=loss_fn: forward_backward(fn)
    times = best_seconds(calls, repeats, args.device)
    return {
        name: {
            "fwd": times[f"{name}/fwd"],
            "fwdbwd": times[f"{name}/fwdbwd"],
            "mib": peak_bytes(calls[f"{name}/fwdbwd"], args.device) / 2**20,
        }
        for name in methods
    }


def bench_sampling(batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Seconds for DAM negative sampling in both directions: vectorised vs the reference's loop.

    The loop is the reference's: the (B, N) weight matrix, then one multinomial + .item() per row.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    logits = [torch.randn(batch, batch, device=device, generator=gen) for _ in range(2)]

    def loop() -> list[list[int]]:
        drawn = []
        for direction in logits:
            probs = negative_sampling_probs(direction, 0)
            drawn.append([int(torch.multinomial(probs[i], 1).item()) for i in range(batch)])
        return drawn

    def vectorised() -> tuple[torch.Tensor, torch.Tensor]:
        return sample_hard_negatives(logits[0], logits[1], 0)

    times = best_seconds({"vectorised": vectorised, "loop": loop}, repeats, device)
    return times["vectorised"], times["loop"]


def format_row(batch: int, k: int, res: dict[str, dict[str, float]]) -> str:
    cells = [f"{batch:>5} {k:>2}"]
    for name in ("ours", "det", "InfoNCE"):
        r = res[name]
        cells.append(f"{1e3 * r['fwd']:8.1f} {1e3 * r['fwdbwd']:8.1f} {r['mib']:8.1f}")
    speed = res["det"]["fwdbwd"] / res["ours"]["fwdbwd"]
    vs_nce = res["ours"]["fwdbwd"] / res["InfoNCE"]["fwdbwd"]
    mem = res["ours"]["mib"] / res["det"]["mib"]
    cells.append(f"{speed:7.1f}x {vs_nce:7.2f}x {mem:7.2f}")
    return " | ".join(cells)


def header(args: argparse.Namespace) -> str:
    grads = (
        "one shared matrix, full gradients"
        if args.full_gradients
        else "reference (other side detached; det: both directions computed, ours/InfoNCE: one split matrix)"
    )
    threads = torch.get_num_threads()
    lines = [
        f"GRAM loss bench: d={args.dim}, {args.device} {args.dtype}, {threads} threads, gradients: {grads}",
        "times in ms (best of the repeats, run round-robin), peak = MiB allocated during one forward+backward",
        "    B  k |     ours: fwd  fwd+bwd     peak |      det: fwd  fwd+bwd     peak |"
        "  InfoNCE: fwd  fwd+bwd     peak | det/ours ours/NCE mem ours/det",
    ]
    return "\n".join(lines)


def repeats_for(batch: int, repeats: int) -> int:
    """More repeats where a call takes milliseconds (noisier); the same count elsewhere."""
    return 4 * repeats if batch <= 256 else repeats


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {name: fn.to(args.device) for name, fn in build_methods(args.full_gradients).items()}
    print(header(args), flush=True)
    for batch in args.batch_sizes:
        repeats = repeats_for(batch, args.repeats)
        for k in args.ks:
            emb = make_embeddings(batch, k, args.dim, args.device)
            res = bench_case(methods, emb, repeats, args)
            print(format_row(batch, k, res), flush=True)
    vec, loop = bench_sampling(args.sampling_batch, 4 * args.repeats, args.device)
    print(
        f"DAM negative sampling, B={args.sampling_batch} (both directions): vectorised {1e3 * vec:.2f} ms, "
        f"per-sample loop {1e3 * loop:.1f} ms, speed-up {loop / vec:.0f}x"
    )


if __name__ == "__main__":
    main()
