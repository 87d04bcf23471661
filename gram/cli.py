"""Command-line glue: errors as one clear line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a wrong argument is one line (``error: prog: message (see prog --help)``) and exit
    status 2, like every other user error, instead of the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {' '.join(message.split())}  (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--top-k``, ``--batch-size``, ``--workers``)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (``--num-workers``)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value
