"""`amdet-gate repair`: erase a detected backdoor from a text encoder and prove it with a re-scan.

findings.py reads a scan's outputs, edit.py holds the math, plan.py its measured choices,
measure.py the figures a repair is judged by, layout.py writes the copy, report.py the
reports, pipeline.py strings them together (docs/repair.md). The public entry point is
`amdet_gate.repair`; this package imports torch, the top-level package does not.
"""
