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
from gram.cli import UserError
from gram.config import GramConfig
from gram.eval.retrieval import move_to
from gram.train import checkpoint as ckpt
from gram.train.engine import build_engine
from gram.train.launch import all_reduce_min, any_rank, barrier, first_error
from gram.train.logger import read_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class TooManyFailedSamplesError(RuntimeError):
    pass


class StopRequest:
    """SIGTERM (cluster preemption) or SIGINT (Ctrl-C): finish the current step, save, exit cleanly. A second
    Ctrl-C stops at once without saving (the checkpoints already written stay); repeated SIGTERMs (the cluster
    and torchrun both send one) change nothing."""

    # torchrun forwards the Ctrl-C its own process got, so a worker sees two at once: only a SIGINT later than
    # this after the first is a second Ctrl-C.
    REPEAT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            log.warning("received %s: saving a checkpoint after this step, then stopping%s", name, again)
            self.signal_name, self._first_at = name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_AFTER_S:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: GramConfig, task: nn.Module, stream, device: torch.device, config_dict: dict,
                 output_dir: str, evaluate: Callable[[], dict[str, Any]] | None = None, logger=None):
        self.cfg, self.tcfg, self.device = cfg, cfg.trainer, device
        self.task, self.stream, self.evaluate_fn = task.to(device), stream, evaluate
        self.config_dict, self.output_dir, self.logger = config_dict, output_dir, logger
        self.engine = build_engine(task, self.tcfg, device, stream.micro_batch)
        self.step, self.bad_steps, self.best = 0, 0, -math.inf
        self.samples_seen, self.samples_failed, self.failed_paths = 0, 0, set()
        # The checkpoint this run last saved or resumed from; why it stopped before max_steps, if it did
        # ("SIGTERM", "SIGINT", "trainer.stop_after_steps").
        self.last_checkpoint: Path | None = None
        self.stopped_by: str | None = None

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "engine": self.engine.state_dict(), "data": self.stream.state(), "best": self.best,
                "samples_seen": self.samples_seen, "samples_failed": self.samples_failed,
                "world_size": dist.get_world_size()}

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint; damaged newer ones are set aside with a warning."""
        found = ckpt.list_checkpoints(self.output_dir)
        if not found:
            log.info("trainer.resume=true but %s has no checkpoint: starting from scratch", self.output_dir)
            self.truncate_history()
            return False
        damaged: list[tuple[Path, str]] = []
        for folder in reversed(found):
            error = None
            try:  # the whole checkpoint is read before anything is applied
                state, rng = ckpt.load_train_state(folder)
                ckpt.load_weights(self.task, folder)
            except ckpt.DamagedCheckpointError as exc:
                error = str(exc)
            error = first_error(error)  # every rank resumes from the same checkpoint
            if error is None:
                break
            damaged.append((folder, error))
        else:
            raise UserError(f"no readable checkpoint in {ckpt.checkpoint_root(self.output_dir)}: "
                            f"{'; '.join(e for _, e in damaged)}; start anew in a new output_dir")
        self._set_aside(damaged, folder)
        self.engine.load_state_dict(state["engine"])
        self.engine.load_extra(folder)
        self.stream.load_state(state["data"])
        self.step, self.best = state["step"], state["best"]
        self.samples_seen, self.samples_failed = state.get("samples_seen", 0), state.get("samples_failed", 0)
        if rng is not None and state.get("world_size") == dist.get_world_size():
            ckpt.set_rng_state(rng)
        else:
            log.warning("world size changed since the checkpoint: RNG streams restart (the run is not bitwise exact)")
        self.truncate_history()
        self.last_checkpoint = folder
        log.info("resumed from %s at step %d", folder, self.step)
        return True

    def _set_aside(self, damaged: list[tuple[Path, str]], good: Path) -> None:
        for folder, error in damaged:
            if not dist.is_main_process():
                continue
            kept = ckpt.set_aside_damaged(folder)
            log.warning("checkpoint %s is damaged (%s): resuming from the previous good one, %s; the damaged one "
                        "is kept as %s", folder, error, good, kept.name)
        if damaged:
            barrier()

    def truncate_history(self) -> None:
        """Steps logged after the checkpoint we resume from (all of them for a fresh run) will be redone: drop
        them from metrics.jsonl, with any line a crash cut short."""
        path = Path(self.output_dir) / "metrics.jsonl"
        if dist.is_main_process() and path.exists():
            records = read_metrics(path)
            kept = [r for r in records if r["step"] <= self.step]
            if len(kept) < len(records):
                log.info("%s: dropped the %d records after step %d (redone now)", path, len(records) - len(kept),
                         self.step)
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save(self, best: bool = False) -> Path:
        self.last_checkpoint = ckpt.save_checkpoint(
            self.output_dir, self.step, self.task, self.config_dict, self.state_dict(), keep_last=self.tcfg.keep_last,
            best=best, save_extra=self.engine.save_extra)
        return self.last_checkpoint

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
            while self.step < stop_at and not any_rank(stop.requested):  # all ranks stop after the same step
                metrics = self.train_step()
                now = time.perf_counter()
                metrics["samples_per_s"] = metrics["batch"] * dist.get_world_size() / max(now - last_time, 1e-9)
                last_time = now
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                sps=f"{metrics['samples_per_s']:.0f}")
                self._log(metrics)
                result = self.maybe_evaluate(final=False)
                if result is not None or (self.tcfg.save_every and self.step % self.tcfg.save_every == 0):
                    self.save(best=bool(result and result["_improved"]))
        bar.close()
        finished = self.step >= self.tcfg.max_steps
        if not finished:
            self.stopped_by = stop.signal_name or ("a signal" if self.step < stop_at else "trainer.stop_after_steps")
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
