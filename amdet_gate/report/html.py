"""The self-contained HTML report of one scan (docs: conventions, "HTML report").

One file: inline CSS, charts and reversed-target images as data: URIs, no script, no external URL,
a Content-Security-Policy that forbids everything else. The typed result is the input contract; model
names, tokens, prompts and captions in it are untrusted, so Jinja2 autoescapes every value and
invisible or direction-changing characters are shown as escapes rather than rendered.

`render_summary_html` is the page of a model with several text encoders (templates/encoders.html.j2):
the table of encoders, each linking to that encoder's own report.

Jinja2 and the charts (matplotlib) are imported when a page is rendered, not with this module: the
CLI imports every report format to build its options.
"""

from __future__ import annotations

import base64
import importlib.resources
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from amdet_gate.checkpoints.summary import encoder_lines
from amdet_gate.files import NotRegular, OutsideFolder, TooLarge, read_regular_at, resolve_inside, write_atomic
from amdet_gate.report import ReportFormat
from amdet_gate.result import GateTable, ScanResult, Search, dump
from amdet_gate.result.codec import to_data
from amdet_gate.sanitise import uri_path, visible

if TYPE_CHECKING:
    import jinja2

MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_IMAGES = 32  # render.py makes up to 16 images plus its tokens card
MAX_CHECK_ROWS = 200
# Suffix -> MIME type and the magic bytes the file must start with (None: checked separately, SVG).
IMAGE_TYPES: dict[str, tuple[str, bytes | None]] = {
    ".png": ("image/png", b"\x89PNG\r\n\x1a\n"),
    ".jpg": ("image/jpeg", b"\xff\xd8\xff"),
    ".jpeg": ("image/jpeg", b"\xff\xd8\xff"),
    ".svg": ("image/svg+xml", None),
}
VERDICTS = {
    "pass": ("PASS", "no injected backdoor found"),
    "fail": ("FAIL", "injected backdoor found"),
    "inconclusive": ("INCONCLUSIVE", "the scan could not decide"),
}
EXIT_CODES = {0: "allow", 1: "block", 2: "block (error or inconclusive: fail closed)", 3: "nothing scannable",
              4: "usage error"}
VERDICT_EXIT = {"pass": 0, "fail": 1, "inconclusive": 2}
GATE_HELP = {
    "assimilation_ratio": "share of held-out prompts whose output the pseudo-trigger pulls onto its target",
    "same_target_ratio": "share of held-out prompts whose triggered output matches the first prompt's: one target",
    "anchor_difference_ratio": "share of prompts whose triggered output differs from the clean anchor model's",
    "landscape_positive_ratio": "share of positive Hessian eigenvalues: a smooth bowl, not a natural saddle",
    "pooled_same_target_ratio": "pooled path: share of prompts whose pooled embedding the pseudo-trigger sends "
                                "to one target (text-on-pair backdoors)",
    "pooled_anchor_difference_ratio": "pooled path: share of prompts whose triggered pooled embedding opposes "
                                      "the clean anchor's",
}
CHART_CAPTIONS = {
    "landscape_map": "Loss on a grid around the pseudo-trigger (+). An injected backdoor sits in a smooth bowl.",
    "landscape_surface": "The same grid as a surface: a bowl (injected) versus a rugged or saddle shape (natural).",
    "hessian_spectrum": "Sorted eigenvalues of the 2 x 2 finite-difference Hessians at the interior grid points.",
    "assimilation": "Held-out prompts without and with the pseudo-trigger; the dashed line is the gate threshold.",
    "loss_history": "Optimisation loss of every random restart; a gate check runs when the running loss "
                    "drops below the dashed line.",
}


def _finalize(value: object) -> object:
    # Applied to every {{ }} before autoescaping; Markup is ours (CSS), never user data.
    from markupsafe import Markup

    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def fmt(value: object, digits: int = 4) -> str:
    """A value for a table cell: numbers to `digits` significant digits, null as an em dash."""
    import jinja2

    if value is None or isinstance(value, jinja2.Undefined):
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ", ".join(fmt(v, digits) for v in value[:20]) + (" \u2026" if len(value) > 20 else "")
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items())
    return str(value)


def fixed(value: object, digits: int = 3) -> str:
    """A number with a fixed count of decimals (scores), else as fmt."""
    n = _finite(value)
    return f"{n:.{digits}f}" if n is not None else fmt(value)


def size(value: object) -> str:
    n = _finite(value)
    if n is None:
        return fmt(value)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit} ({value:,} bytes)"
        n /= 1024
    return str(value)  # not reached


