"""Thin helpers over ``torch.distributed`` that also work in a single process.

Every function is a no-op (or an identity in value) when ``torch.distributed`` is not available or not
initialised, so the same loss and trainer code runs on a laptop and on a cluster.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_object",
    "gather_sizes",
    "get_rank",
    "get_world_size",
    "is_dist_initialized",
    "is_main_process",
    "rank_offset",
]


def is_dist_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return get_rank() == 0


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order (``[obj]`` when not distributed)."""
    if not is_dist_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_sizes(local_size: int, device: torch.device | str = "cpu") -> list[int]:
    """First-dimension sizes of every rank's tensor, in rank order.

    ``device`` must be one the backend can communicate on (the tensors' own device is always fine).
    """
    if not is_dist_initialized():
        return [int(local_size)]
    size = torch.tensor([int(local_size)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def rank_offset(sizes: list[int], rank: int | None = None) -> int:
    """Row index of this rank's first sample in the rank-ordered global batch."""
    rank = get_rank() if rank is None else rank
    return int(sum(sizes[:rank]))


def _gather_shapes(x: torch.Tensor) -> list[torch.Size]:
    """Every rank's shape of ``x``; raises when the trailing dimensions disagree (they cannot be stacked).

    The shapes travel as a tensor on ``x``'s own device, which the backend must support anyway.
    """
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)  # (ndim,)
    shapes = [torch.zeros_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    as_sizes = [torch.Size(s.tolist()) for s in shapes]
    if len({s[1:] for s in as_sizes}) != 1:
        raise ValueError(
            f"all_gather needs equal trailing dimensions on every rank, got shapes {as_sizes}; "
            "pad the inputs (e.g. text to a fixed max length) before gathering"
        )
    return as_sizes


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rows ``sum(sizes)``), padding to the largest size on the wire."""
    max_size = max(sizes)
    padded = x.new_zeros((max_size, *x.shape[1:]))  # (max_size, *rest)
    padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded.contiguous())
    return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)  # (sum(sizes), *rest)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the summed gradient of its own slice.

    Each rank computes a loss on the gathered tensor, so the gradient of the *sum of all ranks' losses*
    w.r.t. the local slice is the sum over ranks of that slice's gradient: an all-reduce, then a slice.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:
        ctx.offset, ctx.local = offset, x.shape[0]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.local], None, None


def all_gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from every rank along dim 0 in rank order -> (sum_r N_r, ...).

    Ranks may hold different first-dimension sizes (uneven last batches). With ``with_grad=True`` the
    gradient of the gathered tensor flows back to the local slice (summed over all ranks' losses);
    with ``with_grad=False`` the result is detached. Without an initialised process group this returns
    ``x`` itself (``with_grad=True``) or ``x.detach()`` (``with_grad=False``), so gradient semantics do
    not depend on the world size.
    """
    if not is_dist_initialized():
        return x if with_grad else x.detach()
    shapes = _gather_shapes(x)
    sizes = [s[0] for s in shapes]
    if with_grad:
        return _AllGatherWithGrad.apply(x, sizes, rank_offset(sizes))
    with torch.no_grad():
        return _gather_padded(x.detach(), sizes)
