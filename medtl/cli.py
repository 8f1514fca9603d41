"""The ``medtl`` command line.

Each subcommand lives in a module of :mod:`medtl.commands` that defines
``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
Errors that medtl expects (:class:`medtl.errors.MedtlError`) are printed as one
message without a traceback, and the process exits with the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from medtl.commands import COMMANDS
from medtl.errors import EXIT_FAILURE, EXIT_INTERRUPTED, MedtlError, RunInterrupted

__all__ = ["main", "build_parser"]

logger = logging.getLogger("medtl")

EXIT_CODES_HELP = """exit codes:
  0    success
  1    unexpected internal error (traceback in the run log)
  2    invalid study file, --set override or command line, including an unknown
       component name or a missing weights file (checked before the run starts)
  3    invalid data: manifest problems, unreadable or missing images
  4    training failed (for example, the loss became NaN)
  5    plugin error: a plugin failed to load in strict mode, a duplicate component, or an
       unknown component requested by a plugin or by code
  6    an output could not be written (disk full, no permission); earlier checkpoints are intact
  130  interrupted with Ctrl-C (SIGINT) or SIGTERM; continue with medtl run --resume RUN_DIR
"""


def build_parser() -> argparse.ArgumentParser:
    import medtl

    parser = argparse.ArgumentParser(
        prog="medtl",
        description="Transfer learning and cross-site evaluation for medical images.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medtl {medtl.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    if os.environ.get("RANK", "0") != "0" and not verbose:
        # Under torchrun, rank 0 reports progress; the other ranks log only problems.
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger("medtl")
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)
                     or isinstance(h, logging.FileHandler)]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except MedtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; a run that finished an epoch can continue with "
              "'medtl run --resume RUN_DIR'", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort, so users see one line, not a traceback
        logger.debug("unexpected error", exc_info=True)
        print(f"error: unexpected {type(exc).__name__}: {exc}. Run with -v for the traceback, "
              "and please report it.", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
