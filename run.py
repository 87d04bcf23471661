"""Train and evaluate GRAM: `python run.py [overrides]`, `python run.py mode=test checkpoint=PATH`.

Launch on several processes with `torchrun --nproc_per_node N run.py ...`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gram.cli import run_with_clear_errors
from gram.config import check_overrides, register_configs

CONFIGS = Path(__file__).resolve().parent / "configs"
register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from gram.main import run  # torch and the models load only once there is a run: `--help` answers at once

    run_with_clear_errors(lambda: run(cfg))


if __name__ == "__main__":
    run_with_clear_errors(lambda: check_overrides(sys.argv[1:], CONFIGS))  # before Hydra's `+key=` advice
    main()
