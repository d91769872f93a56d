"""Which layer's features a scan reads (the value type, LayerChoice, is in sources/selection.py).

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

from amdet_gate.sources.selection import CONSUMER, LayerChoice


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
