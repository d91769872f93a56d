"""The tool's version, at the bottom of the package: every stage that records it imports it from here,
never from the package root (whose API functions import the gate, which would make a circle)."""

__version__ = "0.1.0"
