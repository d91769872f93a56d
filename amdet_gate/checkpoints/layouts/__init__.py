"""The single-file layouts, one module per family; importing this package registers them all.

A new layout is a module here that calls `parts.register(Layout(...))` and is imported below.
"""

from amdet_gate.checkpoints.layouts import sd1, sd2, sd3, sdxl, standalone

__all__ = ["sd1", "sd2", "sd3", "sdxl", "standalone"]
