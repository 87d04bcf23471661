"""What a results file needs to be trusted later: the exact weights, readable numbers, and where they came from.

``file_sha256`` hashes a whole file (the full hex digest, comparable with ``sha256sum``); ``rounded`` removes
floating-point noise (7.000000000000001 -> 7.0) from numbers meant to be read; ``provenance`` records the gram
version, the git commit when gram runs from a git checkout, the library versions, the time, the command line
and the host.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Significant digits kept by `rounded`: recalls over up to 100k queries stay exact, noise in the 16th digit goes.
SIGNIFICANT_DIGITS = 6


def file_sha256(path: str | Path) -> str:
    """The full sha256 hex digest (64 characters) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """``value`` with every float (in nested dicts, lists and tuples) rounded to ``digits`` significant digits.

    Integers, booleans, strings and non-finite floats are unchanged (JSON writes nan/inf as NaN/Infinity).
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if value == value and abs(value) != float("inf") else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def git_commit(folder: str | Path) -> dict[str, Any] | None:
    """{"commit": sha, "dirty": uncommitted changes?} of the git checkout holding ``folder``, or None when it is
    not in one (an installed wheel) or git is unavailable."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Where a result came from: versions, git commit of the gram source, UTC time, command line and host."""
    import torch

    import gram

    source = Path(gram.__file__).resolve().parent
    record: dict[str, Any] = {
        "gram_version": gram.__version__,
        "git": git_commit(source),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        "host": socket.gethostname(),
    }
    if torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(0)
    return record
