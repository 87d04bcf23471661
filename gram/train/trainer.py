"""The training loop: a short sequence of named steps (launch_step, settle, evaluate, save) over one built run.

The trainer knows nothing about modalities: it moves batches, calls the task, steps the optimizer. A step is queued
on the device in full (`launch_step`) and its numbers are read (`settle`) while the next one runs, so the host
never makes the GPU wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from gram.data.batch import move_to
from gram.data.errors import TooManyFailedSamplesError, shown_ids
from gram.train import checkpoint as ckpt
from gram.train.engine import build_engine
from gram.train.launch import all_reduce_sum, barrier, first_error
from gram.train.logger import read_metrics

log = logging.getLogger(__name__)

EVAL_RESULTS = "eval.json"  # in a checkpoint folder: the evaluation of those weights


def _evaluated_metric(folder: Path, name: str) -> float:
    """The metric recorded in a checkpoint's eval.json (its evaluation), or -inf when there is none."""
    try:
        value = json.loads((folder / EVAL_RESULTS).read_text()).get(name)
    except (OSError, ValueError):
        return -math.inf
    return float(value) if isinstance(value, (int, float)) else -math.inf


__all__ = ["LaunchedStep", "NonFiniteLossError", "StopRequest", "TooManyFailedSamplesError", "Trainer",
           "non_finite_ids", "non_finite_mask"]

MEDIA_KEYS = ("video", "audio", "depth")


class NonFiniteLossError(UserError):
    """`trainer.max_bad_steps` steps in a row had a non-finite loss or gradient."""


def non_finite_mask(batch: dict[str, Any]) -> torch.Tensor:
    """Which of the batch's samples have a NaN or infinite value in a media tensor: a bool tensor [B] on the
    batch's device (computed without waiting for it)."""
    bad = None
    for key in MEDIA_KEYS:
        values = batch.get(key)
        if isinstance(values, torch.Tensor) and values.is_floating_point():
            flags = ~torch.isfinite(values).flatten(1).all(dim=1)
            bad = flags if bad is None else bad | flags
    return torch.zeros(len(batch["ids"]), dtype=torch.bool) if bad is None else bad


def non_finite_ids(batch: dict[str, Any]) -> list[str]:
    """Ids of the batch's samples whose media tensors hold a NaN or infinite value."""
    return [sample_id for sample_id, flag in zip(batch["ids"], non_finite_mask(batch).tolist()) if flag]


@dataclasses.dataclass
class LaunchedStep:
    """An optimizer step whose work is queued on the device; its numbers are read (``Trainer.settle``) only once
    the next step is queued too, so the host never makes the device wait.

    ``numbers`` is one float64 tensor: [ranks with a non-finite step, samples seen, samples failed, ranks asked to
    stop] summed over ranks, then this rank's values of ``names`` (loss parts, gradient norm)."""

    step: int
    numbers: torch.Tensor
    names: list[str]
    host: dict[str, float]  # lr, batch size and samples/s, known on the host
    inputs: list[tuple[list[str], torch.Tensor]]  # (ids, non_finite_mask) per micro-batch


def _bad_inputs(ids: list[str]) -> str:
    return f"; NaN or infinite values in the input of {shown_ids(ids)}" if ids else ""


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


# Step metrics that are not parts of the task's loss (the bar shows them last, in their own format).
NOT_LOSS_PARTS = ("lr", "batch", "samples_per_s", "grad_norm", "skipped_steps")


