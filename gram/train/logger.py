"""Experiment logging: wandb (offline by default, so runs never need an account or network)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from gram.config import LoggerConfig

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, cfg: LoggerConfig, output_dir: Path, config: dict[str, Any]):
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                              dir=str(output_dir), config=config)
        if cfg.wandb.mode == "offline":
            log.info("wandb offline run in %s (sync later with `wandb sync`)", self.run.dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
