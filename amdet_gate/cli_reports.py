"""The report options of `scan` and `report` (--sarif, --html, ...), one per registered report format.

Typer reads a command's options from its signature, so the command is written with one parameter,
`reports`, and `report_options` gives Typer a signature in which that parameter is replaced, in
place, by one `Path | None` option per format of the registry (amdet_gate/report): the help lists
them where `reports` stands, and a format added to the registry is an option of both commands
without a change here. The command itself receives `reports` as {format name: path} for the
options given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from amdet_gate.report import ReportFormat, formats

PARAMETER = "reports"


class Verb(Enum):
    """How the option's help reads: `scan` writes a copy of what is in --out, `report` only the file."""

    ALSO = "scan"
    ONLY = "report"


def _option(fmt: ReportFormat, verb: Verb) -> inspect.Parameter:
    help_text = fmt.scan_help if verb is Verb.ALSO else fmt.report_help
    return inspect.Parameter(fmt.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Path | None, typer.Option(fmt.option, help=help_text)])


def report_options(verb: Verb) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator (below `@app.command()`): the command's `reports` parameter becomes one option per format."""

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        if PARAMETER not in signature.parameters:
            raise TypeError(f"{command.__name__} has no {PARAMETER!r} parameter to replace")
        fmts = formats()
        clash = sorted({f.name for f in fmts} & set(signature.parameters))
        if clash:  # a format named like an existing option would silently take its place
            raise ValueError(f"report format {', '.join(clash)} has the name of a {command.__name__} option")
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name == PARAMETER:
                params += [_option(f, verb) for f in fmts]
            else:  # keyword-only, as the generated ones are: Typer passes everything by name
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = {f.name for f in fmts}

        def run(**kwargs: Any) -> Any:
            reports = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            return command(**kwargs, reports={k: v for k, v in reports.items() if v is not None})

        run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
        run.__module__ = command.__module__
        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        # Typer also reads the annotations (typing.get_type_hints): the generated ones, as objects.
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
        return run

    return wrap
