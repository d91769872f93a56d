"""What the layouts share: how a tower of either naming shows itself in a header."""

from __future__ import annotations

from amdet_gate.checkpoints.parts import Keys

TRANSFORMERS_ROOTS = ("text_model.", "embeddings.", "encoder.", "final_layer_norm.")


def transformers_tower(keys: Keys, prefix: str) -> bool:
    """A CLIPTextModel under `prefix`: its token embedding, with or without `text_model.` (transformers 5
    saves CLIPTextModel without it; SD 1.x files and CLIPTextModelWithProjection carry it)."""
    return any(f"{prefix}{root}embeddings.token_embedding.weight" in keys for root in ("text_model.", ""))


def open_clip_tower(keys: Keys, prefix: str) -> bool:
    """An OpenCLIP text tower under `prefix`: token_embedding, positional_embedding, transformer.resblocks."""
    return (f"{prefix}token_embedding.weight" in keys and f"{prefix}positional_embedding" in keys
            and keys.any_under(f"{prefix}transformer.resblocks."))
