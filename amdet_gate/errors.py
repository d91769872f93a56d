"""Errors the gate reports, each tied to its documented exit code (docs: conventions)."""

from __future__ import annotations

import re
from enum import IntEnum

# C0/C1 controls (ANSI escapes, "\r", NUL) from untrusted names or exception texts must not reach a
# terminal or a CI log, where "::command::" at a line start or an escape sequence would be acted on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """Untrusted text as one printable line."""
    return " ".join(_CONTROL.sub(" ", text).split())


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
