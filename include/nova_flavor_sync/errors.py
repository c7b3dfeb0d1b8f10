"""Exceptions of the engine, each carrying the exit code the CLI turns it into.

The engine raises, never prints or exits; ``cli.main()`` alone maps an exception to
one stderr line and its code. In Airflow the same exceptions fail the task. A database
driver's error is worded for their messages by ``mysql_error_text``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """One table for every mode; repeated in README.md and the cli docstring."""

    OK = 0  # in sync, or applied and verified
    UNEXPECTED = 1  # unexpected error: see the log file
    USAGE = 2  # bad flags or flag values (argparse's own code)
    DRIFT = 3  # changes pending (dry run, --verify)
    REFUSED = 4  # refused before writing: connectivity, schema, bad or foreign backup
    INCOMPLETE = 5  # done, but with conflicts, row errors or a stop partway: run again


class NovaFlavorSyncError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class UsageError(NovaFlavorSyncError):
    """A flag or parameter value that cannot be used (unknown flavor, bad UUID, ...)."""

    exit_code = ExitCode.USAGE


class ConfigError(NovaFlavorSyncError):
    """No usable database location: bad URL, unreadable nova.conf, missing option."""

    exit_code = ExitCode.REFUSED


class DatabaseUnavailableError(NovaFlavorSyncError):
    """The database cannot be reached or refuses the credentials."""

    exit_code = ExitCode.REFUSED


class SchemaError(NovaFlavorSyncError):
    """The database lacks a table or column the tool needs: not a nova_api database."""

    exit_code = ExitCode.REFUSED


class BackupError(NovaFlavorSyncError):
    """A backup cannot be written, or a backup file is missing, damaged or foreign."""

    exit_code = ExitCode.REFUSED


class ApplyAbortedError(NovaFlavorSyncError):
    """Writing stopped partway: a batch kept failing after its retries.

    Every committed batch is complete and every other row is untouched, so running
    again converges.
    """

    exit_code = ExitCode.INCOMPLETE


def mysql_error_text(exc: BaseException) -> str:
    """A database driver's (PyMySQL's) error as ``(code) message``, for our messages.

    The server's message without the driver's tuple form; it never holds the password.
    """
    if len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    return str(exc) or type(exc).__name__
