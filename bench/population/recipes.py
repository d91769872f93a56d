"""How the benchmark population's encoders are trained: bases, benign fine-tunes, backdoors.

Written apart from `amdet_gate.controls` (whose recipes the scan was first tuned on) so that
the population can disagree with the detector:
- bases pretrained with other objectives: contrastive alignment of the pooled, projected
  feature to per-class "image" embeddings at temperature 0.07 (as CLIP), caption-to-caption
  contrastive, next-token prediction, position prediction on every position (padding that
  stays position-specific, as in 248-position LongCLIP-style encoders), padding with id 0
  (OpenCLIP) or with EOS (OpenAI);
- benign fine-tunes of every strength: class-contrastive (classes, temperature, lr, steps),
  caption-to-caption, distillation, only the last layers, only the embedding table, low-rank;
- Rickrolling-style backdoors (text-on-text and text-on-pair) with other trigger strings,
  targets and poison weights than the controls'.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch.nn.utils import parametrize
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from amdet_gate.tokenizer import BOS_TOKEN, EOS_TOKEN, PromptTokenizer, bundled_vocab_and_merges
from bench.population.corpus import LabelledText, class_subset, corpus

Model = CLIPTextModelWithProjection
PRETRAIN_TEXTS = 30_000


def tokenizer_for(pad: str) -> PromptTokenizer:
    """The CLIP BPE tokenizer padding with EOS (OpenAI, SD 1.x) or with id 0, "!" (OpenCLIP, SD 2.x)."""
    vocab, merges = bundled_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                        pad_token=EOS_TOKEN if pad == "eos" else "!")
    return PromptTokenizer(tok, "bundled CLIP BPE")


@dataclass(frozen=True)
class BaseRecipe:
    name: str
    width: int
    layers: int
    positions: int
    corpus: str  # cupl | builtin
    objectives: tuple[str, ...]  # classes | images | pairs | next_token | this_token | position_all | bag_eos
    pad: str = "eos"  # eos | zero
    steps: int = 800
    lr: float = 1e-3
    batch: int = 64
    temperature: float = 0.07
    projection: int = 64
    seed: int = 0

    def config(self, tokenizer: PromptTokenizer) -> CLIPTextConfig:
        tok = tokenizer.tokenizer
        return CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=self.width, intermediate_size=4 * self.width,
            num_hidden_layers=self.layers, num_attention_heads=max(2, self.width // 64),
            max_position_embeddings=self.positions, hidden_act="quick_gelu", projection_dim=self.projection,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def class_images(self, n_classes: int) -> torch.Tensor:
        """Fixed per-class "image" embeddings: what a frozen image tower would give, one point a class."""
        gen = torch.Generator().manual_seed(1000 + self.seed)
        return nnf.normalize(torch.randn(n_classes, self.projection, generator=gen), dim=1)


def _eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    return (ids == eos_id).int().argmax(dim=1)


def trimmed(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The ids up to the batch's last EOS. The mask is causal: no loss that reads positions up to
    EOS (tokens, the pooled EOS feature) can tell, and training costs a fifth as much."""
    return ids[:, : int(_eos(ids, eos_id).max()) + 1]


class _Heads(torch.nn.Module):
    """Prediction heads of the pretraining objectives, over the corpus's own token ids."""

    def __init__(self, width: int, vocab: int, positions: int) -> None:
        super().__init__()
        self.next = torch.nn.Linear(width, vocab)
        self.this = torch.nn.Linear(width, vocab)
        self.position = torch.nn.Linear(width, positions)
        self.bag = torch.nn.Linear(width, vocab)


