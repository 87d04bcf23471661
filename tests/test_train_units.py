"""Optimizer groups, schedule, checkpoint folders and their failure modes, without a full training run."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from gram.config import TrainerConfig
from gram.train import checkpoint as ckpt
from gram.train.optim import build_optimizer, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"vision": nn.Linear(3, 3), "text": nn.Linear(3, 3)})
        self.norm = nn.LayerNorm(3)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_split_vision_and_decay():
    cfg = TrainerConfig(lr=2e-5, vision_lr=5e-7, weight_decay=0.01)
    groups = param_groups(Toy(), cfg)
    by_key = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    # vision weight / vision bias / text weight / text bias + norm weight + norm bias + temperature
    assert by_key == {(5e-7, 0.01): 1, (5e-7, 0.0): 1, (2e-5, 0.01): 1, (2e-5, 0.0): 4}
    assert sum(len(g["params"]) for g in groups) == 7  # the frozen layer is left out


def test_adamw_uses_the_paper_settings():
    opt = build_optimizer(Toy(), TrainerConfig())
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_schedule_warms_up_then_decays_linearly():
    cfg = TrainerConfig(max_steps=100, warmup_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == 0.0
    cos = TrainerConfig(max_steps=100, warmup_ratio=0.0, schedule="warmup_cosine")
    assert lr_factor(50, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def _save(tmp_path, step, module, keep_last=2, best=False):
    return ckpt.save_checkpoint(tmp_path, step, module, {"step": step}, {"step": step}, keep_last=keep_last, best=best)


def test_checkpoints_round_trip_and_prune(tmp_path):
    module = Toy()
    for step in (1, 2, 3):
        _save(tmp_path, step, module, best=step == 1)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000001", "step_00000002", "step_00000003"]  # 1 is kept because it is the best
    assert (tmp_path / "checkpoints" / "best").resolve().name == "step_00000001"
    _save(tmp_path, 4, module)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003", "step_00000004"]
    other = Toy()
    ckpt.load_weights(other, tmp_path)  # an output dir resolves to its latest checkpoint
    for a, b in zip(module.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((ckpt.resolve_checkpoint(tmp_path) / "config.json").read_text()) == {"step": 4}


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    module = Toy()
    good = _save(tmp_path, 1, module)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, module)
    monkeypatch.undo()
    assert ckpt.resolve_checkpoint(tmp_path) == good  # the half-written folder is not a checkpoint
    assert any(p.name.startswith(".tmp_step") for p in (tmp_path / "checkpoints").iterdir())
    ckpt.load_weights(Toy(), tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty_dir"])
def test_bad_checkpoint_paths_name_the_path(tmp_path, make):
    path = tmp_path / "x"
    if make == "empty_dir":
        os.mkdir(path)
    with pytest.raises(ckpt.CheckpointNotFoundError, match=str(path)):
        ckpt.resolve_checkpoint(path)
