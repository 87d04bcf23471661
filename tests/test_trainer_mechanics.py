"""Trainer mechanics on a toy task: accumulation equals the large batch, NaN steps are skipped then stop the run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gram.main import to_dataclass
from gram.train.trainer import NonFiniteLossError, Trainer
from tests.conftest import compose_config


class Regression(nn.Module):
    """A per-sample loss (mean squared error), for which accumulation must equal one large batch exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.poison_steps: set[int] = set()
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.linear(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        return {"loss": loss}


class ListStream:
    def __init__(self, batches, micro_batch):
        self.batches, self.micro_batch, self.position = batches, micro_batch, 0

    def __next__(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state(self):
        return {"position": self.position}

    def load_state(self, state):
        self.position = state["position"]


def make_batches(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, 4, generator=g), "y": torch.randn(size, generator=g),
             "ids": [str(i) for i in range(size)], "skipped": []} for _ in range(n)]


def trainer_for(tmp_path, task, batches, micro, *overrides):
    cfg = to_dataclass(compose_config("trainer.device=cpu", "trainer.warmup_ratio=0", "trainer.lr=0.1",
                                      "trainer.schedule=constant", "logger.wandb.mode=disabled", *overrides))
    return Trainer(cfg, task, ListStream(batches, micro), torch.device("cpu"), {}, str(tmp_path))


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    large = make_batches(3, 16)
    small = [{"x": b["x"][i:i + 8], "y": b["y"][i:i + 8], "ids": b["ids"][i:i + 8], "skipped": []}
             for b in large for i in (0, 8)]
    one, two = Regression(), Regression()
    t1 = trainer_for(tmp_path / "a", one, large, 16, "trainer.max_steps=3")
    t2 = trainer_for(tmp_path / "b", two, small, 8, "trainer.max_steps=3", "trainer.grad_accum_steps=2")
    for _ in range(3):
        m1, m2 = t1.train_step(), t2.train_step()
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    for p1, p2 in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert two.calls == 6  # really two micro-batches per step


def test_non_finite_loss_skips_the_update_and_stops_after_the_limit(tmp_path, caplog):
    task = Regression()
    task.poison_steps = {2, 4, 5, 6}
    trainer = trainer_for(tmp_path, task, make_batches(2, 8), 8, "trainer.max_steps=20", "trainer.max_bad_steps=3")
    trainer.train_step()
    before = [p.detach().clone() for p in task.parameters()]
    trainer.train_step()  # call 2 is NaN: the update is skipped
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert "non-finite loss" in caplog.text
    trainer.train_step()  # finite again: the counter resets
    assert trainer.bad_steps == 0
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match="at step 6;"):  # the sixth step, as the log and metrics number it
        trainer.train_step()
    assert trainer.skipped_steps == 4 and trainer.step == 6
