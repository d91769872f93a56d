"""Charts of a scan result for the HTML report, drawn with matplotlib and returned as SVG bytes.

Every chart reads only numbers of the typed result (never model names, tokens or prompts: those are
untrusted and belong in the autoescaped HTML, not in an image). Empty, null or non-finite data (a grid
whose shape does not match its offsets) gives a small "no data" chart instead of an exception.
Output is deterministic: matplotlib's defaults (not the user's matplotlibrc), a fixed SVG id salt,
no date or creator metadata, text drawn as paths (no dependence on the viewer's fonts).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from amdet_gate.result import ScanResult

# One palette for the report and its charts (the CSS uses the same colours).
CLEAN, TRIGGERED, POSITIVE, NEGATIVE, GRID = "#2563eb", "#dc2626", "#15803d", "#b91c1c", "#6b7280"
# Above this many eigenvalues the spectrum is drawn from evenly spaced ranks: same shape, smaller SVG.
MAX_SPECTRUM_POINTS = 400

_RC = {
    "svg.hashsalt": "amdet-gate",  # fixed clip-path / glyph ids: same result, same bytes
    "svg.fonttype": "path",
    "svg.image_inline": True,
    "font.family": "DejaVu Sans",  # ships with matplotlib
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "figure.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
# Matplotlib writes its name and a URL as SVG <metadata>; the report carries no URL, so drop it.
_SVG_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's own defaults plus ours, whatever the user's matplotlibrc says; restored afterwards."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        yield


def _svg(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # dpi only sets the resolution of rasterized artists (the dense landscape meshes); the rest stays vector.
    fig.savefig(buf, format="svg", metadata=_SVG_METADATA, bbox_inches="tight", pad_inches=0.08, dpi=150)
    return buf.getvalue()


def _no_data(title: str, why: str = "no data") -> Figure:
    fig = Figure(figsize=(6.4, 1.6))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.45, why, ha="center", va="center", color=GRID, fontsize=11, transform=ax.transAxes)
    return fig


def _floats(values: object) -> np.ndarray:
    """A 1-D float array from a JSON list; null or non-numeric entries become NaN, anything else empty."""
    if not isinstance(values, list | tuple):
        return np.zeros(0)
    return np.array([_float(v) for v in values], dtype=float)


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _number(value: object) -> float | None:
    """A finite number or None (for optional lines such as thresholds)."""
    v = _float(value)
    return v if math.isfinite(v) else None


def _grid(values: tuple, n: int) -> np.ndarray | None:
    """The n x n loss grid as floats, or None when its shape does not match the offsets."""
    if len(values) != n:
        return None
    rows = [_floats(row) for row in values]
    if any(len(row) != n for row in rows):
        return None
    return np.vstack(rows)


def _landscape(result: ScanResult) -> tuple[np.ndarray, np.ndarray] | None:
    offsets = _floats(result.landscape.offsets)
    n = len(offsets)
    grid = _grid(result.landscape.loss, n) if n >= 2 else None
    if grid is None or not np.isfinite(offsets).all() or not np.isfinite(grid).any():
        return None
    return offsets, grid


def landscape_map(result: ScanResult) -> Figure:
    """Loss around the pseudo-trigger (at 0, 0) as a filled contour map; a bowl means an injected backdoor."""
    title = "Loss landscape around the pseudo-trigger"
    data = _landscape(result)
    if data is None:
        return _no_data(title)
    offsets, grid = data
    fig = Figure(figsize=(6.0, 4.6))
    ax = fig.add_subplot()
    # engine: meshgrid(offsets, offsets, indexing="ij"), so rows follow d1 and columns follow d2.
    masked = np.ma.masked_invalid(grid)
    mesh = ax.pcolormesh(offsets, offsets, masked, cmap="viridis", shading="nearest", rasterized=True)
    if np.isfinite(grid).sum() >= 4 and np.nanmax(grid) > np.nanmin(grid):
        ax.contour(offsets, offsets, masked, levels=10, colors="white", linewidths=0.5, alpha=0.7,
                   negative_linestyles="solid")  # loss is mostly negative; dashed would read as "other"
    ax.plot([0.0], [0.0], marker="+", color=TRIGGERED, markersize=12, markeredgewidth=2, linestyle="none",
            label="pseudo-trigger")
    ax.set_xlabel("offset along d2 (random, orthogonal)")
    ax.set_ylabel("offset along d1 (negative gradient)")
    ax.set_aspect("equal")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(mesh, ax=ax, label="loss (lower: more assimilation)", shrink=0.85)
    return fig


def landscape_surface(result: ScanResult) -> Figure:
    """The same grid as a 3-D surface, which makes a bowl versus a saddle easy to see."""
    title = "Loss landscape (3-D)"
    data = _landscape(result)
    if data is None:
        return _no_data(title)
    offsets, grid = data
    fig = Figure(figsize=(6.0, 4.6))
    ax = fig.add_subplot(projection="3d")
    b, a = np.meshgrid(offsets, offsets)  # same orientation as the map: x = d2, y = d1
    # NaN cells are left out as holes (matplotlib drops their polygons): missing is shown, not invented.
    ax.plot_surface(b, a, grid, cmap="viridis", linewidth=0, antialiased=False, rstride=1, cstride=1,
                    rasterized=True)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(4))  # default ticks overlap at this size
    ax.set_xlabel("d2")
    ax.set_ylabel("d1")
    ax.tick_params(axis="z", pad=6)  # keeps the minus sign clear of the tick mark
    ax.set_zlabel("loss", labelpad=12)
    ax.view_init(elev=28, azim=-60)
    ax.set_title(title, loc="left")
    return fig


def hessian_spectrum(result: ScanResult) -> Figure:
    """Sorted 2x2 finite-difference Hessian eigenvalues; gate 4 wants most of them above the floor."""
    title = "Hessian eigenvalue spectrum"
    values = _floats(result.landscape.eigenvalues)
    values = np.sort(values[np.isfinite(values)])
    if values.size == 0:
        return _no_data(title)
    floor = _number(result.settings.thresholds.get("eigenvalue_floor")) or 0.0
    needed = _number(result.settings.thresholds.get("landscape_positive_ratio"))
    share = float((values > floor).mean())
    rank = np.arange(values.size)
    if values.size > MAX_SPECTRUM_POINTS:
        rank = np.unique(np.linspace(0, values.size - 1, MAX_SPECTRUM_POINTS).round().astype(int))
    shown = values[rank]
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    ax.fill_between(rank, 0.0, shown, where=shown > floor, color=POSITIVE, alpha=0.55,
                    interpolate=True, label="above floor", linewidth=0)
    ax.fill_between(rank, 0.0, shown, where=shown <= floor, color=NEGATIVE, alpha=0.55,
                    interpolate=True, label="at or below floor", linewidth=0)
    ax.plot(rank, shown, color="black", linewidth=0.6)
    ax.axhline(0.0, color=GRID, linewidth=0.8)
    ax.set_xlim(0, max(values.size - 1, 1))
    ax.set_xlabel(f"eigenvalue rank (of {values.size})")
    ax.set_ylabel("eigenvalue")
    need = f" (gate: > {needed:.0%})" if needed is not None else ""
    ax.set_title(f"{title}: {share:.1%} above the floor{need}", loc="left")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def assimilation_histograms(result: ScanResult) -> Figure:
    """Held-out prompts' assimilation without and with the pseudo-trigger, against the gate threshold."""
    title = "Assimilation of held-out prompts"
    clean = _floats(result.distributions.clean_assimilation)
    triggered = _floats(result.distributions.triggered_assimilation)
    clean, triggered = clean[np.isfinite(clean)], triggered[np.isfinite(triggered)]
    if clean.size == 0 and triggered.size == 0:
        return _no_data(title)
    threshold = _number(result.settings.thresholds.get("assimilation"))
    both = np.concatenate([clean, triggered] + ([np.array([threshold])] if threshold is not None else []))
    low, high = float(both.min()), float(both.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 41)
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    if clean.size:
        ax.hist(clean, bins=bins, color=CLEAN, alpha=0.6, label=f"without trigger (n={clean.size})")
    if triggered.size:
        ax.hist(triggered, bins=bins, color=TRIGGERED, alpha=0.6, label=f"with pseudo-trigger (n={triggered.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}")
    ax.set_xlabel("assimilation A (similarity to the trigger's target)")
    ax.set_ylabel("prompts")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def loss_history(result: ScanResult) -> Figure:
    """Per-restart optimisation loss by step, with the loss that triggers a gate check."""
    title = "Optimisation loss by step"
    series = [_floats(row) for row in result.search.loss_history]
    width = max((len(s) for s in series), default=0)
    if width == 0:
        return _no_data(title)
    table = np.full((len(series), width), np.nan)  # ragged rows padded with NaN (gaps, not zeros)
    for i, s in enumerate(series):
        table[i, : len(s)] = s
    if not np.isfinite(table).any():
        return _no_data(title)
    best = result.search.best_restart
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    steps = np.arange(1, len(series) + 1)
    many = width > 6  # one legend entry per restart would bury the chart: then "other restarts" once
    others_labelled = False
    for r in range(width):
        is_best = r == best
        label = f"restart {r}" + (" (reported)" if is_best else "")
        if many and not is_best:
            label, others_labelled = ("_nolegend_" if others_labelled else "other restarts"), True
        ax.plot(steps, table[:, r], linewidth=1.6 if is_best else 0.8, alpha=1.0 if is_best else 0.6,
                color=TRIGGERED if many and is_best else GRID if many else None, label=label,
                zorder=3 if is_best else 2)
    trigger = _number(result.settings.search.get("loss_trigger"))
    if trigger is not None:
        ax.axhline(trigger, color="black", linestyle="--", linewidth=1.0, label=f"gate check below {trigger:g}")
    detected = _number(result.search.detected_at_step)
    if detected is not None:
        ax.axvline(detected, color=TRIGGERED, linestyle=":", linewidth=1.2, label=f"detected at step {detected:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, loc="left")
    ax.legend(loc="best", fontsize=7, ncol=2 if 4 < width <= 6 else 1)
    return fig


# Report order; key -> chart function. The template gives each a caption.
CHARTS: dict[str, Callable[[ScanResult], Figure]] = {
    "landscape_map": landscape_map,
    "landscape_surface": landscape_surface,
    "hessian_spectrum": hessian_spectrum,
    "assimilation": assimilation_histograms,
    "loss_history": loss_history,
}


def chart_svg(name: str, result: ScanResult) -> bytes:
    """One chart as SVG bytes; data too malformed to draw gives a "cannot draw" chart, not an error."""
    with _style():
        try:
            fig = CHARTS[name](result)
        except (TypeError, ValueError, IndexError, OverflowError):
            fig = _no_data(name.replace("_", " "), "data present but malformed: cannot draw")
        return _svg(fig)


def render_charts(result: ScanResult) -> dict[str, bytes]:
    """Every chart of the report as SVG bytes, keyed as in CHARTS."""
    return {name: chart_svg(name, result) for name in CHARTS}
