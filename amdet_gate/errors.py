"""Errors the gate reports, each tied to its documented exit code (docs: conventions)."""

from __future__ import annotations

from enum import IntEnum

from amdet_gate.sanitise import one_line


class ExitCode(IntEnum):
    PASS = 0
    FAIL = 1
    ERROR = 2  # load/download failure, time budget exceeded, inconclusive
    NOTHING_SCANNABLE = 3  # unsupported architecture, no weights, pickle-only weights
    USAGE = 4  # bad flags, invalid policy


class GateError(Exception):
    """An error with a one-line message and an exit code; the CLI prints it, no traceback."""

    exit_code: ExitCode = ExitCode.ERROR
    rule_id: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))  # one line, always


class OutputError(GateError):
    """An output could not be written (full disk, read-only folder): exit 2, the scan's verdict is not out."""


class LoadError(GateError):
    """The model could not be read: truncated or inconsistent files, NaN weights, ..."""


class UnsupportedModel(GateError):
    """Nothing here can be scanned: unsupported architecture or no weights."""

    exit_code = ExitCode.NOTHING_SCANNABLE
    rule_id = "AMDET102"


class PickleRefused(UnsupportedModel):
    """Only pickle-based weights were found; they are never loaded."""

    rule_id = "AMDET101"


class UsageError(GateError):
    exit_code = ExitCode.USAGE
