"""Experiment logging: wandb (offline by default, so runs never need an account or network).

One output folder is one wandb run: its id is kept in ``<output_dir>/wandb_run_id``, so ``trainer.resume=true``
continues the same run (``resume="allow"``) instead of starting a new one. Offline runs print the ``wandb sync``
command that uploads them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from gram.config import LoggerConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The int and float entries of a flat result (no booleans, lists or nested dicts), with ``prefix``."""
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_id(output_dir: Path, resume: bool) -> tuple[str, bool]:
    """(wandb run id, whether it continues an earlier run): the id stored in ``output_dir`` when resuming,
    else a new one, stored there for a later resume."""
    path = Path(output_dir) / RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip(), True
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id format
    path.write_text(new + "\n")
    return new, False


class RunLogger:
    """A wandb run for one output folder (or nothing, with ``logger.wandb.mode=disabled``).

    ``job_type`` is "train" or "test"; ``resume`` continues the run whose id ``output_dir`` holds.
    """

    def __init__(self, cfg: LoggerConfig, output_dir: Path, config: dict[str, Any], resume: bool = False,
                 job_type: str = "train"):
        self.run, self.sync_command, self.job_type = None, None, job_type
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        wcfg = cfg.wandb
        run_id_, resumed = run_id(output_dir, resume)
        self.run = wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, dir=str(output_dir),
                              config=config, id=run_id_, resume="allow", name=wcfg.name, group=wcfg.group,
                              tags=list(wcfg.tags) or None, notes=wcfg.notes, job_type=job_type)
        if resumed:
            log.info("wandb: continuing run %s", run_id_)
        if wcfg.mode == "offline":
            # The run directory (the parent of run.dir's files/) is what `wandb sync` takes. A resumed run writes
            # one offline directory per part, all with the same id: the glob syncs them in order (already synced
            # parts are skipped).
            run_dir = Path(self.run.dir).parent
            target = run_dir if not resumed else run_dir.parent / f"offline-run-*-{run_id_}"
            self.sync_command = f"wandb sync {target}"
            log.info("wandb offline run %s; upload it later with: %s", run_id_, self.sync_command)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_results(self, results: dict[str, dict[str, Any]], step: int | None = None) -> None:
        """Final evaluation results ({dataset: flat result}) as `<mode>/<dataset>/<metric>` in the history and the
        run summary (the numbers wandb's run table shows)."""
        if self.run is None:
            return
        prefix = "test" if self.job_type == "test" else "final"
        flat = {k: v for name, result in results.items() for k, v in numeric(result, f"{prefix}/{name}/").items()}
        if flat:
            self.run.log(flat, step=step)
            self.run.summary.update(flat)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            if self.sync_command:
                log.info("wandb: upload this offline run with: %s", self.sync_command)


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
