"""The single-file layouts, one module per family; `layouts()` is every one of them, in the order tried.

A new layout is a module here whose `LAYOUTS` names its `parts.Layout`s, added to `_MODULES` below.
"""

from __future__ import annotations

from amdet_gate.checkpoints.layouts import sd1, sd2, sd3, sdxl, standalone
from amdet_gate.checkpoints.parts import Layout

_MODULES = (sd1, sd2, sd3, sdxl, standalone)


def _ordered() -> tuple[Layout, ...]:
    found = [layout for module in _MODULES for layout in module.LAYOUTS]
    names = [layout.name for layout in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"layout {twice[0]} registered twice")
    return tuple(sorted(found, key=lambda layout: (layout.order, layout.name)))


_LAYOUTS = _ordered()  # built once at import, never changed


def layouts() -> tuple[Layout, ...]:
    """Every layout, lowest `order` first: a specific layout is asked before a general one."""
    return _LAYOUTS


__all__ = ["layouts"]