def bar_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields: the total loss, each loss part the task returns (e.g. contrastive, dam) and
    other task scalars (temperature), then lr, samples/s and the count of skipped steps when there are any."""
    parts = {k: f"{v:.4g}" for k, v in metrics.items() if k != "loss" and k not in NOT_LOSS_PARTS}
    skipped = {"skipped": str(int(metrics["skipped_steps"]))} if metrics.get("skipped_steps") else {}
    return {"loss": f"{metrics['loss']:.4g}", **parts, "lr": f"{metrics['lr']:.1e}",
            "sps": f"{metrics['samples_per_s']:.0f}", **skipped}


class Trainer:
    def __init__(self, cfg: GramConfig, task: nn.Module, stream, device: torch.device, config_dict: dict,
                 output_dir: str, evaluate: Callable[[], dict[str, Any]] | None = None, logger=None):
        self.cfg, self.tcfg, self.device = cfg, cfg.trainer, device
        self.task, self.stream, self.evaluate_fn = task.to(device), stream, evaluate
        self.config_dict, self.output_dir, self.logger = config_dict, output_dir, logger
        self.engine = build_engine(task, self.tcfg, device, stream.micro_batch)
        self.step, self.bad_steps, self.skipped_steps, self.best = 0, 0, 0, -math.inf
        # Global counts (summed over ranks every step), so every rank stops together at the same step.
        self.samples_seen, self.samples_failed, self.failed_paths = 0, 0, set()
        self._pending_seen, self._pending_failed = 0, 0  # this rank's counts since the last step
        # Items the data left out for lack of a media file (or, in shards, of a caption) count with the clips that
        # fail to load; above the limit on their own, the run stops before it starts.
        self.missing_fraction = getattr(stream, "missing_fraction", 0.0)
        if self.missing_fraction > cfg.data.max_failed_fraction:
            raise TooManyFailedSamplesError(
                f"{self.missing_fraction:.1%} of the annotated training items have no media file or caption, more "
                f"than data.max_failed_fraction={cfg.data.max_failed_fraction}; run scripts/check_dataset.py")
        self._evaluated: tuple[int, dict[str, Any]] | None = None  # (step, result) of the latest evaluation
        # The checkpoint this run last saved or resumed from; why it stopped before max_steps, if it did
        # ("SIGTERM", "SIGINT", "trainer.stop_after_steps").
        self.last_checkpoint: Path | None = None
        self.stopped_by: str | None = None
        self.stop_agreed = False  # a settled step says some rank was asked to stop
        self._last_bad: tuple[int, list[str]] = (0, [])  # the last skipped step and the ids with bad inputs
        self._last_launch = time.perf_counter()  # when the last step was queued (for samples/s)
        self._step_seconds: float | None = None  # recent steps' mean duration, for the progress bar

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "engine": self.engine.state_dict(), "data": self.stream.state(), "best": self.best,
                "samples_seen": self.samples_seen, "samples_failed": self.samples_failed,
                "skipped_steps": self.skipped_steps, "world_size": dist.get_world_size()}

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
        self.skipped_steps = state.get("skipped_steps", 0)
        self.best = max(self.best, _evaluated_metric(folder, self.tcfg.best_metric))
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

    def _saved_this_step(self) -> bool:
        """Whether the checkpoint of the current step is on disk (saved by this run, or the one it resumed from)."""
        return self.last_checkpoint == ckpt.step_folder(self.output_dir, self.step)

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
            self._note_failures(batch)
            if batch["ids"]:
                batches.append(batch)
        return batches

    def _note_failures(self, batch: dict[str, Any]) -> None:
        self._pending_seen += len(batch["ids"]) + len(batch["skipped"])
        self._pending_failed += len(batch["skipped"])
        for path in batch["skipped"]:
            if path not in self.failed_paths:  # each broken file is logged once
                self.failed_paths.add(path)
                log.warning("skipping a training sample that failed to load: %s", path)
        # Only a rank that gets nothing usable for a long while stops on its own (it cannot reach the next step).
        seen, failed = self.samples_seen + self._pending_seen, self.samples_failed + self._pending_failed
        if not batch["ids"] and seen >= 100 and failed > self.cfg.data.max_failed_fraction * seen:
            self._fail_on_data(seen, failed, sorted(self.failed_paths), self.step)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches (gradients synced on the last one only), its
        numbers read at once. `fit` instead reads each step's numbers while the next one runs.

        A step whose loss or gradient is not finite on any rank is skipped on every rank and counted; the step
        numbers in messages are the ones `metrics.jsonl` and the log use (the first step is 1).
        """
        metrics = self.settle(self.launch_step())
        self.check_limits(self.step)
        return metrics

    def launch_step(self, stop_requested: bool = False) -> LaunchedStep:
        """Queue one optimizer step on the device without reading anything back: whether it is finite is decided
        on the device (the engine skips the update there), and the counts every rank must agree on (non-finite
        ranks, samples seen and failed, ranks asked to stop) go in one all-reduce that nobody waits for."""
        batches, totals, inputs = self._micro_batches(), {}, []
        for i, batch in enumerate(batches):
            batch = move_to(batch, self.device)
            inputs.append((batch["ids"], non_finite_mask(batch)))
            losses = self.engine.forward_backward(batch, len(batches), last=i == len(batches) - 1)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / len(batches)
        finite = torch.isfinite(totals["loss"])
        grad_norm = self.engine.grad_norm()
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
            totals["grad_norm"] = grad_norm.detach().float()
        counts = torch.tensor([self._pending_seen, self._pending_failed, int(stop_requested)], dtype=torch.float64)
        counts = torch.cat([(~finite).to(torch.float64).reshape(1), counts.to(self.device, non_blocking=True)])
        self._pending_seen = self._pending_failed = 0
        counts = all_reduce_sum(counts)
        self.engine.step(counts[0] == 0, grad_norm)
        self.step += 1
        numbers = torch.cat([counts, torch.stack(list(totals.values())).to(torch.float64)])
        # Steps are queued as fast as the device takes them (settle waits for the one before), so the time from one
        # launch to the next is the step's time, also when the numbers are read in a burst at the end.
        size, now = sum(len(b["ids"]) for b in batches), time.perf_counter()
        host = {"lr": self.engine.lr(), "batch": size,
                "samples_per_s": size * dist.get_world_size() / max(now - self._last_launch, 1e-9)}
        self._last_launch = now
        return LaunchedStep(self.step, numbers, list(totals), host, inputs)

    def settle(self, launched: LaunchedStep) -> dict[str, float]:
        """Read a launched step's numbers (the only wait for the device) and count them; a skipped step is
        reported with the clips whose input is not finite. Returns the step's metrics; `check_limits` then
        decides whether training goes on."""
        bad_ranks, seen, failed, stopping, *values = launched.numbers.tolist()
        self.samples_seen, self.samples_failed = self.samples_seen + int(seen), self.samples_failed + int(failed)
        self.stop_agreed = self.stop_agreed or stopping > 0
        self._track_bad_steps(bad_ranks == 0, launched)
        return dict(zip(launched.names, values)) | launched.host | {"skipped_steps": self.skipped_steps}

    def _track_bad_steps(self, finite: bool, launched: LaunchedStep) -> None:
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        # Collective, but every rank is here: the decision to skip was all-reduced.
        local = [sample_id for ids, mask in launched.inputs for sample_id, bad in zip(ids, mask.tolist()) if bad]
        culprits = sorted({sample_id for ids in dist.all_gather_object(local) for sample_id in ids})
        self._last_bad = (launched.step, culprits)
        log.warning("step %d: non-finite loss or gradient, the update is skipped (%d in a row, %d in all)%s",
                    launched.step, self.bad_steps, self.skipped_steps, _bad_inputs(culprits))

    def check_limits(self, step: int) -> None:
        """Stop after `trainer.max_bad_steps` non-finite steps in a row, or when more than
        `data.max_failed_fraction` of the samples failed to load (by step `step`)."""
        if self.bad_steps >= self.tcfg.max_bad_steps:
            last, culprits = self._last_bad
            raise NonFiniteLossError(
                f"{self.bad_steps} steps in a row had a non-finite loss or gradient (trainer.max_bad_steps="
                f"{self.tcfg.max_bad_steps}), the last at step {last}{_bad_inputs(culprits)}; "
                + ("remove or fix those clips" if culprits else
                   "lower trainer.lr, set trainer.grad_clip, or use trainer.precision=fp32 or bf16"))
        self._check_failed_fraction(step)

    def _check_failed_fraction(self, step: int) -> None:
        """Items without a media file and clips that failed to load, as a fraction of the data, against the limit
        (from 100 samples on; the counts are global, so every rank decides alike), after step `step`."""
        if self.samples_seen < 100:
            return
        fraction = self.missing_fraction + (1 - self.missing_fraction) * self.samples_failed / self.samples_seen
        if fraction > self.cfg.data.max_failed_fraction:
            paths = dist.all_gather_object(sorted(self.failed_paths)[:3])  # collective: every rank is here
            self._fail_on_data(self.samples_seen, self.samples_failed, sorted({p for ps in paths for p in ps}), step)

    def _fail_on_data(self, seen: int, failed: int, paths: list[str], step: int) -> None:
        missing = (f" and {self.missing_fraction:.1%} of the annotated items have no media file"
                   if self.missing_fraction else "")
        raise TooManyFailedSamplesError(
            f"step {step}: {failed} of {seen} training samples failed to load{missing}, more than "
            f"data.max_failed_fraction={self.cfg.data.max_failed_fraction} (first: {' | '.join(paths[:3])}); "
            f"run scripts/check_dataset.py on the dataset")

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluation and log it; `result["_improved"]` says whether `trainer.best_metric` improved."""
        result = self.evaluate_fn()
        log.info("eval at step %d: %s", self.step, " ".join(
            f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))
        metric = result.get(self.tcfg.best_metric)
        if not isinstance(metric, (int, float)):
            raise ValueError(f"trainer.best_metric={self.tcfg.best_metric!r} is not an evaluation result; "
                             f"choose one of {sorted(k for k, v in result.items() if isinstance(v, (int, float)))}")
        improved = metric > self.best
        if improved:
            self.best = metric
        if self.logger:
            self.logger.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, self.step)
        result["_improved"] = improved
        return result

    def checkpoint_and_evaluate(self, final: bool) -> dict[str, Any] | None:
        """Save when due (always when `final`), then evaluate when due: the weights are on disk before an evaluation
        that might fail. The evaluated checkpoint gets the numbers (`eval.json`) and, when they are the best so far
        by `trainer.best_metric`, the `best` pointer."""
        every = self.tcfg.eval_every
        evaluate = self.evaluate_fn is not None and (final or bool(every and self.step % every == 0))
        due = final or evaluate or bool(self.tcfg.save_every and self.step % self.tcfg.save_every == 0)
        folder = None
        if due:
            folder = self.last_checkpoint if self._saved_this_step() else self.save()
        if not evaluate:
            return None
        if self._evaluated is not None and self._evaluated[0] == self.step:  # eval_every already reached max_steps
            return self._evaluated[1]
        result = self.evaluate()
        self._evaluated = (self.step, result)
        if dist.is_main_process() and folder is not None and folder.is_dir():
            numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            (folder / EVAL_RESULTS).write_text(json.dumps({"step": self.step, **numbers}, indent=2))
            if result["_improved"]:
                ckpt.mark_best(self.output_dir, folder)
        return result

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any] | None:
        """Train to `max_steps` (or `stop_after_steps`, or a stop signal), evaluating and saving as configured.

        Each step's numbers are read while the next step runs on the device (a step is settled at once when a
        save or evaluation follows it), so a stop signal or a limit takes effect a step or two after it happens,
        on every rank at the same step. A run stopped by too many failed samples or non-finite steps saves its
        weights first (a skipped update is never applied)."""
        from tqdm.auto import tqdm

        stop_at = min(self.tcfg.max_steps, self.tcfg.stop_after_steps or self.tcfg.max_steps)
        bar = tqdm(total=stop_at, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.cfg.logger.progress_bar and dist.is_main_process()))
        self.task.train()
        self._last_launch = time.perf_counter()
        unsettled: list[LaunchedStep] = []
        launching = False
        with StopRequest() as stop:
            try:
                while self.step < stop_at and not self.stop_agreed:
                    launching = True
                    unsettled.append(self.launch_step(stop.requested))
                    launching = False
                    due = self._save_or_evaluate_due()
                    while len(unsettled) > (0 if due else 1):  # the previous step, or all before saving
                        self._finish(unsettled.pop(0), bar)
                    if due:
                        self.checkpoint_and_evaluate(final=False)
                while unsettled:
                    self._finish(unsettled.pop(0), bar)
            except (NonFiniteLossError, TooManyFailedSamplesError) as error:
                # A rank that stops while gathering its batches stops alone: it must not enter a collective.
                if not (launching and dist.get_world_size() > 1):
                    error = self._finish_rest(unsettled, bar, error)
                bar.close()
                self._save_before_stopping(error)
                raise error from None
        bar.close()
        if self.skipped_steps:
            log.warning("%d step(s) were skipped for a non-finite loss or gradient", self.skipped_steps)
        if self.step >= self.tcfg.max_steps:
            return self.checkpoint_and_evaluate(final=True)
        self.stopped_by = stop.signal_name or ("a signal" if self.step < stop_at else "trainer.stop_after_steps")
        if not self._saved_this_step():  # stopped early: save, evaluate later
            self.save()
        return None

    def _save_or_evaluate_due(self) -> bool:
        """Whether `checkpoint_and_evaluate` has work after the current step (not counting the final one)."""
        every = [self.tcfg.save_every, self.tcfg.eval_every if self.evaluate_fn is not None else 0]
        return any(n and self.step % n == 0 for n in every)

    def _finish(self, launched: LaunchedStep, bar) -> None:
        """Settle a launched step, show and log it, then stop if a limit is reached."""
        metrics = self.settle(launched)
        # The bar shows samples/s over the recent steps (an average of step times): per step it jumps with the loader.
        samples = metrics["batch"] * dist.get_world_size()
        seconds = samples / metrics["samples_per_s"]
        self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds
        shown = metrics | {"samples_per_s": samples / self._step_seconds}
        bar.set_postfix(bar_postfix(shown), refresh=False)  # drawn by update, at most every 0.1 s
        bar.update(1)
        self._log(launched.step, metrics)
        self.check_limits(launched.step)

    def _finish_rest(self, unsettled: list[LaunchedStep], bar, error: Exception) -> Exception:
        """After a stop for bad steps or data, the steps already launched are counted and logged too (their updates
        are applied, or skipped on the device); the error then describes the state they leave."""
        for launched in unsettled:
            with contextlib.suppress(NonFiniteLossError, TooManyFailedSamplesError):  # the check below reports
                self._finish(launched, bar)
        unsettled.clear()
        try:
            self.check_limits(self.step)
        except (NonFiniteLossError, TooManyFailedSamplesError) as newer:
            return newer
        return error

    def _save_before_stopping(self, error: Exception) -> None:
        """Keep the work, and say where: the weights are the last good step's (a skipped update is never
        applied)."""
        if self.step > 0 and not self._saved_this_step():
            folder = self.save()
            error.args = (f"{error.args[0]}; the work so far (the last finite weights) is saved in {folder}",)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        """Every step's losses go to `<output_dir>/metrics.jsonl` (rank 0); every `log_every`-th to the log."""
        if dist.is_main_process():
            with open(Path(self.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.tcfg.log_every and step not in (1, self.tcfg.max_steps):
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log.info("step %d/%d %s", step, self.tcfg.max_steps, parts)
        if self.logger:
            self.logger.log({f"train/{k}": v for k, v in metrics.items()}, step)
