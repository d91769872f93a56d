"""The detection benchmark population (bench/detection.py)."""
