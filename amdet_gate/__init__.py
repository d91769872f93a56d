"""amdet-gate: a supply-chain gate that finds injected backdoors in CLIP-style text encoders."""

__version__ = "0.1.0"
