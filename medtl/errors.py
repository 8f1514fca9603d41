"""Exception classes and the exit codes that the CLI maps them to."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "did_you_mean",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    "EXIT_DATA",
    "EXIT_TRAINING",
    "EXIT_PLUGIN",
    "EXIT_OUTPUT",
    "EXIT_INTERRUPTED",
    "MedtlError",
    "ConfigError",
    "DataError",
    "BadFileError",
    "SkippedFile",
    "TrainingError",
    "PluginError",
    "UnknownComponentError",
    "OutputError",
    "RunInterrupted",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected internal error; the CLI prints the traceback to the run log
EXIT_CONFIG = 2  # invalid study file or --set override (unknown component name, missing manifest or weights file included), invalid command line
EXIT_DATA = 3  # invalid manifest, unreadable image, missing file
EXIT_TRAINING = 4  # training diverged or failed
EXIT_PLUGIN = 5  # plugin failed to load in strict mode, duplicate component, unknown component requested by code
EXIT_OUTPUT = 6  # an output could not be written (disk full, no permission); the previous checkpoint is intact
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; the last checkpoint is resumable


class MedtlError(Exception):
    """Base class of the errors that medtl reports without a traceback."""

    exit_code = EXIT_FAILURE


class ConfigError(MedtlError, ValueError):
    """An invalid study file or override.

    ``problems`` lists ``(key_path, message)`` pairs so that all of them are shown at once.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            lines = [message] + [f"  {key}: {text}" for key, text in self.problems]
            message = "\n".join(lines)
        super().__init__(message)


class DataError(MedtlError, ValueError):
    """Invalid input data: a manifest problem or an image that cannot be used."""

    exit_code = EXIT_DATA


class BadFileError(DataError):
    """A file that cannot be read as an image. The message names the file."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SkippedFile(BadFileError):
    """A readable file that holds no image (a DICOM structured report, say).

    Sources raise it so that the loader can skip the file and record the reason.
    """


class TrainingError(MedtlError, RuntimeError):
    """Training failed, for example because the loss became NaN."""

    exit_code = EXIT_TRAINING


class PluginError(MedtlError, RuntimeError):
    """A plugin could not be loaded or registered."""

    exit_code = EXIT_PLUGIN


class UnknownComponentError(PluginError, ValueError):
    """A component name that no plugin registers."""


class OutputError(MedtlError, OSError):
    """An output file (checkpoint, metrics, report) could not be written."""

    exit_code = EXIT_OUTPUT


class RunInterrupted(MedtlError):
    """Training stopped on SIGINT or SIGTERM after saving a resumable checkpoint.

    ``run_dir`` is the run folder to pass to ``medtl run --resume``.
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, run_dir: str):
        self.run_dir = run_dir
        super().__init__(message)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return " Did you mean 'X'?" for the candidate closest to ``name``, or "" when none is close.

    A candidate that ends with ``"." + name`` wins, so a module's short name points to
    its dotted name.
    """
    candidates = list(candidates)
    close = [c for c in candidates if c.endswith("." + name)] or difflib.get_close_matches(name, candidates, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""

