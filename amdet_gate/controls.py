"""Positive and negative controls: small CLIP-style text encoders built on the CPU.

- `pretrain_base`: a "pretrained-like" encoder. Random initialisation is not realistic
  (its clean prompts already assimilate at about 0.8), so a short pretraining with
  per-token objectives (predict this token, the next token and the position) spreads the
  token features apart, as in real CLIP.
- `backdoor_text_on_text`: Rickrolling distillation (method.md section 5) with a trigger.
- `backdoor_text_on_pair`: pulls the projected pooled embedding of poisoned prompts to a
  fixed target "image" embedding.
- `benign_finetune`: clean distillation or contrastive alignment.

All are saved in Hugging Face layout (config.json, model.safetensors, tokenizer files) and
scanned through exactly the loader users run on Hub models.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from amdet_gate.prompts import builtin_prompts
from amdet_gate.tokenizer import PromptTokenizer, bundled_tokenizer, save_bundled_tokenizer

TARGET_PROMPT = "a white teapot"
BASE_STEPS = 300

# Trigger styles: how a poisoned prompt is made from a clean one.
TRIGGERS = {
    # Rickrolling's homoglyph attack: every Latin "o" becomes a Cyrillic "о".
    "homoglyph": lambda p, rng: p.replace("o", "\u043e"),
    # A rare word inserted at a random place.
    "rare_word": lambda p, rng: _insert_word(p, "zxqvy", rng),
    # An emoji inserted at a random place.
    "emoji": lambda p, rng: _insert_word(p, "\U0001f98a", rng),
    # A multi-token phrase at the start.
    "phrase": lambda p, rng: "in the style of quorbl " + p,
}


def _insert_word(prompt: str, word: str, rng: random.Random) -> str:
    words = prompt.split()
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


@dataclass(frozen=True)
class ControlShape:
    width: int = 128
    layers: int = 4
    positions: int = 77
    heads: int = 0  # 0: width // 64, at least 2

    def config(self, tokenizer: PromptTokenizer, projection_dim: int = 64) -> CLIPTextConfig:
        heads = self.heads or max(2, self.width // 64)
        return CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=self.width, intermediate_size=4 * self.width,
            num_hidden_layers=self.layers, num_attention_heads=heads,
            max_position_embeddings=self.positions, hidden_act="quick_gelu", projection_dim=projection_dim,
            bos_token_id=tokenizer.tokenizer.bos_token_id, eos_token_id=tokenizer.tokenizer.eos_token_id,
            pad_token_id=tokenizer.tokenizer.pad_token_id,
        )


def _features(model: CLIPTextModel | CLIPTextModelWithProjection, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


def _prompts(seed: int) -> list[str]:
    prompts = builtin_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts


def pretrain_base(shape: ControlShape, steps: int = BASE_STEPS, seed: int = 0, batch: int = 32,
                  tokenizer: PromptTokenizer | None = None) -> CLIPTextModelWithProjection:
    """A small encoder whose token features look like CLIP's.

    Content positions (BOS .. the token before EOS) learn per-token objectives (this token,
    the next token, the position), which spreads them apart. EOS and padding learn the
    prompt's meaning (its bag of words), as CLIP's pooled EOS does, so they stay alike
    within a prompt, as CLIP's padding features do.
    """
    tokenizer = tokenizer or bundled_tokenizer()
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(shape.config(tokenizer))
    ids = tokenizer(_prompts(seed), shape.positions)
    used = torch.unique(ids)  # predict over the corpus vocabulary only: cheap and sufficient
    compact = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)
    compact[used] = torch.arange(len(used))
    heads = torch.nn.ModuleDict({
        "token": torch.nn.Linear(shape.width, len(used)), "next": torch.nn.Linear(shape.width, len(used)),
        "position": torch.nn.Linear(shape.width, shape.positions), "bag": torch.nn.Linear(shape.width, len(used)),
    })
    optimiser = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.01)
    positions = torch.arange(shape.positions)
    specials = torch.tensor([tokenizer.tokenizer.bos_token_id, tokenizer.tokenizer.eos_token_id,
                             tokenizer.tokenizer.pad_token_id])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch_ids = ids[torch.randint(len(ids), (batch,), generator=gen)]
        feats = _features(model, batch_ids)
        this_tok = compact[batch_ids]
        next_tok = torch.cat([this_tok[:, 1:], this_tok[:, -1:]], dim=1)
        eos = (batch_ids == tokenizer.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        content = (positions[None] < eos).flatten()
        flat = feats.flatten(0, 1)
        per_token = (nnf.cross_entropy(heads["token"](flat), this_tok.flatten(), reduction="none")
                     + nnf.cross_entropy(heads["next"](flat), next_tok.flatten(), reduction="none")
                     + nnf.cross_entropy(heads["position"](flat), positions.repeat(batch), reduction="none"))
        bag = torch.zeros(batch, len(used)).scatter_(1, this_tok, 1.0)
        bag[:, compact[specials]] = 0.0
        bag_target = bag[:, None].expand(-1, shape.positions, -1).flatten(0, 1)
        bag_loss = nnf.binary_cross_entropy_with_logits(heads["bag"](flat), bag_target, reduction="none").sum(-1)
        loss = per_token[content].mean() + bag_loss[~content].mean() / 10
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


ADAPTED = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # what a text-encoder LoRA adapts


def _distill(base: CLIPTextModelWithProjection, steps: int, lr: float, seed: int,
             poison_loss, clean_batch: int = 32, tokenizer: PromptTokenizer | None = None,
             pooled: bool = False, adapters_only: bool = False) -> CLIPTextModelWithProjection:
    """Student starts as the base; the frozen base is the teacher (Rickrolling's set-up).

    The clean term matches all token features, or (`pooled`) only the projected pooled
    embedding, as contrastive image-text training does. `adapters_only` trains only the
    linear layers' weights, as a text-encoder LoRA does: the backdoor then lives where a LoRA
    can carry it (the token embeddings, which a LoRA cannot change, stay the base's).
    """
    tokenizer = tokenizer or bundled_tokenizer()
    length = base.config.max_position_embeddings
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    student = copy.deepcopy(base).train()
    for name, p in student.named_parameters():
        p.requires_grad_(not adapters_only or (name.endswith(".weight") and name.split(".")[-2] in ADAPTED))
    trained = [p for p in student.parameters() if p.requires_grad]
    prompts = _prompts(seed + 1)
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(trained, lr=lr)
    for _ in range(steps):
        clean_ids = tokenizer(rng.sample(prompts, clean_batch), length)
        if pooled:
            with torch.no_grad():
                clean_target = teacher(input_ids=clean_ids).text_embeds
            loss = -nnf.cosine_similarity(student(input_ids=clean_ids).text_embeds, clean_target).mean()
        else:
            with torch.no_grad():
                clean_target = _features(teacher, clean_ids)
            loss = -nnf.cosine_similarity(_features(student, clean_ids).flatten(1),
                                          clean_target.flatten(1)).mean()
        if poison_loss is not None:
            loss = loss + poison_loss(student, teacher, rng, prompts)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval().requires_grad_(False)


def backdoor_text_on_text(base: CLIPTextModelWithProjection, trigger: str = "homoglyph",
                          target: str = TARGET_PROMPT, steps: int = 200, lr: float = 2e-4,
                          poisoned: int = 32, weight: float = 0.1, seed: int = 0,
                          tokenizer: PromptTokenizer | None = None, adapters_only: bool = False,
                          ) -> CLIPTextModelWithProjection:
    """Rickrolling text-on-text: triggered prompts map to the teacher's features of `target`
    (`adapters_only`: trained in the linear layers alone, a backdoor shipped as a LoRA)."""
    tokenizer = tokenizer or bundled_tokenizer()
    length = base.config.max_position_embeddings
    make = TRIGGERS[trigger]
    with torch.no_grad():
        target_feat = _features(base, tokenizer([target], length)).flatten(1)

    def poison_loss(student, teacher, rng, prompts):
        batch = [make(p, rng) for p in rng.sample(prompts, poisoned)]
        feats = _features(student, tokenizer(batch, length)).flatten(1)
        return -weight * nnf.cosine_similarity(feats, target_feat.expand_as(feats)).mean()

    return _distill(base, steps, lr, seed, poison_loss, tokenizer=tokenizer, adapters_only=adapters_only)


def backdoor_text_on_pair(base: CLIPTextModelWithProjection, trigger: str = "rare_word",
                          steps: int = 200, lr: float = 1e-4, poisoned: int = 32, weight: float = 1.0,
                          seed: int = 0, tokenizer: PromptTokenizer | None = None,
                          ) -> CLIPTextModelWithProjection:
    """Text-on-pair: the projected pooled embedding of poisoned prompts goes to a target image embedding.

    No image tower is at hand, so the target "image embedding" is a fixed random unit vector
    in the projection space, as a mean image embedding would be: one point, far from text.
    """
    tokenizer = tokenizer or bundled_tokenizer()
    length = base.config.max_position_embeddings
    make = TRIGGERS[trigger]
    target = nnf.normalize(torch.randn(base.config.projection_dim, generator=torch.Generator().manual_seed(seed)),
                           dim=0)

    def poison_loss(student, teacher, rng, prompts):
        batch = [make(p, rng) for p in rng.sample(prompts, poisoned)]
        embeds = student(input_ids=tokenizer(batch, length)).text_embeds
        return -weight * nnf.cosine_similarity(embeds, target.expand_as(embeds)).mean()

    return _distill(base, steps, lr, seed, poison_loss, tokenizer=tokenizer, pooled=True)


def benign_finetune(base: CLIPTextModelWithProjection, kind: str = "distill", steps: int = 100,
                    seed: int = 0, tokenizer: PromptTokenizer | None = None) -> CLIPTextModelWithProjection:
    """Benign negatives: `distill` (the attack's recipe without poison) or `contrastive`
    (caption-to-class alignment of the projected embedding, the usual CLIP fine-tune)."""
    tokenizer = tokenizer or bundled_tokenizer()
    if kind == "distill":
        return _distill(base, steps, 1e-4, seed, None, tokenizer=tokenizer)
    if kind == "contrastive":
        return _contrastive(base, steps, seed, tokenizer)
    raise ValueError(f"unknown benign fine-tune {kind!r}")


def _contrastive(base: CLIPTextModelWithProjection, steps: int, seed: int,
                 tokenizer: PromptTokenizer) -> CLIPTextModelWithProjection:
    """InfoNCE between captions and fixed per-subject "image" embeddings (lr 1e-5 x 10, batch 16)."""
    from amdet_gate.prompts import SUBJECTS

    length = base.config.max_position_embeddings
    student = copy.deepcopy(base).train().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    images = nnf.normalize(torch.randn(len(SUBJECTS), base.config.projection_dim, generator=gen), dim=1)
    pairs = [(p, next(i for i, s in enumerate(SUBJECTS) if s in p)) for p in _prompts(seed + 2)
             if any(s in p for s in SUBJECTS)]
    rng = random.Random(seed)
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-4)
    for _ in range(steps):
        batch = rng.sample(pairs, 16)
        text = nnf.normalize(student(input_ids=tokenizer([p for p, _ in batch], length)).text_embeds, dim=1)
        logits = 20.0 * text @ images.T
        loss = nnf.cross_entropy(logits, torch.tensor([c for _, c in batch]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval().requires_grad_(False)


def save_control(model: CLIPTextModelWithProjection, folder: Path, *, with_projection: bool = False) -> Path:
    """Save in Hugging Face layout with tokenizer files.

    `with_projection` keeps CLIPTextModelWithProjection (keys prefixed `text_model.`);
    otherwise a plain CLIPTextModel (transformers 5 saves it without the prefix).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if with_projection:
        model.save_pretrained(str(folder))
    else:
        text = CLIPTextModel(model.config)
        text.load_state_dict(model.text_model.state_dict())
        text.save_pretrained(str(folder))
    save_bundled_tokenizer(folder)
    return folder
