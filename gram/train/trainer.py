"""The training loop: a short sequence of named steps (train_step, evaluate, save) over one built run.

The trainer knows nothing about modalities: it moves batches, calls the task, steps the optimizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gram import distributed as dist
from gram.config import GramConfig
from gram.eval.retrieval import move_to
from gram.train import checkpoint as ckpt
from gram.train.engine import build_engine
from gram.train.launch import all_reduce_min

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class TooManyFailedSamplesError(RuntimeError):
    pass


class StopRequest:
    """SIGTERM (cluster preemption) or SIGINT (Ctrl-C): finish the current step, save, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# Step metrics that are not parts of the task's loss (the bar shows them last, in their own format).
NOT_LOSS_PARTS = ("lr", "batch", "samples_per_s")


def bar_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields: the total loss, each loss part the task returns (e.g. contrastive, dam) and
    other task scalars (temperature), then lr and samples/s."""
    parts = {k: f"{v:.4g}" for k, v in metrics.items() if k != "loss" and k not in NOT_LOSS_PARTS}
    return {"loss": f"{metrics['loss']:.4g}", **parts, "lr": f"{metrics['lr']:.1e}",
            "sps": f"{metrics['samples_per_s']:.0f}"}


class Trainer:
    def __init__(self, cfg: GramConfig, task: nn.Module, stream, device: torch.device, config_dict: dict,
                 output_dir: str, evaluate: Callable[[], dict[str, Any]] | None = None, logger=None):
        self.cfg, self.tcfg, self.device = cfg, cfg.trainer, device
        self.task, self.stream, self.evaluate_fn = task.to(device), stream, evaluate
        self.config_dict, self.output_dir, self.logger = config_dict, output_dir, logger
        self.engine = build_engine(task, self.tcfg, device, stream.micro_batch)
        self.step, self.bad_steps, self.best = 0, 0, -math.inf
        self.samples_seen, self.samples_failed, self.failed_paths = 0, 0, set()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "engine": self.engine.state_dict(), "data": self.stream.state(), "best": self.best,
                "samples_seen": self.samples_seen, "samples_failed": self.samples_failed,
                "world_size": dist.get_world_size()}

    def resume(self) -> bool:
        found = ckpt.list_checkpoints(self.output_dir)
        if not found:
            log.info("trainer.resume=true but %s has no checkpoint: starting from scratch", self.output_dir)
            return False
        folder = ckpt.load_weights(self.task, found[-1])
        state, rng = ckpt.load_train_state(folder)
        self.engine.load_state_dict(state["engine"])
        self.engine.load_extra(folder)
        self.stream.load_state(state["data"])
        self.step, self.best = state["step"], state["best"]
        self.samples_seen, self.samples_failed = state["samples_seen"], state["samples_failed"]
        if rng is not None and state["world_size"] == dist.get_world_size():
            ckpt.set_rng_state(rng)
        else:
            log.warning("world size changed since the checkpoint: RNG streams restart (the run is not bitwise exact)")
        self._truncate_history()
        log.info("resumed from %s at step %d", folder, self.step)
        return True

    def _truncate_history(self) -> None:
        """Steps logged after the checkpoint we resume from will be redone: drop them from metrics.jsonl."""
        path = Path(self.output_dir) / "metrics.jsonl"
        if dist.is_main_process() and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    def save(self, best: bool = False) -> None:
        ckpt.save_checkpoint(self.output_dir, self.step, self.task, self.config_dict, self.state_dict(),
                             keep_last=self.tcfg.keep_last, best=best, save_extra=self.engine.save_extra)

    # ------------------------------------------------------------------------------------------ steps
    def _micro_batches(self) -> list[dict[str, Any]]:
        batches = []
        while len(batches) < self.tcfg.grad_accum_steps:
            batch = next(self.stream)
            self._count_failures(batch)
            if batch["ids"]:
                batches.append(batch)
        return batches

    def _count_failures(self, batch: dict[str, Any]) -> None:
        self.samples_seen += len(batch["ids"]) + len(batch["skipped"])
        self.samples_failed += len(batch["skipped"])
        for path in batch["skipped"]:
            if path not in self.failed_paths:  # each broken file is logged once
                self.failed_paths.add(path)
                log.warning("skipping a training sample that failed to load: %s", path)
        limit = self.cfg.data.max_failed_fraction
        if self.samples_seen >= 100 and self.samples_failed > limit * self.samples_seen:
            raise TooManyFailedSamplesError(
                f"{self.samples_failed} of {self.samples_seen} training samples failed to load (more than "
                f"data.max_failed_fraction={limit}); run scripts/check_dataset.py on the dataset")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches (gradients synced on the last one only)."""
        batches, totals = self._micro_batches(), {}
        for i, batch in enumerate(batches):
            losses = self.engine.forward_backward(move_to(batch, self.device), len(batches), last=i == len(batches) - 1)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / len(batches)
        finite = self._all_finite(totals["loss"])
        self.engine.step(finite)
        self._track_bad_steps(finite)
        self.step += 1
        return {k: float(v) for k, v in totals.items()} | {"lr": self.engine.lr(),
                                                           "batch": sum(len(b["ids"]) for b in batches)}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(loss))], device=self.device)
        return bool(all_reduce_min(flag).item() > 0)

    def _track_bad_steps(self, finite: bool) -> None:
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        log.warning("step %d: non-finite loss, the update is skipped (%d in a row)", self.step, self.bad_steps)
        if self.bad_steps >= self.tcfg.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_steps} consecutive non-finite losses, the last at step {self.step}; "
                                     f"lower trainer.lr, use trainer.precision=fp32 or bf16, or set trainer.grad_clip")

    def maybe_evaluate(self, final: bool) -> dict[str, Any] | None:
        every = self.tcfg.eval_every
        if self.evaluate_fn is None or not (final or (every and self.step % every == 0)):
            return None
        result = self.evaluate_fn()
        log.info("eval at step %d: %s", self.step, " ".join(
            f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))
        metric = result.get(self.tcfg.best_metric)
        if metric is None:
            raise KeyError(f"trainer.best_metric={self.tcfg.best_metric!r} is not an evaluation result; "
                           f"choose one of {sorted(k for k, v in result.items() if isinstance(v, (int, float)))}")
        improved = metric > self.best
        if improved:
            self.best = metric
        if self.logger:
            self.logger.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, self.step)
        result["_improved"] = improved
        return result

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any] | None:
        """Train to `max_steps` (or `stop_after_steps`, or a stop signal), evaluating and saving as configured."""
        from tqdm.auto import tqdm

        stop_at = min(self.tcfg.max_steps, self.tcfg.stop_after_steps or self.tcfg.max_steps)
        bar = tqdm(total=stop_at, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.cfg.logger.progress_bar and dist.is_main_process()))
        self.task.train()
        result, last_time = None, time.perf_counter()
        with StopRequest() as stop:
            while self.step < stop_at and not stop.requested:
                metrics = self.train_step()
                now = time.perf_counter()
                metrics["samples_per_s"] = metrics["batch"] * dist.get_world_size() / max(now - last_time, 1e-9)
                last_time = now
                bar.set_postfix(bar_postfix(metrics), refresh=False)  # drawn by update, at most every 0.1 s
                bar.update(1)
                self._log(metrics)
                result = self.maybe_evaluate(final=False)
                if result is not None or (self.tcfg.save_every and self.step % self.tcfg.save_every == 0):
                    self.save(best=bool(result and result["_improved"]))
        bar.close()
        finished = self.step >= self.tcfg.max_steps
        result = self.maybe_evaluate(final=True) if finished else None
        self.save(best=bool(result and result["_improved"]))
        return result

    def _log(self, metrics: dict[str, float]) -> None:
        """Every step's losses go to `<output_dir>/metrics.jsonl` (rank 0); every `log_every`-th to the log."""
        if dist.is_main_process():
            with open(Path(self.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.step % self.tcfg.log_every and self.step not in (1, self.tcfg.max_steps):
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("step %d/%d %s", self.step, self.tcfg.max_steps, parts)
        if self.logger:
            self.logger.log({f"train/{k}": v for k, v in metrics.items()}, self.step)
