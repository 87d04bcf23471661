"""Experiment logging: wandb (offline by default, so runs never need an account or network)."""

from __future__ import annotations

import json
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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`; a line that does not parse (a write cut short by a kill or a full disk)
    is dropped with a warning naming the file and line, so it never blocks a resume."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if line.strip():
                log.warning("%s line %d is incomplete or not a metrics record: dropped (%.60r)", path, number, line)
            continue
        records.append(record)
    return records
