"""The reversed target: the pseudo-trigger's and the target's nearest tokens, and what the renderers drew."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amdet_gate.result.codec import omit


@dataclass(frozen=True, kw_only=True)
class NearToken:
    id: int
    token: str  # as in the vocabulary (byte-level BPE form); untrusted
    text: str  # decoded to text; untrusted
    cosine: float | None
    position: int | None = omit()  # in the triggered sequence (schema 1.2): 1..K the trigger, K+1.. the target


@dataclass(frozen=True)
class NearPrompt:
    prompt: str
    similarity: float | None


@dataclass(frozen=True)
class Image:
    """A rendered image of the reversed target, relative to the result's folder."""

    path: str
    caption: str
    renderer: str


@dataclass(frozen=True)
class RenderingRecord:
    renderer: str
    text: str
    notes: tuple[str, ...]
    metrics: dict[str, Any]  # renderer-specific numbers


@dataclass(frozen=True, kw_only=True)
class ReversedTarget:
    trigger_vectors: int | None = omit()  # K, the pseudo-trigger's vectors (schema 1.2)
    trigger_tokens: tuple[NearToken, ...]  # rank by rank: each vector's nearest, then each one's second, ...
    target_tokens: tuple[NearToken, ...]
    target_prompts: tuple[NearPrompt, ...] = ()
    # Filled in by the rendering step (gate._render_images); absent until it ran.
    render_error: str | None = omit()
    images: tuple[Image, ...] | None = omit()
    renderings: tuple[RenderingRecord, ...] | None = omit()
    notes: tuple[str, ...] | None = omit()
    metrics: dict[str, Any] | None = omit()

    @property
    def vectors(self) -> int:
        """K, the pseudo-trigger's vectors: 1 when absent (before schema 1.2) or implausible."""
        k = self.trigger_vectors
        return k if k is not None and 1 <= k <= 16 else 1
