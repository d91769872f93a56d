"""The CLIP text-encoder family: CLIPTextModel, CLIPTextModelWithProjection and a CLIPModel's text tower
(OpenAI CLIP, OpenCLIP converted to transformers' names, the Stable Diffusion text encoders).

`CLIP` is the family (encoders/base.py's EncoderFamily); `ClipTextAdapter` is what the scan sees of a
loaded CLIP text tower: embed ids, run the causal layers, the final LayerNorm, pool at the first EOS.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from amdet_gate.encoders.base import AdapterTraits, Pad, Pooling
from amdet_gate.encoders.tensors import TOWER_LIMITS, check_parameter_budget, read_tensors, validate_transformer_config
from amdet_gate.errors import LoadError
from amdet_gate.sources.selection import LayerChoice
from amdet_gate.tokenizer import PromptTokenizer, load_tokenizer

# config.json key -> (allowed range); anything outside is refused before building tensors.
SIZE_LIMITS = {"vocab_size": (2, 1_000_000), **TOWER_LIMITS, "max_position_embeddings": (4, 8_192)}
# The projection a tower may carry, by the name CLIPTextModelWithProjection gives it.
PROJECTION = "text_projection.weight"
TEXT_PREFIX = "text_model."  # CLIPTextModelWithProjection, CLIPModel and SD 1.x encoders carry it
TOWER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")  # CLIPTextModel's own top-level modules
BUFFER = "position_ids"  # embeddings.position_ids is a buffer, not a weight: rebuilt at load
DEFAULT_EOS = 49407  # <|endoftext|> of the CLIP BPE vocabulary
PAD_ZERO_TOKEN = "!"  # id 0 of the CLIP BPE vocabulary, what OpenCLIP pads with
TRAITS = AdapterTraits(causal=True, trigger_slot=1, pooling=Pooling.FIRST_EOS)


class ClipTextAdapter:
    """A CLIP text tower as the scan sees it, reading the final features (after the final LayerNorm)
    or, with a `layer`, hidden_states[index] without the final LayerNorm, as SDXL reads.

    Both search paths read these features. The pooled path then measures the chosen layer's EOS
    feature; text_projection was trained on the final features only, so it is kept for the final
    layer and dropped for an inner one (a projection of unnormed inner features would be a map
    nothing downstream reads).
    """

    traits = TRAITS

    def __init__(self, model: CLIPTextModel, eos_token_id: int, projection: torch.Tensor | None = None,
                 layer: LayerChoice | None = None) -> None:
        layer = layer or LayerChoice()
        layer.check(model.config.num_hidden_layers)
        self.model = model.eval().requires_grad_(False)
        self.hidden_size = model.config.hidden_size
        self.seq_len = model.config.max_position_embeddings
        self.eos_token_id = eos_token_id
        self.layer = layer
        self.layers_run = layer.layers_run(model.config.num_hidden_layers)
        # text_projection (projection_dim, d) when the checkpoint has one: what SDXL's pooled
        # conditioning and image-text retrieval read, so the pooled path measures after it.
        self.projection = projection if layer.index is None else None

    def at_layer(self, layer: LayerChoice) -> ClipTextAdapter:
        """The same tower read at `layer` (the projection as `layer` allows)."""
        return ClipTextAdapter(self.model, self.eos_token_id, self.projection, layer)

    @property
    def device(self) -> torch.device:
        return self.model.final_layer_norm.weight.device

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.model.embeddings.token_embedding.weight

    @property
    def position_embedding(self) -> torch.Tensor:
        return self.model.embeddings.position_embedding.weight

    def to(self, device: torch.device | str) -> ClipTextAdapter:
        self.model.to(device)
        if self.projection is not None:
            self.projection = self.projection.to(device)
        return self

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (..., d) in the space downstream models read: after text_projection if any."""
        return pooled if self.projection is None else pooled @ self.projection.T

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings H = token + position embedding, (B, L, d)."""
        emb = self.model.embeddings
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return emb.token_embedding(input_ids) + emb.position_embedding(positions)

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Transformer layers (causal) on embeddings (..., L, d), and the final LayerNorm for the final layer."""
        if self.layer.index is None:
            return self.model.final_layer_norm(self.residual(hidden))
        return self.residual(hidden, self.layers_run)

    def residual(self, hidden: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """The residual stream after the first `layers` layers (all by default), before the final
        LayerNorm, (..., L, d). `repair` traces one layer without running the ones after it."""
        lead, (length, width) = hidden.shape[:-2], hidden.shape[-2:]
        h = hidden.reshape(-1, length, width)
        mask = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype)
        mask = torch.triu(mask, diagonal=1)[None, None]
        for layer in self.model.encoder.layers[:layers]:
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
        return h.reshape(*lead, length, width)

    def pooled(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The EOS token's feature, as CLIP pools (first EOS position), projected when the model projects."""
        eos = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return self.project(features[torch.arange(features.shape[0]), eos])


class ClipTextFamily:
    """CLIP text encoders: the family's config, limits, key names, module and tokenizer."""

    name = "clip"
    title = "CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection, CLIPModel)"
    traits = TRAITS

    def matches(self, config: Mapping) -> bool:
        return config.get("model_type") in ("clip", "clip_text_model")

    def text_config(self, config: Mapping) -> Mapping:
        if config.get("model_type") != "clip":
            return config
        text = config.get("text_config")  # a full CLIPModel: its text tower
        if not isinstance(text, dict):
            raise LoadError("CLIPModel config.json has no text_config object")
        return text

    def validate(self, raw: Mapping, where: str) -> dict:
        """The sizes and the parameter budget; an eos_token_id outside the vocabulary becomes its last id."""
        cfg = validate_transformer_config(raw, SIZE_LIMITS, CLIPTextConfig(), where)
        eos = raw.get("eos_token_id", DEFAULT_EOS)
        cfg["eos_token_id"] = eos if isinstance(eos, int) and 0 <= eos < cfg["vocab_size"] else cfg["vocab_size"] - 1
        d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        check_parameter_budget((cfg["vocab_size"] + cfg["max_position_embeddings"]) * d + n * (4 * d * d + 2 * d * f),
                               where)
        return cfg

    def module_key(self, key: str) -> str | None:
        """CLIPTextModel's own name for a checkpoint key, or None if it is not the text tower.

        transformers 5 saves CLIPTextModel without a prefix; CLIPTextModelWithProjection,
        CLIPModel and Stable Diffusion 1.x text encoders carry `text_model.`.
        """
        if key.startswith(TEXT_PREFIX):
            key = key[len(TEXT_PREFIX):]
        if key.startswith(TOWER_ROOTS):
            return None if key.endswith(BUFFER) else key
        return None

    def hf_config(self, cfg: dict) -> CLIPTextConfig:
        config = CLIPTextConfig(**{k: cfg[k] for k in (*SIZE_LIMITS, "hidden_act", "layer_norm_eps", "eos_token_id")})
        config._attn_implementation = "sdpa"
        return config

    def expected_shapes(self, cfg: dict) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = CLIPTextModel(self.hf_config(cfg))
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(BUFFER)}

    def build(self, cfg: dict, tensors: dict[str, torch.Tensor]) -> CLIPTextModel:
        """The module on the meta device, given the tensors (their set was checked against expected_shapes)."""
        with torch.device("meta"):
            model = CLIPTextModel(self.hf_config(cfg))
        model.load_state_dict({k: v for k, v in tensors.items() if k != PROJECTION}, strict=False, assign=True)
        model.embeddings.position_ids = torch.arange(cfg["max_position_embeddings"]).expand((1, -1))
        return model

    def read_projection(self, files: list[Path], cfg: dict) -> torch.Tensor | None:
        """`text_projection.weight` (projection_dim, width) when a checkpoint has it
        (CLIPTextModelWithProjection, CLIPModel), else None."""
        tensors = read_tensors(files, {PROJECTION: (-1, cfg["hidden_size"])},
                               key_map=lambda key: key if key == PROJECTION else None,
                               what="projection", optional=frozenset({PROJECTION}))
        return tensors.get(PROJECTION)

    def adapter(self, module: torch.nn.Module, cfg: dict, projection: torch.Tensor | None,
                layer: LayerChoice | None = None) -> ClipTextAdapter:
        return ClipTextAdapter(module, cfg["eos_token_id"], projection, layer)

    def tokenizer(self, folder: Path | None, pad: Pad | None = None) -> PromptTokenizer:
        """The folder's CLIP tokenizer, else the bundled CLIP BPE, padded with id 0 for an OpenCLIP-trained tower."""
        tokenizer = load_tokenizer(folder)
        if folder is None and pad is Pad.ZERO:
            tokenizer.tokenizer.pad_token = PAD_ZERO_TOKEN
            tokenizer.source += " (padded with id 0, as OpenCLIP)"
        return tokenizer


CLIP = ClipTextFamily()
