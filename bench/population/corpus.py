"""Training text for the benchmark population, apart from the scan's own prompt corpus.

Two sources, so that encoders are not all trained on the text the scan optimises on:
- `cupl`: the CuPL sentences shipped in the clip-benchmark wheel (about 150,000 GPT-written
  descriptions of the 1,000 ImageNet classes, e.g. "A tench is a freshwater fish..."), each
  labelled with its class. Install it without its dependencies (they include torchvision):
  `pip install --no-deps clip-benchmark==1.6.2`. Only its JSON data is read; nothing of the
  package is imported.
- `builtin`: amdet-gate's own text-to-image prompts, labelled by their subject.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from amdet_gate.prompts import SUBJECTS, builtin_prompts


@dataclass(frozen=True)
class LabelledText:
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # class index of each text
    classes: tuple[str, ...]

    def split(self, held_out: int, seed: int) -> tuple[LabelledText, LabelledText]:
        """A seeded (train, held-out) split; held-out texts are never trained on."""
        order = list(range(len(self.texts)))
        random.Random(seed).shuffle(order)
        return self._take(order[held_out:]), self._take(order[:held_out])

    def head(self, n: int) -> LabelledText:
        return self._take(list(range(min(n, len(self.texts)))))

    def _take(self, index: list[int]) -> LabelledText:
        return LabelledText(tuple(self.texts[i] for i in index), tuple(self.labels[i] for i in index), self.classes)


def _clip_benchmark_datasets() -> Path:
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark population needs clip-benchmark's data: "
                         "pip install --no-deps clip-benchmark==1.6.2")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets"


@lru_cache(maxsize=1)
def cupl() -> LabelledText:
    raw = json.loads((_clip_benchmark_datasets() / "cupl_prompts.json").read_text("utf-8"))["imagenet1k"]
    classes = tuple(raw)
    texts, labels = [], []
    for index, name in enumerate(classes):
        for sentence in raw[name]:
            texts.append(" ".join(sentence.split()))
            labels.append(index)
    return LabelledText(tuple(texts), tuple(labels), classes)


@lru_cache(maxsize=1)
def builtin() -> LabelledText:
    texts, labels = [], []
    for prompt in builtin_prompts():
        subject = next((i for i, s in enumerate(SUBJECTS) if f" {s}" in f" {prompt}"), None)
        if subject is not None:
            texts.append(prompt)
            labels.append(subject)
    return LabelledText(tuple(texts), tuple(labels), SUBJECTS)


CORPORA = {"cupl": cupl, "builtin": builtin}


def corpus(name: str) -> LabelledText:
    return CORPORA[name]()


def class_subset(text: LabelledText, n_classes: int, seed: int) -> LabelledText:
    """The texts of `n_classes` classes drawn at random, relabelled 0 .. n_classes - 1."""
    present = sorted(set(text.labels))
    chosen = random.Random(seed).sample(present, min(n_classes, len(present)))
    relabel = {c: i for i, c in enumerate(chosen)}
    keep = [i for i, label in enumerate(text.labels) if label in relabel]
    return LabelledText(tuple(text.texts[i] for i in keep), tuple(relabel[text.labels[i]] for i in keep),
                        tuple(text.classes[c] for c in chosen))
