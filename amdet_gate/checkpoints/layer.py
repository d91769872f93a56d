"""Which layer's features a scan reads, and the adapter that reads it.

A Stable Diffusion pipeline does not always read a text encoder's last layer: SD 1.x reads the
last layer after the final LayerNorm (`last_hidden_state`), SDXL and SD 3 read
`hidden_states[-2]` (the penultimate layer's output, no final LayerNorm) plus the pooled
output, Flux reads only CLIP-L's pooled output, and SD 2.x reads OpenCLIP's penultimate block
through the final LayerNorm, which the conversion already gives as the last layer of a 23-block
tower (openclip.py). The scan reads the final features by default, whatever the consumer: a
collapse planted in an inner layer is a collapse of the final features too (every later layer
is a function of the collapsed states), and the pooled output that SDXL, SD 3 and Flux also
read comes from the final layer, so the final layer covers the consumer's reads, while the
penultimate layer misses a backdoor planted in the last block (`choose`). `--layer consumer`
reads exactly the consumer's layer; `--layer final|-N` names one.

Numbering is transformers': hidden_states[0] is the embeddings, hidden_states[-1] the last
layer's output before the final LayerNorm; "final" is last_hidden_state (after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amdet_gate.errors import UsageError

FINAL = "final"
CONSUMER = "consumer"


@dataclass(frozen=True)
class LayerChoice:
    """`index`: None for the final features (after the final LayerNorm), else a negative
    hidden_states index (-1 the last layer's output, -2 the penultimate's), never normed."""

    index: int | None = None
    chosen_by: str = "default"  # "default", "--layer", or the family whose consumer reads it
    consumer_reads: str | None = None  # the consumer's layer, when the default reads another

    @property
    def name(self) -> str:
        return FINAL if self.index is None else str(self.index)

    @classmethod
    def parse(cls, text: str | None) -> LayerChoice | None:
        """`--layer final|-1|-2|...`; None when not given (`consumer` is `choose`'s)."""
        if text is None:
            return None
        value = text.strip().lower()
        if value in (FINAL, "last"):
            return cls(None, "--layer")
        if not re.fullmatch(r"-\d{1,3}", value) or int(value) == 0:
            raise UsageError(f"--layer {text!r}: use final (after the final LayerNorm), consumer (the layer "
                             "the model's pipeline reads) or a negative hidden-states index such as -2")
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
                "final_layer_norm": self.index is None, "chosen_by": self.chosen_by,
                "consumer_reads": self.consumer_reads}


def choose(text: str | None, consumer: LayerChoice | None) -> LayerChoice:
    """The layer scanned for `--layer text` (None: not given) when the model's consumer reads
    `consumer` (None: unknown, the final features)."""
    consumer = consumer or LayerChoice()
    if text is not None and text.strip().lower() == CONSUMER:
        return consumer
    asked = LayerChoice.parse(text)
    if asked is not None:
        return asked
    if consumer.index is None:
        return consumer
    return LayerChoice(None, "default", consumer_reads=f"{consumer.name} ({consumer.chosen_by})")
