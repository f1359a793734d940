"""Command-line interface: the only place that reads argv, environment and config files.

One module per command group, each with ``register(subparsers)`` and the handler(s) it installs:
:mod:`.run` (``run``), :mod:`.budget` (``budget check``, ``report``), :mod:`.audit`
(``audit``), :mod:`.bench` (``bench secagg``), :mod:`.flower` (``flower local``), :mod:`.keys` (``keys new``,
``keys roster``, ``keys digest``). Handlers import
the workflows they call lazily, so ``--help`` and bad flags answer without loading torch.

Bad flags, bad config values and bad input of any kind (missing or corrupt files, tampered
messages) end with one line on stderr naming what is wrong, and exit code 2; no traceback. Exit 1
means a check ran and failed (``budget check`` FAIL, a ledger that fails verification,
``run --fail-on-skip``), 3 that a run was
stopped by its budget policy, 130 an interrupt. Library modules print nothing: they log to the
``fedmm_secure.*`` loggers, which the CLI sends to stderr (warnings and errors by default;
``FEDMM_LOG_LEVEL=INFO`` or ``DEBUG`` shows more). Results go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Idle OpenMP threads spin briefly, then sleep. libgomp's default spin (300,000 iterations) made
# a second intra-op thread on a loaded 2-core machine up to 10x slower (threads spin at barriers
# while descheduled); sleeping at once (OMP_WAIT_POLICY=PASSIVE) lost the second core's gain on
# an idle machine (8 min 23 s for the 3M-row run, a fifth of it in system time). 10,000 spins
# kept both: idle as fast as the default, loaded no slower than one thread
# (bench/RESULTS_throughput.md). libgomp reads this once, when torch loads it: the CLI imports
# torch only later. An explicit setting in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from ..errors import BudgetExceededError, ConfigError, FedMMError, VerificationError
from . import audit, bench, budget, flower, keys, run

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedmm-secure", description="Privacy-hardened federated multi-market recommendation.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Command groups build their nested subcommands with the class of the parser they are given.
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in (run, bench, budget, flower, keys, audit):   # the order of `fedmm-secure --help`
        group.register(sub)
    return p


def _version() -> str:
    # From the installed metadata, as fedmm_secure.__version__ is (the CLI sits below the
    # package's public surface, so it does not import it).
    from importlib import metadata
    try:
        return metadata.version("fedmm-secure")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_log_handler: logging.Handler | None = None


def _configure_logging() -> None:
    global _log_handler
    raw = os.environ.get("FEDMM_LOG_LEVEL", "WARNING").upper()
    if raw not in _LOG_LEVELS:
        raise ConfigError("FEDMM_LOG_LEVEL", f"got {raw!r}", allowed=", ".join(_LOG_LEVELS))
    package_log = logging.getLogger("fedmm_secure")
    if _log_handler is not None:   # main() may run several times in one process (tests)
        package_log.removeHandler(_log_handler)
    # Bound to the stderr of this call, not of the first one.
    _log_handler = logging.StreamHandler(sys.stderr)
    _log_handler.setFormatter(logging.Formatter("fedmm-secure: %(levelname)s: %(message)s"))
    package_log.addHandler(_log_handler)
    package_log.setLevel(raw)


def _set_threads() -> None:
    # One intra-op thread per core this process may use (with short OpenMP spins, see the top of
    # this module); FEDMM_THREADS overrides.
    import torch
    raw = os.environ.get("FEDMM_THREADS", str(len(os.sched_getaffinity(0))))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("FEDMM_THREADS", f"must be a positive integer, got {raw!r}")
    torch.set_num_threads(int(raw))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging()
        _set_threads()
        return args.handler(args)
    except BudgetExceededError as e:
        print(f"fedmm-secure: budget exceeded: {e}", file=sys.stderr)
        return 3
    except VerificationError as e:
        print(f"fedmm-secure: error: {e}", file=sys.stderr)
        return 1
    except FedMMError as e:
        # Bad or tampered input of any kind (flags, config, data, files, messages; ConfigError
        # included): one line, exit 2. Exit 1 is kept for checks that ran and failed.
        print(f"fedmm-secure: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmm-secure: interrupted", file=sys.stderr)
        return 130
