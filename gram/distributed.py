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
    "host_group",
    "is_dist_initialized",
    "is_main_process",
    "rank_offset",
    "set_host_group",
]

# The group that exchanges host-side integers (batch sizes, shapes), like torch.distributed's own default group a
# process-wide resource: made once by gram.train.launch.init_from_env, next to an NCCL default group.
_host_group: dist.ProcessGroup | None = None


def set_host_group(group: dist.ProcessGroup | None) -> None:
    """Use ``group`` (a gloo group over every rank) for sizes and shapes, or the default group again (None)."""
    global _host_group
    _host_group = group


def host_group() -> dist.ProcessGroup | None:
    """The gloo group that sizes and shapes travel in, or None when that is the default group."""
    return _host_group


def _all_gather_ints(values: list[int], device: torch.device | str) -> list[list[int]]:
    """Every rank's ``values`` (the same count on every rank), in rank order. They travel in host memory when a
    gloo group is at hand (the host group, or a gloo default group): reading them then never waits for the GPU.
    Otherwise they go on ``device``, which the default group's backend must support."""
    group = host_group()
    on_host = group is not None or dist.get_backend() == "gloo"
    local = torch.tensor(values, dtype=torch.long, device="cpu" if on_host else device)
    gathered = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(gathered, local, group=group)
    return [t.tolist() for t in gathered]


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

    ``device`` must be one the backend can communicate on (the tensors' own device is always fine); with a gloo
    group at hand (see ``host_group``) the sizes stay in host memory.
    """
    if not is_dist_initialized():
        return [int(local_size)]
    return [sizes[0] for sizes in _all_gather_ints([int(local_size)], device)]


def rank_offset(sizes: list[int], rank: int | None = None) -> int:
    """Row index of this rank's first sample in the rank-ordered global batch."""
    rank = get_rank() if rank is None else rank
    return int(sum(sizes[:rank]))


def _gather_shapes(x: torch.Tensor) -> list[torch.Size]:
    """Every rank's shape of ``x``; raises when the trailing dimensions disagree (they cannot be stacked)."""
    as_sizes = [torch.Size(shape) for shape in _all_gather_ints(list(x.shape), x.device)]
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
