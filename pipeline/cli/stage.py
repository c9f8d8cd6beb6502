"""Shared command-line plumbing for `stages/*.py` and `python -m pipeline`.

Every user error (bad params, missing input, unreachable server) is raised as `UserError` or
`ConfigError` and printed as one line; the exit code is 2 for parameters, 1 for the rest.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError, InterruptError, UserError
from pipeline.core.layout import Layout
from pipeline.core.tracking import bound_http_retries

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print `error: message` to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with `--params` and repeatable `-S section.key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted params key, as `dvc exp run -S` does",
    )
    return parser


def parse_stage_config(
    description: str, argv: Sequence[str] | None = None
) -> tuple[Config, Layout]:
    """Parse a stage's command line: its validated config (exit 2 on bad params) and the
    layout rooted where the params file lies (the repository root)."""
    args = stage_parser(description).parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
    except ConfigError as err:
        fail(str(err), EXIT_BAD_PARAMS)
    return cfg, Layout(Path(args.params).resolve().parent)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (`kill`, a scheduler) stops a stage as Ctrl-C does


def run_stage(body: Callable[[], None]) -> None:
    """Run a stage body: log to stderr, turn `UserError`/`ConfigError` into one-line exits;
    SIGTERM and Ctrl-C stop it with one line (exit code 130). MLflow's HTTP retries are
    bounded (seconds, not minutes: `tracking.bound_http_retries`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bound_http_retries()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        body()
    except ConfigError as err:
        fail(str(err), EXIT_BAD_PARAMS)
    except UserError as err:
        fail(str(err), getattr(err, "exit_code", EXIT_FAILED))
    except KeyboardInterrupt:
        fail("interrupted", InterruptError.exit_code)
