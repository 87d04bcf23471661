"""Process-group lifecycle for torchrun launches (env:// rendezvous): gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as torch_dist

from gram import distributed

log = logging.getLogger(__name__)


def init_from_env(timeout_minutes: int = 30) -> None:
    """Join the process group torchrun describes in the environment; a plain `python` launch stays single-process."""
    if torch_dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    use_nccl = torch.cuda.is_available() and os.environ.get("GRAM_DIST_BACKEND", "") != "gloo"
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    torch_dist.init_process_group("nccl" if use_nccl else "gloo", timeout=timeout)
    if use_nccl:  # batch sizes and shapes are exchanged every step: in host memory they never wait for the GPU
        distributed.set_host_group(torch_dist.new_group(backend="gloo", timeout=timeout))
    if torch_dist.get_rank() != 0:  # one voice on the console: other ranks log warnings only
        logging.getLogger().setLevel(logging.WARNING)
    log.info("process group: %d ranks, backend %s", torch_dist.get_world_size(), torch_dist.get_backend())


def destroy() -> None:
    distributed.set_host_group(None)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place); identity in a single process."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x


def _flag_device() -> torch.device:
    """Where a collective's small tensor must live: NCCL only reduces CUDA tensors."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Collective: true on every rank when it is true on any (e.g. a stop signal that reached one rank first)."""
    if not torch_dist.is_initialized():
        return flag
    x = torch.tensor([float(flag)], device=_flag_device())
    torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
    return bool(x.item() > 0)


def first_error(message: str | None) -> str | None:
    """Collective: the error message of the lowest rank that has one, or None when every rank succeeded, so that
    all ranks fail together instead of waiting for a rank that has stopped."""
    if not torch_dist.is_initialized():
        return message
    messages: list[str | None] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)
