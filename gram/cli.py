"""Command-line glue: errors as one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """An expected failure caused by the user's input (config, paths, data, checkpoints): its message is one line
    that names the file, id, key or step at fault and, where there is one, the fix."""


# Errors caused by the user's input; shown as one line unless GRAM_DEBUG=1 or HYDRA_FULL_ERROR=1.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C


def debugging() -> bool:
    return os.environ.get("GRAM_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_with_clear_errors(fn: Callable[[], object]) -> object:
    """Run an entry point (`run.py` or a script's main): a user error becomes one line on stderr and exit status 2;
    `GRAM_DEBUG=1` or `HYDRA_FULL_ERROR=1` re-raise it with the full traceback."""
    try:
        return fn()
    except USER_ERRORS as error:
        if debugging():
            raise
        message = " ".join(str(error).split("\n")) or type(error).__name__
        print(f"error: {message}  (set GRAM_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops by itself), or twice in it
        if debugging():
            raise
        print("interrupted: stopped without saving; the checkpoints already written are kept", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
