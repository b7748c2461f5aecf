"""User-facing errors and the one place command lines turn them into messages."""

from __future__ import annotations

import sys
from typing import Callable


class WideepError(Exception):
    """A problem with the user's input (config, checkpoint, flag, file) that names the fix.

    Command lines print its message on one line and exit with code 2; no traceback.
    """


class ConfigError(WideepError):
    """`config.json` (or a preset) holds a value the model cannot run with."""


class CheckpointError(WideepError):
    """A checkpoint directory is missing files or tensors, or holds the wrong shapes or bytes."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command-line `main`, turning a `WideepError` into `error: ...` on stderr and exit code 2."""
    try:
        code = main(argv)
    except WideepError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
