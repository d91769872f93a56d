"""Which layer's features a scan reads, and the adapter that reads it.

A Stable Diffusion pipeline does not always read a text encoder's last layer: SD 1.x reads the
last layer after the final LayerNorm (`last_hidden_state`), SDXL and SD 3 read
`hidden_states[-2]` (the penultimate layer's output, no final LayerNorm) plus the pooled
output, Flux reads only CLIP-L's pooled output, and SD 2.x reads OpenCLIP's penultimate block
through the final LayerNorm, which the conversion already gives as the last layer of a 23-block
tower (openclip.py). A backdoor is trained on what the consumer reads, so the scan reads the
consumer's layer by default (`LayerChoice.default_for`); `--layer` overrides it.

Numbering is transformers': hidden_states[0] is the embeddings, hidden_states[-1] the last
layer's output before the final LayerNorm; "final" is last_hidden_state (after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amdet_gate.errors import UsageError

FINAL = "final"


@dataclass(frozen=True)
class LayerChoice:
    """`index`: None for the final features (after the final LayerNorm), else a negative
    hidden_states index (-1 the last layer's output, -2 the penultimate's), never normed."""

    index: int | None = None
    chosen_by: str = "default"  # "default", "--layer", or the family whose consumer reads it

    @property
    def name(self) -> str:
        return FINAL if self.index is None else str(self.index)

    @classmethod
    def parse(cls, text: str | None) -> LayerChoice | None:
        """`--layer final|-1|-2|...`; None when not given."""
        if text is None:
            return None
        value = text.strip().lower()
        if value in (FINAL, "last"):
            return cls(None, "--layer")
        if not re.fullmatch(r"-\d{1,3}", value) or int(value) == 0:
            raise UsageError(f"--layer {text!r}: use final (after the final LayerNorm) or a negative "
                             "hidden-states index such as -2 (the penultimate layer)")
        return cls(int(value), "--layer")

    def check(self, layers: int) -> None:
        """The index must name a layer's output (-1 .. -layers; -layers-1 would be the embeddings)."""
        if self.index is not None and -self.index > layers:
            raise UsageError(f"--layer {self.index}: the encoder has {layers} layers (use -1 .. -{layers} "
                             "or final)")

    def layers_run(self, layers: int) -> int:
        """How many transformer layers produce the features read."""
        return layers if self.index is None else layers + 1 + self.index

    def describe(self, layers: int) -> dict:
        """What result.json records: which features were scanned, and why."""
        return {"scanned": self.name, "layers_run": self.layers_run(layers), "of_layers": layers,
                "final_layer_norm": self.index is None, "chosen_by": self.chosen_by}
