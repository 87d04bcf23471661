"""A run's output folder: one per job, held by one run at a time, never shared by accident.

- `claim_default_folder`: the default `outputs/<date>/<HH-MM-SS>` gets a suffix (`_1`, `_2`, ...) when another job
  took it in the same second. The ranks of one torchrun job share a key (the launcher's host, pid and start
  time), so they all settle on the same folder; other jobs see a different key and move on.
- `RunLock`: an exclusive `fcntl.flock` on `<output_dir>/.lock` for the run's lifetime; a second run in the same
  folder stops at once, naming the folder and the holder (pid, host, start time, command).
- `refuse_foreign_checkpoints`: a fresh run (trainer.resume=false) never starts in a folder that holds another
  run's checkpoints (they would be pruned together and results.json could name the old run's checkpoint).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import psutil

from gram.cli import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CLAIM_LINK = ".claim"  # a symlink whose target is the key of the job that claimed a default folder


def job_key(launcher_pid: int) -> str:
    """Identifies one job: every process started by the same launcher process shares it."""
    started = psutil.Process(launcher_pid).create_time()
    return f"{socket.gethostname()}:{launcher_pid}:{started:.3f}"


def unique_run_dir(root: str) -> str:
    """`<root>/<date>/<HH-MM-SS>` of the launch, claimed for this job (a suffix when taken). Under torchrun the
    launch is the torchrun agent (every local rank's parent), so all ranks name the same folder; multi-node runs
    pass output_dir= on a shared file system."""
    launcher = os.getppid() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else os.getpid()
    started = psutil.Process(launcher).create_time()
    base = Path(root) / time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))
    return str(claim_default_folder(base, job_key(launcher)))


def claim_default_folder(base: Path, key: str, max_tries: int = 1000) -> Path:
    """The first of `base`, `base_1`, `base_2`, ... that is free or already claimed with `key`, claimed for `key`.

    A folder is claimed by creating the `.claim` symlink inside it (atomic, with its content); a folder that exists
    without a claim and is not empty belongs to someone else (an older run, the user).
    """
    for n in range(max_tries):
        folder = base if n == 0 else base.with_name(f"{base.name}_{n}")
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / CLAIM_LINK
        if not link.is_symlink() and any(p.name != CLAIM_LINK for p in folder.iterdir()):
            continue
        with contextlib.suppress(FileExistsError):
            os.symlink(key, link)
        if os.readlink(link) == key:
            return folder
    raise UserError(f"{base} and {max_tries - 1} suffixed variants are all taken; pass output_dir=PATH")


class RunLock:
    """Hold `<output_dir>/.lock` exclusively while the run lives; the file says who holds it (pid, host, start,
    command) for the message a second run gets. The kernel releases the lock when the holder dies, however."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"output_dir {self.output_dir} is in use by another run ({holder}); wait for it to "
                            f"finish, or choose another output_dir") from None
        except OSError as error:  # a file system without locks (some network mounts): run, but say so
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops a second run from using this folder at the same time",
                        self.path, error.strerror or error)
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock; the file stays for the next run
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    text = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    return text + (f": {info['command']}" if info.get("command") else "")


def refuse_foreign_checkpoints(output_dir: str | Path) -> None:
    """A fresh run must not start where another run left checkpoints."""
    from gram.checkpoint_format import list_checkpoints

    found = list_checkpoints(output_dir)
    if found:
        raise UserError(f"output_dir {output_dir} already holds checkpoints of another run ({found[-1].name}, "
                        f"{len(found)} in all); continue that run with trainer.resume=true or choose a new "
                        f"output_dir")


def resume_command(output_dir: str | Path, overrides: list[str] | None) -> str:
    """The command that continues this run: the same overrides with output_dir and trainer.resume=true, without
    the stop point (trainer.stop_after_steps is an absolute step)."""
    dropped = ("output_dir=", "trainer.resume=", "trainer.stop_after_steps=", "+trainer.stop_after_steps=")
    kept = [o for o in (overrides or []) if not o.startswith(dropped)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}" if world > 1 else "python"
    args = [*kept, f"output_dir={output_dir}", "trainer.resume=true"]
    return f"{launcher} run.py " + " ".join(shlex.quote(a) for a in args)
