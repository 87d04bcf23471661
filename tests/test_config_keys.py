"""Unknown config keys: one message naming the key and the closest valid keys, never Hydra's `+key=` advice."""

from __future__ import annotations

import pytest

from gram.config import check_overrides, schema_keys, unknown_key_message
from gram.main import to_dataclass
from tests.conftest import CONFIGS, compose_config


@pytest.mark.parametrize(("override", "suggested"), [
    ("trainer.max_step=3", "trainer.max_steps"),
    ("max_steps=3", "trainer.max_steps"),  # the section forgotten
    ("loss.dam_weigt=1", "loss.dam_weight"),
    ("model.vison.width=8", "model.vision.width"),
    ("logger.wandb.tag=[a]", "logger.wandb.tags"),
])
def test_unknown_key_names_it_and_suggests_close_keys(override, suggested):
    key = override.split("=")[0]
    with pytest.raises(ValueError) as error:
        check_overrides([override], CONFIGS)
    message = str(error.value)
    assert f"unknown config key `{key}`" in message and f"`{suggested}`" in message
    assert f"+{key}" not in message and "\n" not in message


def test_plus_cannot_add_a_key_to_the_schema():
    with pytest.raises(ValueError, match=r"`trainer\.foo`.*`\+` cannot add keys"):
        check_overrides(["+trainer.foo=1"], CONFIGS)
    # composed without the pre-check (scripts, the Python API): refused when the config is built
    with pytest.raises(ValueError, match=r"unknown config key `trainer\.foo`"):
        to_dataclass(compose_config("+trainer.foo=1"))


def test_valid_overrides_pass():
    check_overrides(["data=msrvtt_ret", "data.train.annotations=x.json", "+reproduction.note=1", "hydra.run.dir=x",
                     "model.modalities=[video]", "experiment=sample", "debug=default", "trainer.max_steps=2,3",
                     "logger.wandb.tags=[a,b]", "logger.wandb.name=run1", "~init_from", "-m", "--cfg", "job"],
                    CONFIGS)
    cfg = to_dataclass(compose_config("logger.wandb.tags=[a,b]", "logger.wandb.group=g", "logger.wandb.notes=n"))
    assert cfg.logger.wandb.tags == ["a", "b"] and cfg.logger.wandb.group == "g"


def test_schema_keys_cover_nested_and_optional_sections():
    keys = set(schema_keys())
    assert {"trainer.max_steps", "model.vision.width", "data.train.annotations", "logger.wandb.notes"} <= keys
    assert "unknown config key `lr`" in unknown_key_message("lr") and "`trainer.lr`" in unknown_key_message("lr")