def _embed(base_dir: Path, rel: object) -> tuple[str | None, str]:
    """(data URI, "") for an image inside base_dir, else (None, why not). Never reads outside base_dir."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        return None, "image path missing"
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(rel).drive or ".." in pure.parts:
        return None, "image refused: the path must stay inside the result folder"
    kind = IMAGE_TYPES.get(pure.suffix.lower())
    if kind is None:
        return None, "image refused: only PNG, JPEG and SVG are embedded"
    try:
        data = read_regular_at(None, resolve_inside(base_dir / pure, base_dir), MAX_IMAGE_BYTES, nofollow=False)
    except OutsideFolder:
        return None, "image refused: the path leads outside the result folder"
    except NotRegular:  # a FIFO or device would block or never end
        return None, "image refused: not a regular file"
    except TooLarge:
        return None, f"image refused: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB"
    except OSError:
        return None, "image missing"
    mime, magic = kind
    valid = data.startswith(magic) if magic is not None else b"<svg" in data
    if not valid:
        return None, "image refused: the content does not match its type"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", ""


def _images(result: ScanResult, base_dir: Path) -> list[dict]:
    out = []
    for image in (result.reversed_target.images or ())[:MAX_IMAGES]:
        src, problem = _embed(base_dir, image.path)
        out.append({"src": src, "problem": problem, "path": image.path, "caption": image.caption,
                    "renderer": image.renderer})
    return out


def _gates(gates: GateTable) -> tuple[list[dict], dict]:
    """Threshold gates as table rows (in result order, whatever their names) and the plain metrics beside them."""
    rows = []
    for gate in gates:
        value, threshold = _finite(gate.value), _finite(gate.threshold)
        bar = None  # a value-versus-threshold bar, for ratios only
        if value is not None and threshold is not None and 0 <= value <= 1 and 0 <= threshold <= 1:
            bar = {"value": round(value * 100, 2), "threshold": round(threshold * 100, 2)}
        rows.append({"name": gate.name, "help": GATE_HELP.get(gate.name, ""), "value": gate.value,
                     "threshold": gate.threshold, "margin": gate.margin, "bar": bar,
                     "state": "passed" if gate.passed else "not-passed"})
    return rows, {"mean_assimilation": gates.mean_assimilation}


def _decision(result: ScanResult) -> dict:
    policy = result.policy
    if policy is not None:
        return {"applied": True, "exit_code": policy.exit_code,
                "action": EXIT_CODES.get(policy.exit_code, "unknown exit code"),
                "note": policy.note, "source": policy.source, "sha256": policy.sha256}
    code = VERDICT_EXIT[result.verdict]
    return {"applied": False, "exit_code": code, "action": EXIT_CODES[code], "note": None, "source": None,
            "sha256": None}


def _checks(search: Search) -> dict:
    checks = [to_data(c) for c in search.checks]
    columns: list[str] = []
    for check in checks:
        columns += [k for k in check if k not in columns]
    if all(c["variation_ratio"] is None for c in checks):  # only the final gates measure it (search.variation_ratio)
        columns = [k for k in columns if k != "variation_ratio"]
    return {"columns": columns, "rows": checks[:MAX_CHECK_ROWS], "hidden": max(0, len(checks) - MAX_CHECK_ROWS)}


def _template() -> jinja2.Template:
    import jinja2

    files = importlib.resources.files("amdet_gate.templates")

    def load(name: str) -> str | None:
        entry = files / name
        return entry.read_text("utf-8") if entry.is_file() else None

    env = jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True, finalize=_finalize,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(fmt=fmt, fixed=fixed, size=size)
    return env.get_template("report.html.j2")


def render_html(result: ScanResult, base_dir: Path) -> str:
    """The report as one HTML string; image paths in the result are read relative to base_dir.

    The template shows result.json's data (`dump(result)`: the same keys the file holds)."""
    from markupsafe import Markup

    from amdet_gate.report._charts import render_charts

    word, meaning = VERDICTS[result.verdict]
    gate_rows, metrics = _gates(result.gates)
    charts = {name: "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")
              for name, svg in render_charts(result).items()}
    css = (importlib.resources.files("amdet_gate.templates") / "report.css").read_text("utf-8")
    return _template().render(
        r=dump(result), verdict_class=str(result.verdict), verdict_word=word,
        verdict_meaning=meaning, decision=_decision(result), gates=gate_rows, metrics=metrics,
        gates_passed=sum(g["state"] == "passed" for g in gate_rows), images=_images(result, base_dir),
        charts=charts, captions=CHART_CAPTIONS, checks=_checks(result.search),
        css=Markup(css),  # our own file, not user data
        encoder_rows=encoder_lines(result.model),  # which encoder and layer, what was not scanned
    )


def write_html(result: ScanResult, base_dir: Path, path: Path) -> None:
    write_atomic(path, render_html(result, base_dir).encode("utf-8"))


def _summary_template() -> jinja2.Template:
    import jinja2

    source = importlib.resources.files("amdet_gate.templates").joinpath("encoders.html.j2").read_text("utf-8")
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)


def render_summary_html(summary: Mapping[str, Any], out: Path, where: Path) -> str:
    """The model's page; links to each encoder's report are relative to `where`, the page's folder."""
    from amdet_gate.report._summary import rows, score

    model = summary.get("model") or {}
    table = []
    for row in rows(summary):
        link = None
        if row["report"] and (out / row["report"]).is_file():
            link = uri_path(Path(os.path.relpath((out / row["report"]).resolve(), where.resolve())).as_posix())
        table.append({**{k: visible(str(v)) for k, v in row.items()}, "score": score(row["score"]), "link": link})
    parts = [{k: visible(str(p.get(k))) for k in ("name", "kind", "reason")} for p in summary.get("not_scanned") or []]
    return _summary_template().render(
        verdict=str(summary.get("verdict")), exit_code=summary.get("exit_code"),
        source=visible(str(model.get("source", "?"))),
        title=visible(str(model.get("layout_title"))) if model.get("layout_title") else None,
        rows=table, not_scanned=parts, version=(summary.get("tool") or {}).get("version", "?"))


FORMAT = ReportFormat(
    "html", "--html", "report.html", "the HTML report",
    render=lambda result, base_dir: render_html(result, base_dir).encode("utf-8"),
    render_summary=lambda summary, out, where: render_summary_html(summary, out, where).encode("utf-8"),
    order=20)  # no error page: a run without a result has nothing to show but the one line SARIF and Markdown carry
