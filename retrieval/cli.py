"""Helpers shared by the thin scripts in tools/: user errors become one line on stderr, not a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from retrieval.checkpoint import CheckpointError
from retrieval.config import ConfigError, load_cfg
from retrieval.engine.logger import setup_logging

# Errors caused by the user's input (files, keys, values); anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a user error exits with status 2 and its message."""
    setup_logging()
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def config_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` (repeatable: files merge in order) and KEY VALUE pairs."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config file with _BASE_ inheritance; repeat to merge several in order",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple:
    """(parsed arguments, the frozen config of their --config files and overrides)."""
    args = parser.parse_args(argv)
    return args, load_cfg(args.config, args.opts)
