"""The report formats: one module per format in this package, one registry (docs/reports.md).

A format turns the typed result (result.json, the source of truth) into one file: SARIF for
code scanning, the HTML report, the Markdown summary, JUnit XML for CI test views. Each module
declares its format in one line, Bandit-style:

    FORMAT = ReportFormat("sarif", "--sarif", "result.sarif", "the SARIF 2.1.0 log", render, ...)

and nothing else changes when a format is added: `formats()` finds every module here, and from it
come the `scan` and `report` options (cli_reports.py), the format's file in --out and the user's
copy (outputs.py), the checks that refuse an output equal to an input or to another output and
the clearing at the start of a run (outpaths.py), the error outputs of a run that ends without a
result, the summary of a model with several text encoders (multiscan.py) and the verdict cache's
file list (cache.py).

Modules whose names start with an underscore are helpers (the charts, the summary rows), never
formats, and the registry does not import them. A format module must be light to import (the
CLI imports every format to build its options, also for a cache hit that answers in well under
a second): heavy imports (Jinja2, matplotlib) go inside its render functions.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amdet_gate.errors import ExitCode
    from amdet_gate.result import ScanResult

# The job summary ($GITHUB_STEP_SUMMARY) is GitHub-flavoured Markdown: this format's file is appended to it.
JOB_SUMMARY_FORMAT = "markdown"


@dataclass(frozen=True)
class ErrorReport:
    """A run that ended without a result (exit 2 or 3, or 1 for an unpinned revision): what its
    error outputs say, so that CI still learns why."""

    rule: str  # AMDET003 when the error names none (load or download failure, interrupted, internal error)
    message: str  # one line, from GateError; untrusted parts (paths, names) still to be escaped per format
    model: str
    subfolder: str | None
    exit_code: ExitCode


@dataclass(frozen=True)
class ReportFormat:
    """One report format: its names, its file in --out, and how it is drawn from a result."""

    name: str  # the key in a run's paths and result.json's `artifacts`; the scan and report parameter
    option: str  # the command-line option that writes a copy elsewhere (--sarif)
    file_name: str  # the file in --out
    what: str  # "the SARIF 2.1.0 log": the options' help is "Also write <what> here." / "Write <what> here."
    render: Callable[[ScanResult, Path], bytes]  # (result, the folder its image paths are relative to)
    # A model with several text encoders (multiscan.py): (the summary result.json's data, --out, the
    # folder the file will lie in: links to each encoder's report are relative to it). None: no summary.
    render_summary: Callable[[Mapping[str, Any], Path, Path], bytes] | None = None
    render_error: Callable[[ErrorReport], bytes] | None = None  # None: nothing is written for an error
    order: int = 100  # place in the option lists and help (then by name)

    def __post_init__(self) -> None:
        # Checked here, once: the name becomes a Python parameter, the file a path inside --out.
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"report format name {self.name!r} must be a Python identifier")
        if not self.option.startswith("--") or " " in self.option:
            raise ValueError(f"report format {self.name}: option {self.option!r} must be a long option (--name)")
        if not self.file_name or "/" in self.file_name or "\\" in self.file_name or self.file_name.startswith("."):
            raise ValueError(f"report format {self.name}: file name {self.file_name!r} must be a plain file name")

    @property
    def scan_help(self) -> str:
        return f"Also write {self.what} here."

    @property
    def report_help(self) -> str:
        return f"Write {self.what} here."


def formats() -> tuple[ReportFormat, ...]:
    """Every registered format, in `order`: the format modules of this package (and of any folder a
    caller added to its `__path__`, which is how the tests register one)."""
    return _discover(tuple(__path__))


def by_name() -> dict[str, ReportFormat]:
    return {f.name: f for f in formats()}


def options_list(conjunction: str = "and/or") -> str:
    """`--sarif, --html, --markdown and/or --junit`, for messages."""
    options = [f.option for f in formats()]
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} {conjunction} {options[-1]}"


@functools.cache
def _discover(path: tuple[str, ...]) -> tuple[ReportFormat, ...]:
    # Cached per package path: the modules do not change during a run, and the CLI, the output plan
    # and the cache all ask. A module is imported once anyway; this saves the folder listing.
    found = []
    for info in pkgutil.iter_modules(list(path)):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if not isinstance(fmt, ReportFormat):
            raise TypeError(f"{module.__name__} defines no FORMAT = ReportFormat(...); a helper module's name "
                            "starts with an underscore")
        found.append(fmt)
    ordered = tuple(sorted(found, key=lambda f: (f.order, f.name)))
    for attribute in ("name", "option", "file_name"):
        values = [getattr(f, attribute) for f in ordered]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"two report formats share the {attribute} {', '.join(duplicates)}")
    return ordered


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_bytes(data: Any) -> bytes:
    """How every JSON output of a run is written (result.sarif, the summary's result.json)."""
    return (json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n").encode("utf-8")
