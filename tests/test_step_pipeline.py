"""The trainer never waits for the device inside a step (issue 17): a step is queued (`Trainer.launch_step`) and
its numbers are read (`Trainer.settle`) while the next one runs. Checked on the CPU with the tiny GRAM task:

* queuing a step reads nothing back, forward or backward (the finite check, the skip, the rank counts and the
  metrics stay tensors);
* reading each step one step late trains exactly as reading it at once (same weights, same metrics.jsonl);
* every save sees all steps before it counted; a stop signal still stops, saves and logs every step once.
"""

from __future__ import annotations

import contextlib
import os
import signal

import torch

from gram.checkpoint_format import list_checkpoints
from gram.losses import LossConfig
from gram.main import to_dataclass
from gram.train.checkpoint import load_train_state
from gram.train.logger import read_metrics
from gram.train.task import GramTask
from gram.train.trainer import Trainer
from tests.conftest import compose_config
from tests.test_fast_paths import NoHostSync, tiny_batch, tiny_model

BATCH = 3
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


@contextlib.contextmanager
def no_host_reads():
    """Fails on every Python-level read of a tensor's value on the host (each would wait for a GPU), also inside
    autograd's backward (custom Functions), which torch function modes such as `NoHostSync` do not reach."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name: str):
        def read(self, *args, **kwargs):
            raise AssertionError(f"the step reads a tensor on the host: Tensor.{name}")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


class TinyStream:
    """The same tiny batch every step, under new ids; ``on_batch(n)`` runs before the n-th batch (1-based)."""

    def __init__(self, on_batch=None) -> None:
        self.micro_batch, self.position, self.on_batch = BATCH, 0, on_batch

    def __next__(self) -> dict:
        self.position += 1
        if self.on_batch:
            self.on_batch(self.position)
        return tiny_batch(BATCH) | {"ids": [f"b{self.position}_{i}" for i in range(BATCH)], "skipped": []}

    def state(self) -> dict:
        return {"position": self.position}

    def load_state(self, state: dict) -> None:
        self.position = state["position"]


def tiny_trainer(tmp_path, *overrides: str, stream: TinyStream | None = None) -> Trainer:
    cfg = to_dataclass(compose_config("trainer.device=cpu", "trainer.warmup_ratio=0", "trainer.lr=1e-3",
                                      "trainer.grad_clip=1.0", "logger.wandb.mode=disabled",
                                      "logger.progress_bar=false", *overrides))
    task = GramTask(tiny_model(), LossConfig())
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, task, stream or TinyStream(), torch.device("cpu"), {}, str(tmp_path))


def test_queuing_a_step_reads_nothing_back_from_the_device(tmp_path):
    trainer = tiny_trainer(tmp_path, "trainer.max_steps=5")
    assert trainer.engine.optimizer.defaults["fused"]  # the default on CPU too: the same path as on a GPU
    before = [p.detach().clone() for p in trainer.task.parameters()]
    with NoHostSync(), no_host_reads():  # forward (modes also see value-dependent ops) and backward (patched)
        launched = trainer.launch_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.task.parameters()))  # the update happened
    metrics = trainer.settle(launched)  # the one read, afterwards
    assert trainer.samples_seen == BATCH and metrics["batch"] == BATCH and metrics["skipped_steps"] == 0
    assert {"loss", "contrastive", "dam", "grad_norm", "lr"} <= set(metrics) and metrics["grad_norm"] > 0


def test_a_non_finite_step_is_skipped_without_reading_it_back(tmp_path):
    trainer = tiny_trainer(tmp_path, "trainer.max_steps=5")
    trainer.task.model.encoders["vision"].register_forward_hook(lambda module, args, out: out * float("nan"))
    before = [p.detach().clone() for p in trainer.task.parameters()]
    with NoHostSync(), no_host_reads():
        launched = trainer.launch_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.task.parameters()))
    trainer.settle(launched)
    assert trainer.skipped_steps == 1 and trainer.bad_steps == 1


def test_reading_each_step_late_trains_exactly_as_reading_it_at_once(tmp_path):
    steps = 4
    at_once = tiny_trainer(tmp_path / "a", f"trainer.max_steps={steps}")
    torch.manual_seed(3)  # dropout and the DAM negatives draw from the global generator
    records = [at_once.train_step() for _ in range(steps)]
    late = tiny_trainer(tmp_path / "b", f"trainer.max_steps={steps}")
    torch.manual_seed(3)
    late.fit()
    for a, b in zip(at_once.task.parameters(), late.task.parameters()):
        assert torch.equal(a, b)
    logged = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for record, expected in zip(logged, records):
        timed = ("step", "samples_per_s")
        assert {k: v for k, v in record.items() if k not in timed} == {k: v for k, v in expected.items() if k not in timed}
        assert record["samples_per_s"] > 0 and expected["samples_per_s"] > 0
    assert late.samples_seen == at_once.samples_seen == steps * BATCH


def test_every_checkpoint_counts_all_steps_before_it(tmp_path):
    trainer = tiny_trainer(tmp_path, "trainer.max_steps=5", "trainer.save_every=2", "trainer.keep_last=5")
    trainer.fit()
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["step_00000002", "step_00000004", "step_00000005"]
    for folder in saved:
        state, _ = load_train_state(folder)
        assert state["samples_seen"] == state["step"] * BATCH  # settled before the save, none pending


def test_a_stop_signal_stops_within_two_steps_saves_and_logs_every_step(tmp_path):
    def terminate_at(position: int) -> None:
        if position == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = tiny_trainer(tmp_path, "trainer.max_steps=20", stream=TinyStream(terminate_at))
    trainer.fit()
    # The signal arrives while step 3 is queued: step 3 or 4 carries it, and it is read one step later.
    assert trainer.stopped_by == "SIGTERM" and 3 <= trainer.step <= 5
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{trainer.step:08d}"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, trainer.step + 1))
    assert signal.getsignal(signal.SIGTERM) is not trainer  # the handler was restored


def test_the_bar_shows_samples_per_second_over_recent_steps(tmp_path):
    """metrics.jsonl keeps each step's own speed; the bar averages step times (0.1 s, then 0.4 s -> 0.13 s)."""
    from gram.train.trainer import LaunchedStep

    trainer = tiny_trainer(tmp_path, "trainer.max_steps=5")
    shown = []
    bar = type("Bar", (), {"set_postfix": lambda self, fields, refresh: shown.append(fields["sps"]),
                           "update": lambda self, n: None})()
    for step, speed in ((1, 100.0), (2, 25.0)):
        numbers = torch.tensor([0.0, 10, 0, 0, 1.5], dtype=torch.float64)  # finite, 10 seen, loss 1.5
        trainer._finish(LaunchedStep(step, numbers, ["loss"], {"lr": 1e-3, "batch": 10, "samples_per_s": speed}, []),
                        bar)
    assert shown == ["100", "77"]
    assert [r["samples_per_s"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [100.0, 25.0]