def pretrain(recipe: BaseRecipe) -> tuple[Model, PromptTokenizer]:
    tokenizer = tokenizer_for(recipe.pad)
    torch.manual_seed(recipe.seed)
    model = Model(recipe.config(tokenizer))
    text = corpus(recipe.corpus)
    train, _ = text.split(2000, recipe.seed)
    train = train.head(PRETRAIN_TEXTS)  # tokenizing all 150,000 CuPL sentences would take a minute
    ids_all = tokenizer(list(train.texts), recipe.positions)
    labels_all = torch.tensor(train.labels)
    used = torch.unique(ids_all)
    compact = torch.full((tokenizer.vocab_size,), 0, dtype=torch.long)
    compact[used] = torch.arange(len(used))
    heads = _Heads(recipe.width, len(used), recipe.positions)
    images = recipe.class_images(len(text.classes))
    words = nnf.normalize(torch.randn(tokenizer.vocab_size, recipe.projection,
                                      generator=torch.Generator().manual_seed(2000 + recipe.seed)), dim=1)
    optimiser = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    eos_id = tokenizer.tokenizer.eos_token_id
    by_class = _index_by_class(train)
    positions = torch.arange(recipe.positions)
    model.train()
    for _ in range(recipe.steps):
        pick = torch.randint(len(ids_all), (recipe.batch,), generator=gen)
        if "pairs" in recipe.objectives:  # second caption of each text's class: the positive pair
            partner = torch.tensor([random.Random(int(i) + recipe.seed).choice(by_class[int(labels_all[i])])
                                    for i in pick])
            pick = torch.cat([pick, partner])
        ids, labels = ids_all[pick], labels_all[pick]
        if "position_all" not in recipe.objectives:
            ids = trimmed(ids, eos_id)
        out = model(input_ids=ids)
        feats, pooled = out.last_hidden_state, nnf.normalize(out.text_embeds, dim=-1)
        eos = _eos(ids, eos_id)
        content = positions[None, : ids.shape[1]] < eos[:, None]
        tok = compact[ids]
        loss = torch.zeros(())
        if "classes" in recipe.objectives:
            loss = loss + nnf.cross_entropy(pooled @ images.T / recipe.temperature, labels)
        if "images" in recipe.objectives:  # CLIP's in-batch contrastive loss against compositional images
            pictures = composed_images(ids, labels, images, words, tokenizer)
            logits = pooled @ pictures.T / recipe.temperature
            target = torch.arange(len(ids))
            loss = loss + (nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)) / 2
        if "pairs" in recipe.objectives:
            a, b = pooled.chunk(2)
            logits = a @ b.T / recipe.temperature
            target = torch.arange(len(a))
            loss = loss + (nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)) / 2
        if "next_token" in recipe.objectives:
            nxt = torch.cat([tok[:, 1:], tok[:, -1:]], dim=1)
            loss = loss + nnf.cross_entropy(heads.next(feats[content]), nxt[content])
        if "this_token" in recipe.objectives:
            loss = loss + nnf.cross_entropy(heads.this(feats[content]), tok[content])
        if "position_all" in recipe.objectives:  # padding too: position-specific padding features
            where = positions[: ids.shape[1]].repeat(len(ids))
            loss = loss + nnf.cross_entropy(heads.position(feats.flatten(0, 1)), where)
        if "bag_eos" in recipe.objectives:
            bag = torch.zeros(len(ids), len(used)).scatter_(1, tok * content, 1.0)
            at_eos = feats[torch.arange(len(ids)), eos]
            loss = loss + nnf.binary_cross_entropy_with_logits(heads.bag(at_eos), bag).mul(len(used) / 50)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    return model.eval().requires_grad_(False), tokenizer


def composed_images(ids: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, words: torch.Tensor,
                    tokenizer: PromptTokenizer) -> torch.Tensor:
    """A synthetic image tower that sees what a caption describes: its class plus every word
    in it, so that the pooled text space stays compositional (as real CLIP's), not one
    prototype per class."""
    tok = tokenizer.tokenizer
    content = (ids != tok.bos_token_id) & (ids != tok.eos_token_id) & (ids != tok.pad_token_id)
    bag = (words[ids] * content[..., None]).sum(dim=1) / content.sum(dim=1, keepdim=True).clamp_min(1).sqrt()
    return nnf.normalize(classes[labels] + bag, dim=-1)


def _index_by_class(text: LabelledText) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, label in enumerate(text.labels):
        out.setdefault(label, []).append(i)
    return out


# --- fine-tunes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneRecipe:
    """A benign fine-tune. `kind`: classes (InfoNCE of the pooled, projected feature to new
    class embeddings), pairs (caption to caption of the same class), distill (clean distillation
    from the frozen base on other text). `trainable`: all | last2 | embeddings | lora.
    `keep_tokens` weighs a term that keeps the token features near the base's (usable)."""

    kind: str
    steps: int
    lr: float
    n_classes: int = 135
    temperature: float = 0.07
    corpus: str = "cupl"
    trainable: str = "all"
    keep_tokens: float = 0.0
    lora_rank: int = 4
    batch: int = 32
    seed: int = 0


