"""Command-line glue around Hydra: one output folder per torchrun job, and errors as one clear line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

# Errors caused by the user's input (config, paths, data); shown as one line unless GRAM_DEBUG=1.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def prepare_argv(argv: list[str] | None = None) -> None:
    """Under torchrun every rank must write into the same output_dir: derive it from the launcher's start time.

    All ranks on a node share the torchrun agent as parent process; multi-node runs should pass output_dir=
    on a shared file system.
    """
    argv = sys.argv if argv is None else argv
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("output_dir=") for a in argv[1:]):
        return
    import psutil

    started = psutil.Process(os.getppid()).create_time()
    argv.append("output_dir=outputs/" + time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started)))


def run_with_clear_errors(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except USER_ERRORS as error:
        if os.environ.get("GRAM_DEBUG") == "1":
            raise
        print(f"error: {error}\n(set GRAM_DEBUG=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None
