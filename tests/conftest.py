"""Shared fixtures: config composition patched for CPU and tmp paths, and one small generated sample dataset."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gram.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "disabled")
register_configs()


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test cleanly when the shared folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def load_script(name: str):
    """scripts/<name>.py as a module, loaded once per session under one name: worker processes unpickle its
    functions by module name, so a second copy under the same name would break the first one's pools."""
    key = f"gram_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


def compose_config(*overrides: str, output_dir: Path | None = None):
    """Compose configs/config.yaml exactly as run.py does, plus overrides."""
    extra = [f"output_dir={output_dir}"] if output_dir is not None else ["output_dir=unused"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small generated sample dataset shared by the tests of one session."""
    from gram.data.sample import generate_sample_dataset

    root = tmp_path_factory.mktemp("sample")
    generate_sample_dataset(root, num_train=96, num_test=24, seed=0)
    return root


def sample_overrides(root: Path, *extra: str) -> list[str]:
    """Overrides for a fast CPU run on the session's sample dataset."""
    return [f"data.sample_dir={root}", "data.sample_train_size=96", "data.sample_test_size=24",
            "data.num_workers=0", "data.batch_size=16", "data.test_batch_size=12", "logger.wandb.mode=disabled",
            "logger.progress_bar=false", "trainer.device=cpu", *extra]
