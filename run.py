"""Train and evaluate GRAM: `python run.py [overrides]`, `python run.py mode=test checkpoint=PATH`.

Launch on several processes with `torchrun --nproc_per_node N run.py ...`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gram.cli import run_with_clear_errors
from gram.config import check_overrides, register_configs, to_dataclass

CONFIGS = Path(__file__).resolve().parent / "configs"
register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    def checked_run() -> None:
        to_dataclass(cfg)  # a value out of range is refused before torch and the models load
        from gram.main import run  # (so `--help` and config mistakes answer at once)

        run(cfg)

    run_with_clear_errors(checked_run)


if __name__ == "__main__":
    run_with_clear_errors(lambda: check_overrides(sys.argv[1:], CONFIGS))  # before Hydra's `+key=` advice
    main()
