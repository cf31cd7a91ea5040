"""The ``tlopt`` command: thin commands over the library.

Each command parses its options, calls one library function and prints. User errors
(``TloptError``) print one line per problem and exit with code 2; ``--debug`` shows tracebacks,
``--verbose`` every epoch's log line, ``--quiet`` no progress bars (they show on a terminal only).
The commands live by topic (data, study, run, export, serve) and register on the groups of
``tlopt.cli.apps``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

import typer
from tqdm.contrib.logging import logging_redirect_tqdm
from typer._click import exceptions as click_exceptions  # typer vendors click

from tlopt.cli.apps import app
from tlopt.errors import TloptError
from tlopt.progress import QUIET_ENV, VERBOSE_ENV

__all__ = ["app", "main"]

# The command modules register their commands; --help lists them in this order.
for _module in ("run", "export", "serve", "study", "data"):
    importlib.import_module(f"tlopt.cli.{_module}")


def _warning_line(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    sys.stderr.write(f"warning: {message}\n")


def main() -> None:
    """Entry point: run the CLI, turning user errors into one-line messages and exit code 2."""
    flags = {"--debug", "--verbose", "--quiet"}  # global: anywhere on the line
    debug, verbose, quiet = (f in sys.argv for f in ("--debug", "--verbose", "--quiet"))
    argv = [a for a in sys.argv[1:] if a not in flags]
    if quiet:
        os.environ[QUIET_ENV] = "1"  # no progress bars, here and in the workers it starts
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    verbose = verbose or os.environ.get(VERBOSE_ENV) == "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Per-epoch lines are DEBUG: the progress bars show the run; --verbose shows every epoch.
    logging.getLogger("tlopt").setLevel(logging.DEBUG if verbose else logging.INFO)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tlopt prints its own progress
    # matplotlib.category: an INFO line per categorical axis of the report's figures.
    for noisy in ("timm", "httpx", "urllib3", "botocore", "boto3", "s3transfer", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.showwarning = _warning_line  # type: ignore[assignment]
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bars
            app(args=argv, prog_name="tlopt", standalone_mode=False)
    except TloptError as exc:
        if debug:
            raise
        for line in str(exc).splitlines():
            sys.stderr.write(f"error: {line}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except click_exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except click_exceptions.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
