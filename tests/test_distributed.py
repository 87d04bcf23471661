"""gram.distributed in one process and in a real 2-process gloo group (uneven batches)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gram import distributed as gd
from gram.losses import LossConfig, build_loss, dam_loss, sample_hard_negatives, volume

ROWS = [slice(0, 3), slice(3, 5)]  # rank 0 holds 3 samples, rank 1 the last 2 (an uneven last batch)
DATA = ["vision", "audio"]


def test_single_process_fallbacks() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert (gd.get_rank(), gd.get_world_size(), gd.is_main_process()) == (0, 1, True)
    assert gd.all_gather(x, with_grad=True) is x
    detached = gd.all_gather(x, with_grad=False)
    assert torch.equal(detached, x) and not detached.requires_grad
    assert gd.all_gather_object({"a": 1}) == [{"a": 1}]
    assert gd.gather_sizes(3) == [3] and gd.rank_offset([3]) == 0


def full_embeddings() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=-1) for n in ["text", *DATA]
    }


def rank_loss(full: dict[str, torch.Tensor], rows: slice, detach: bool) -> torch.Tensor:
    """One rank's loss from the full batch, written directly from reference §2.7."""
    t, v, a = (full[n] for n in ("text", *DATA))
    other = (lambda x: x.detach()) if detach else (lambda x: x)
    m1 = -volume(t[rows], other(v), other(a)) / 0.07  # (B_r, 5)
    m2 = -volume(other(t), v[rows], a[rows]).T / 0.07  # (B_r, 5)
    targets = torch.arange(rows.start, rows.stop)
    return 0.5 * sum(F.cross_entropy(m, targets, label_smoothing=0.1) for m in (m1, m2))


def expected_grads(rows: slice, detach: bool) -> dict[str, torch.Tensor]:
    """Gradient reaching this rank's slice: own loss only if detached, else the sum of both ranks' losses."""
    full = {n: t.clone().requires_grad_() for n, t in full_embeddings().items()}
    losses = [rank_loss(full, rows, True)] if detach else [rank_loss(full, r, False) for r in ROWS]
    grads = torch.autograd.grad(sum(losses), list(full.values()))
    return {n: g[rows] for n, g in zip(full, grads)}


def check_gather(rank: int) -> None:
    full = torch.arange(20, dtype=torch.float32).view(5, 4)
    local = full[ROWS[rank]].clone().requires_grad_()
    assert torch.equal(gd.all_gather(local, with_grad=False), full)
    weights = torch.arange(20.0).view(5, 4) * (rank + 1)
    (gd.all_gather(local, with_grad=True) * weights).sum().backward()
    torch.testing.assert_close(local.grad, 3 * torch.arange(20.0).view(5, 4)[ROWS[rank]])
    assert gd.all_gather_object(("rank", rank)) == [("rank", 0), ("rank", 1)]
    assert gd.gather_sizes(local.shape[0]) == [3, 2]
    with pytest.raises(ValueError, match="trailing"):
        gd.all_gather(torch.zeros(2, 3 + rank), with_grad=False)


def check_contrastive(rank: int) -> None:
    rows = ROWS[rank]
    for detach in (True, False):
        local = {n: t[rows].clone().requires_grad_() for n, t in full_embeddings().items()}
        out = build_loss(LossConfig(gather_with_grad=not detach))(local, DATA)
        torch.testing.assert_close(out["loss"].double(), rank_loss(full_embeddings(), rows, detach).double())
        assert torch.equal(out["targets"], torch.arange(rows.start, rows.stop))
        assert out["logits_anchor_to_data"].shape == (rows.stop - rows.start, 5)
        out["loss"].backward()
        for name, grad in expected_grads(rows, detach).items():
            torch.testing.assert_close(local[name].grad, grad, rtol=1e-5, atol=1e-7)


def check_dam(rank: int) -> None:
    rows = ROWS[rank]
    gen = torch.Generator().manual_seed(7)
    ids_full = torch.randint(1, 30, (5, 4), generator=gen)
    cond_full = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    logits = torch.randn(5, 5, generator=gen)[rows]
    condition = cond_full[rows].clone().requires_grad_()
    seen = []
    head = nn.Linear(6, 2).double()

    def match_fn(ids: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seen.append((ids, cond.detach()))
        return head(cond.mean(1)) + 0.01 * (ids * mask).sum(1, keepdim=True)  # (3B, 2)

    ids, mask = ids_full[rows], torch.ones_like(ids_full[rows])
    loss = dam_loss(
        match_fn, ids, mask, condition, logits, logits, generator=torch.Generator().manual_seed(rank)
    )
    loss.backward()
    neg_data, neg_text = sample_hard_negatives(
        logits, logits, rows.start, torch.Generator().manual_seed(rank)
    )
    assert torch.equal(seen[0][0], torch.cat([ids, ids, ids_full[neg_text]]))
    assert torch.equal(seen[0][1], torch.cat([cond_full[rows], cond_full[neg_data], cond_full[rows]]))
    assert torch.isfinite(condition.grad).all() and condition.grad.abs().sum() > 0


def worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        assert (gd.get_rank(), gd.get_world_size(), gd.is_main_process()) == (rank, 2, rank == 0)
        check_gather(rank)
        check_contrastive(rank)
        check_dam(rank)
        check_host_group(rank)
    finally:
        gd.set_host_group(None)
        dist.destroy_process_group()


def check_host_group(rank: int) -> None:
    """Next to an NCCL default group, sizes and shapes go through a gloo group in host memory (reading them must
    not wait for the GPU); the same results, and only the small integers take that route."""
    host = dist.new_group(backend="gloo")
    gd.set_host_group(host)
    groups = []
    original = dist.all_gather

    def recording(out, tensor, group=None, **kwargs):
        groups.append((group, tensor.device.type))
        return original(out, tensor, group=group, **kwargs)

    dist.all_gather = recording
    try:
        assert gd.gather_sizes(rank + 2, device="meta") == [2, 3]  # "meta" cannot communicate: proof of the route
        check_gather(rank)
        check_contrastive(rank)
    finally:
        dist.all_gather = original
        gd.set_host_group(None)
    assert (host, "cpu") in groups and {g for g, _ in groups} == {host, None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_group() -> None:
    """Runs every check on both ranks of a real gloo group; any assertion in a rank fails the test."""
    # fork: the ranks inherit the imported modules instead of re-importing torch (seconds per rank).
    mp.start_processes(worker, args=(free_port(),), nprocs=2, join=True, start_method="fork")
