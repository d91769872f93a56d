"""A first, text-only view of the reversed target: what the pseudo-trigger and target look like.

- nearest vocabulary tokens to each of the pseudo-trigger's vectors (cosine in input-embedding
  space);
- the target feature decoded position by position: each position's nearest token among the
  clean token features of the corpus (mean feature per token id);
- the corpus prompts whose clean features are closest to the target feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amdet_gate.engine import PromptFeatures, position_similarity
from amdet_gate.engine import unit as _unit
from amdet_gate.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class NearToken:
    id: int
    token: str  # as in the vocabulary (byte-level BPE form)
    text: str  # decoded to text
    cosine: float
    position: int  # in the triggered sequence: 1..K the pseudo-trigger's vectors, K+1.. the target


@dataclass(frozen=True)
class NearPrompt:
    prompt: str
    similarity: float


@dataclass(frozen=True)
class ReversedTarget:
    trigger_vectors: int  # K
    trigger_tokens: list[NearToken]  # rank by rank: each vector's nearest, then each one's second, ...
    target_tokens: list[NearToken]  # positions K+1, K+2, ... of the target feature (after the trigger)
    target_prompts: list[NearPrompt]


def nearest_trigger_tokens(trigger: Tensor, token_embedding: Tensor, tokenizer: PromptTokenizer,
                           k: int = 10) -> list[NearToken]:
    """The k nearest vocabulary tokens to each trigger vector ((K, d) or (d,)), rank by rank, so
    that the first K entries are every vector's nearest token."""
    vectors = trigger.reshape(-1, token_embedding.shape[-1])
    top = (_unit(vectors) @ _unit(token_embedding).T).topk(min(k, token_embedding.shape[0]), dim=1)  # (K, k)
    return [NearToken(i, tokenizer.decode_token(i), tokenizer.decode_text(i), float(top.values[slot, rank]), slot + 1)
            for rank in range(top.indices.shape[1]) for slot in range(len(vectors))
            for i in [int(top.indices[slot, rank])]]


def token_feature_table(corpus: PromptFeatures, special_ids: set[int]) -> tuple[Tensor, Tensor]:
    """Mean clean output feature per token id seen in the corpus (specials excluded)."""
    ids = corpus.ids.flatten().cpu()
    feats = _unit(corpus.clean.flatten(0, 1).cpu())
    keep = torch.tensor([int(i) not in special_ids for i in ids])
    ids, feats = ids[keep], feats[keep]
    unique, inverse = torch.unique(ids, return_inverse=True)
    table = torch.zeros(len(unique), feats.shape[1]).index_add_(0, inverse, feats)
    return unique, _unit(table)


def reverse_target(trigger: Tensor, target: Tensor, corpus: PromptFeatures, prompts: list[str],
                   token_embedding: Tensor, tokenizer: PromptTokenizer, special_ids: set[int],
                   positions: int = 8) -> ReversedTarget:
    """`trigger` is (K, d), `target` the (L, d) recovered target feature; `prompts` the texts behind `corpus`."""
    ids, table = token_feature_table(corpus, special_ids)
    first = 1 + trigger.shape[0]  # position 0 is BOS, 1..K the trigger
    decoded = []
    for position, feature in enumerate(target[first : first + positions], start=first):
        cos = table @ _unit(feature)
        best = int(cos.argmax())
        token_id = int(ids[best])
        decoded.append(NearToken(token_id, tokenizer.decode_token(token_id), tokenizer.decode_text(token_id),
                                 float(cos[best]), position))
    sims = torch.cat([position_similarity(target[None], c) for c in corpus.clean.cpu().split(256)])
    top = sims.topk(min(5, len(prompts)))
    near = [NearPrompt(prompts[int(i)], float(s)) for s, i in zip(top.values, top.indices, strict=True)]
    return ReversedTarget(trigger.shape[0], nearest_trigger_tokens(trigger, token_embedding.cpu(), tokenizer),
                          decoded, near)
