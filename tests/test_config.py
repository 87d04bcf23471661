"""Every config composes and builds its typed dataclasses; bad keys and values fail at start with their name."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gram.config import GramConfig
from gram.main import to_dataclass
from tests.conftest import CONFIGS, compose_config

GROUPS = {group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
          for group in ("model", "data", "loss", "trainer", "experiment")}


def test_default_config_builds():
    cfg = to_dataclass(compose_config())
    assert isinstance(cfg, GramConfig)
    assert cfg.model.name == "gram_tiny" and cfg.data.name == "sample" and cfg.loss.name == "volume"
    assert cfg.data.image_size == cfg.model.vision.image_size  # interpolated, not duplicated


@pytest.mark.parametrize("group,name", [(g, n) for g, names in GROUPS.items() for n in names])
def test_every_group_file_composes(group, name):
    cfg = compose_config(f"{group}={name}")
    typed = to_dataclass(cfg)
    assert isinstance(typed, GramConfig)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_overrides_reach_the_typed_config():
    cfg = to_dataclass(compose_config("trainer.max_steps=7", "model.modalities=[video]", "loss=cosine"))
    assert cfg.trainer.max_steps == 7 and cfg.model.modalities == ["video"] and cfg.loss.name == "cosine"


def test_unknown_key_fails_with_its_name():
    with pytest.raises(Exception, match="trainer.max_stepz"):
        compose_config("trainer.max_stepz=3")


def test_wrong_type_fails_with_its_name():
    with pytest.raises(Exception, match="max_steps"):
        compose_config("trainer.max_steps=many")


@pytest.mark.parametrize("override,key", [
    ("trainer.precision=fp8", "trainer.precision"),
    ("model.modalities=[video,smell]", "model.modalities"),
    ("mode=test", "checkpoint"),
    ("data.transform=zoom", "data.transform"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        to_dataclass(compose_config(override))


@pytest.mark.parametrize("override,key,allowed", [
    ("trainer.lr=-1", "trainer.lr", "> 0"),
    ("trainer.lr=0", "trainer.lr", "> 0"),
    ("trainer.lr=nan", "trainer.lr", "> 0"),
    ("trainer.vision_lr=-1e-5", "trainer.vision_lr", ">= 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay", ">= 0"),
    ("trainer.betas=[0.9,1.5]", "trainer.betas[1]", "in [0.0, 1.0)"),
    ("trainer.eps=0", "trainer.eps", "> 0"),
    ("trainer.warmup_ratio=1.0", "trainer.warmup_ratio", "in [0.0, 1.0)"),
    ("trainer.stop_after_steps=0", "trainer.stop_after_steps", ">= 1 or null"),
    ("trainer.grad_clip=-1", "trainer.grad_clip", ">= 0"),
    ("trainer.log_every=0", "trainer.log_every", ">= 1"),
    ("trainer.keep_last=-1", "trainer.keep_last", ">= 0"),
    ("trainer.max_bad_steps=0", "trainer.max_bad_steps", ">= 1"),
    ("data.max_failed_fraction=-0.5", "data.max_failed_fraction", "in [0.0, 1.0]"),
    ("data.max_failed_fraction=1.5", "data.max_failed_fraction", "in [0.0, 1.0]"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("data.test_batch_size=-4", "data.test_batch_size", ">= 1"),
    ("data.audio_mel_bins=0", "data.audio_mel_bins", ">= 1"),
    ("model.max_frames=0", "model.max_frames", ">= 1"),
    ("eval.chunk_size=0", "eval.chunk_size", ">= 1"),
    ("loss.temperature_init=inf", "loss.temperature_init", "must be a finite number > 0"),
    ("trainer.lr=inf", "trainer.lr", "must be a finite number > 0"),
    ("loss.temperature_init=2", "loss.temperature_init", "in [loss.temperature_min, loss.temperature_max]"),
    ("loss.dam_weight=nan", "loss.dam_weight", ">= 0"),
])
def test_numeric_values_outside_their_range_name_the_key_and_the_range(override, key, allowed):
    with pytest.raises(ValueError) as raised:
        to_dataclass(compose_config(override))
    message = str(raised.value)
    assert f"config key `{key}`" in message and allowed in message and "\n" not in message