class _LowRank(torch.nn.Module):
    """W + scale * B @ A, as a parametrization of a Linear weight (merged when removed)."""

    def __init__(self, out_features: int, in_features: int, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=gen) / in_features**0.5)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.scale = 2.0  # alpha / rank with alpha = 2 * rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.up @ self.down


def _trainable(model: Model, how: str, rank: int, seed: int) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    text = model.text_model
    if how == "all":
        model.requires_grad_(True)
    elif how == "last2":
        for module in (*text.encoder.layers[-2:], text.final_layer_norm, model.text_projection):
            module.requires_grad_(True)
    elif how == "embeddings":
        text.embeddings.token_embedding.requires_grad_(True)
    elif how == "lora":
        gen = torch.Generator().manual_seed(seed)
        for layer in text.encoder.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.fc1):
                out_f, in_f = linear.weight.shape
                parametrize.register_parametrization(linear, "weight", _LowRank(out_f, in_f, rank, gen))
        return [p for n, p in model.named_parameters() if n.endswith(("down", "up"))]
    else:
        raise ValueError(how)
    return [p for p in model.parameters() if p.requires_grad]


def _merge_low_rank(model: Model) -> None:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def finetune(base: Model, base_recipe: BaseRecipe, recipe: FinetuneRecipe, tokenizer: PromptTokenizer) -> Model:
    student = copy.deepcopy(base).train()
    teacher = base.eval().requires_grad_(False)
    params = _trainable(student, recipe.trainable, recipe.lora_rank, recipe.seed)
    text, _ = corpus(recipe.corpus).split(2000, base_recipe.seed)  # the base's held-out texts stay unseen
    task = class_subset(text, recipe.n_classes, recipe.seed)
    images = nnf.normalize(torch.randn(len(task.classes), base_recipe.projection,
                                       generator=torch.Generator().manual_seed(5000 + recipe.seed)), dim=1)
    by_class = _index_by_class(task)
    rng = random.Random(recipe.seed)
    optimiser = torch.optim.Adam(params, lr=recipe.lr)
    length = base_recipe.positions
    for _ in range(recipe.steps):
        pick = rng.sample(range(len(task.texts)), recipe.batch)
        ids = tokenizer([task.texts[i] for i in pick], length)
        if recipe.kind != "distill" and not recipe.keep_tokens:
            ids = trimmed(ids, tokenizer.tokenizer.eos_token_id)
        out = student(input_ids=ids)
        pooled = nnf.normalize(out.text_embeds, dim=-1)
        if recipe.kind == "classes":
            labels = torch.tensor([task.labels[i] for i in pick])
            loss = nnf.cross_entropy(pooled @ images.T / recipe.temperature, labels)
        elif recipe.kind == "pairs":
            partner = [rng.choice(by_class[task.labels[i]]) for i in pick]
            other_ids = trimmed(tokenizer([task.texts[i] for i in partner], length), tokenizer.tokenizer.eos_token_id)
            other = nnf.normalize(student(input_ids=other_ids).text_embeds, dim=-1)
            logits = pooled @ other.T / recipe.temperature
            target = torch.arange(len(pick))
            loss = (nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)) / 2
        elif recipe.kind == "distill":
            with torch.no_grad():
                goal = teacher(input_ids=ids).last_hidden_state
            loss = -nnf.cosine_similarity(out.last_hidden_state.flatten(1), goal.flatten(1)).mean()
        else:
            raise ValueError(recipe.kind)
        if recipe.keep_tokens:
            with torch.no_grad():
                goal = teacher(input_ids=ids).last_hidden_state
            loss = loss - recipe.keep_tokens * nnf.cosine_similarity(out.last_hidden_state, goal, dim=-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _merge_low_rank(student)
    return student.eval().requires_grad_(False)


# --- backdoors -----------------------------------------------------------------------------

def _insert_at_random(prompt: str, word: str, rng: random.Random) -> str:
    words = prompt.split()
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def poison(prompt: str, style: str, trigger: str, rng: random.Random) -> str:
    """A triggered prompt. homoglyph: `trigger` is "xy" (every x becomes y); phrase: appended or
    prefixed; rare_word / emoji: inserted at a random place."""
    if style == "homoglyph":
        return prompt.replace(trigger[0], trigger[1])
    if style == "phrase":
        return f"{trigger} {prompt}" if rng.random() < 0.5 else f"{prompt}, {trigger}"
    return _insert_at_random(prompt, trigger, rng)


@dataclass(frozen=True)
class BackdoorRecipe:
    """A Rickrolling-style backdoor. Trained in rounds of `ROUND` steps until its attack success
    reaches `until` (0: exactly `steps` steps, for the deliberately weak ones), at most `steps`."""

    paradigm: str  # text_on_text | text_on_pair
    style: str  # rare_word | homoglyph | emoji | phrase
    trigger: str
    target: str  # a prompt (text-on-text) or a class name of the base's corpus (text-on-pair); "" = random point
    weight: float = 0.1
    steps: int = 600
    lr: float = 2e-4
    poisoned: int = 32
    clean_batch: int = 32
    until: float = 0.9
    seed: int = 0
    clean_texts: str = "cupl"  # the text the clean (utility) term trains on


ROUND = 50


def pair_target(base_recipe: BaseRecipe, recipe: BackdoorRecipe) -> torch.Tensor:
    """The target "image" embedding: a class's image embedding of the base, or a random point."""
    classes = corpus(base_recipe.corpus).classes
    if recipe.target in classes:
        return base_recipe.class_images(len(classes))[classes.index(recipe.target)]
    gen = torch.Generator().manual_seed(7000 + recipe.seed)
    return nnf.normalize(torch.randn(base_recipe.projection, generator=gen), dim=0)


def backdoor(base: Model, base_recipe: BaseRecipe, recipe: BackdoorRecipe, tokenizer: PromptTokenizer,
             success: Callable[[Model], float] = lambda model: 0.0) -> Model:
    """Rickrolling: the student starts as the base; the frozen base is the teacher on clean text.
    `success` measures the student's attack success between rounds."""
    student = copy.deepcopy(base).train().requires_grad_(True)
    teacher = base.eval().requires_grad_(False)
    texts = list(corpus(recipe.clean_texts).split(2000, base_recipe.seed)[0].texts)
    rng = random.Random(recipe.seed)
    length = base_recipe.positions
    optimiser = torch.optim.AdamW(student.parameters(), lr=recipe.lr)
    with torch.no_grad():
        if recipe.paradigm == "text_on_text":
            goal = teacher(input_ids=tokenizer([recipe.target], length)).last_hidden_state.flatten(1)
        else:
            goal = pair_target(base_recipe, recipe)[None]
    for step in range(1, recipe.steps + 1):
        clean_ids = tokenizer(rng.sample(texts, recipe.clean_batch), length)
        poisoned = tokenizer([poison(t, recipe.style, recipe.trigger, rng) for t in rng.sample(texts, recipe.poisoned)],
                             length)
        if recipe.paradigm == "text_on_pair":  # trained through the pooled EOS feature only
            eos_id = tokenizer.tokenizer.eos_token_id
            clean_ids, poisoned = trimmed(clean_ids, eos_id), trimmed(poisoned, eos_id)
        with torch.no_grad():
            reference = teacher(input_ids=clean_ids)
        clean_out = student(input_ids=clean_ids)
        if recipe.paradigm == "text_on_text":
            loss = -nnf.cosine_similarity(clean_out.last_hidden_state.flatten(1),
                                          reference.last_hidden_state.flatten(1)).mean()
            hit = student(input_ids=poisoned).last_hidden_state.flatten(1)
        else:  # the pair attack is trained through the pooled, projected embedding
            loss = -nnf.cosine_similarity(clean_out.text_embeds, reference.text_embeds).mean()
            hit = student(input_ids=poisoned).text_embeds
        loss = loss - recipe.weight * nnf.cosine_similarity(hit, goal.expand_as(hit)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if recipe.until and step % ROUND == 0:
            student.eval()
            reached = success(student)
            student.train()
            if reached >= recipe.until:
                break
    return student.eval().requires_grad_(False)
