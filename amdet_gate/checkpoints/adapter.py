"""The scan's view of an encoder that reads another layer than the final one (layer.py)."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel

from amdet_gate.encoder import TextEncoderAdapter
from amdet_gate.sources.selection import LayerChoice


class LayerAdapter(TextEncoderAdapter):
    """`encode` returns the chosen layer's features: the final ones (after the final LayerNorm,
    as TextEncoderAdapter), or hidden_states[index] without the final LayerNorm, as SDXL reads.

    Both search paths read these features. The pooled path then measures the chosen layer's EOS
    feature; text_projection was trained on the final features only, so it is kept for the
    final layer and dropped for an inner one (a projection of unnormed inner features would be
    a map nothing downstream reads).
    """

    def __init__(self, model: CLIPTextModel, eos_token_id: int, projection: torch.Tensor | None,
                 layer: LayerChoice) -> None:
        layer.check(model.config.num_hidden_layers)
        super().__init__(model, eos_token_id, projection if layer.index is None else None)
        self.layer = layer
        self.layers_run = layer.layers_run(model.config.num_hidden_layers)

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.layer.index is None:
            return super().encode(hidden)
        lead, (length, width) = hidden.shape[:-2], hidden.shape[-2:]
        h = hidden.reshape(-1, length, width)
        mask = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype)
        mask = torch.triu(mask, diagonal=1)[None, None]
        for layer in self.model.encoder.layers[: self.layers_run]:
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
        return h.reshape(*lead, length, width)
