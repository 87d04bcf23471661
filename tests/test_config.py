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
