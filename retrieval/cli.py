"""Helpers shared by the thin scripts in tools/: user errors become one line on stderr, not a
traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from retrieval.checkpoint import CheckpointError
from retrieval.config import ConfigError

# Errors caused by the user's input (files, keys, values); anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a user error exits with status 2 and its message."""
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
