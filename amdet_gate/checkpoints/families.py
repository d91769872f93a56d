"""The config a text encoder found in a checkpoint file is built with, and the check that it fits the tensors.

A single file carries no config.json. In order of preference:
  1. `--config FILE`: the user's config.json for this encoder (CLIPTextConfig, or a CLIPModel's
     text_config), validated like a folder's;
  2. a shipped config (amdet_gate/data/text-config-*.json: CLIP-L, OpenCLIP-H, bigG) whose sizes
     equal the tensors' (width, layers, MLP, positions, vocabulary, projection): the released
     models, whose heads and activation the tensors cannot tell;
  3. a config inferred from the shapes, for small or custom encoders: heads = width / 64 (true of
     every released CLIP text tower), quick_gelu (transformers' default, OpenAI's CLIP), unless an
     OpenCLIP file's open_clip_config.json says otherwise.
Whichever it is, every tensor must then have exactly the shape the config implies (`check_shapes`),
and the report says which config was used. The configs are the CLIP family's: it validates them, and
builds the module from them (encoders/clip.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from amdet_gate.checkpoints.tower import TowerMap
from amdet_gate.encoders.base import Pad
from amdet_gate.encoders.clip import CLIP, PROJECTION, SIZE_LIMITS
from amdet_gate.errors import LoadError, UnsupportedModel, UsageError
from amdet_gate.files import read_capped_text
from amdet_gate.sanitise import one_line
from amdet_gate.sources.selection import EncoderPart, Naming

FAMILY_FILES = ("clip-l", "openclip-h", "openclip-h-24", "openclip-bigg")
HEAD_WIDTH = 64
INFERRED_ACTIVATION = "quick_gelu"
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    pad: Pad
    projection_dim: int
    config: dict


@dataclass(frozen=True)
class ChosenConfig:
    """The validated sizes (as the CLIP family's `validate` gives them), where they came from, and the padding."""

    config: dict
    source: str  # "shipped", "inferred", "--config"
    family: str | None
    pad: Pad
    note: str  # one line for the report: which config, and why

    def describe(self) -> dict:
        return {"source": self.source, "family": self.family, "pad": self.pad.value, "note": self.note}


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    out = {}
    for name in FAMILY_FILES:
        raw = json.loads(resources.files("amdet_gate").joinpath(f"data/text-config-{name}.json").read_text("utf-8"))
        out[name] = Family(raw["family"], raw["title"], Pad(raw["pad"]), raw["projection_dim"], raw["config"])
    return out


@dataclass(frozen=True)
class Shapes:
    """The sizes a tower's tensors show."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    projection_dim: int | None

    @classmethod
    def of(cls, tower: TowerMap, file_name: str) -> Shapes:
        def dims(name: str, rank: int) -> tuple[int, ...]:
            shape = tower.shape(name)
            if shape is None:
                raise LoadError(f"{file_name}: {tower.part.name} has no {name}")
            if len(shape) != rank:
                raise LoadError(f"{file_name}: {tower.part.name}'s {name} has shape {list(shape)}, not {rank}-D")
            return shape

        vocab, width = dims("embeddings.token_embedding.weight", 2)
        positions, _ = dims("embeddings.position_embedding.weight", 2)
        intermediate, _ = dims("encoder.layers.0.mlp.fc1.weight", 2)
        projection = dims(PROJECTION, 2)[0] if tower.shape(PROJECTION) is not None else None
        return cls(vocab, width, intermediate, tower.layers, positions, projection)

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SIZE_LIMITS if k != "num_attention_heads"}  # heads: not in a shape


def choose_config(tower: TowerMap, file_name: str, user_config: Path | None = None,
                  open_clip_config: dict | None = None) -> ChosenConfig:
    """The config this encoder is built with (module docstring), validated; `check_shapes` checks it."""
    part = tower.part
    shapes = Shapes.of(tower, file_name)
    hinted = families().get(part.family) if part.family else None
    matched = next((f for f in families().values() if _fits(f, shapes)), None)
    pad = (hinted or matched).pad if (hinted or matched) else (Pad.ZERO if part.naming is Naming.OPEN_CLIP
                                                                 else Pad.EOS)
    if user_config is not None:
        raw = read_user_config(user_config)
        return ChosenConfig(CLIP.validate(raw, "--config"), "--config", None, pad,
                            f"config from --config {one_line(user_config.name, 80)}")
    if matched is not None:
        note = f"shipped {matched.name} config ({matched.title}), checked against the tensor shapes"
        return ChosenConfig(CLIP.validate(matched.config, f"the {matched.name} config"), "shipped", matched.name,
                            pad, note)
    raw, why = _inferred(shapes, part, file_name, open_clip_config)
    if hinted is not None:
        why += f"; the shapes are not {hinted.name}'s (width {shapes.hidden_size}, {shapes.num_hidden_layers} layers)"
    return ChosenConfig(CLIP.validate(raw, "the inferred config"), "inferred", None, pad, why)


def _fits(family: Family, shapes: Shapes) -> bool:
    sizes = shapes.sizes()
    return (all(family.config[k] == v for k, v in sizes.items())
            and shapes.projection_dim in (None, family.projection_dim))


def _inferred(shapes: Shapes, part: EncoderPart, file_name: str, open_clip_config: dict | None) -> tuple[dict, str]:
    width = shapes.hidden_size
    act, heads = INFERRED_ACTIVATION, None
    why = f"config inferred from the tensor shapes (heads = width / {HEAD_WIDTH}, {INFERRED_ACTIVATION})"
    if open_clip_config is not None:
        heads, act = open_clip_config.get("heads"), open_clip_config.get("hidden_act", act)
        why = f"config from the tensor shapes and open_clip_config.json (heads {heads}, {act})"
    if heads is None:
        if width % HEAD_WIDTH:
            raise UsageError(f"{file_name}: {part.name} is {width} wide, not a multiple of {HEAD_WIDTH}: its number of "
                             "attention heads cannot be inferred; pass --config with its config.json")
        heads = width // HEAD_WIDTH
    raw = {**shapes.sizes(), "num_attention_heads": heads, "hidden_act": act, "layer_norm_eps": 1e-5,
           "eos_token_id": 49407 if shapes.vocab_size == 49408 else shapes.vocab_size - 1}
    return raw, why


def read_user_config(path: Path) -> dict:
    """`--config`: a CLIPTextConfig config.json, or a CLIPModel's (its text_config is used)."""
    try:
        raw = json.loads(read_capped_text(path, MAX_CONFIG_BYTES, "--config", UsageError))
    except (json.JSONDecodeError, RecursionError):
        raise UsageError(f"--config {one_line(path)} is not valid JSON") from None
    if isinstance(raw, dict) and raw.get("model_type") == "clip" and isinstance(raw.get("text_config"), dict):
        raw = raw["text_config"]
    if not isinstance(raw, dict) or "auto_map" in raw:
        raise UsageError(f"--config {one_line(path)} is not a CLIP text config (a JSON object without auto_map)")
    return raw


def open_clip_text_config(path: Path) -> dict | None:
    """Heads and activation from an OpenCLIP checkpoint's open_clip_config.json beside it, if there is one."""
    candidate = path.parent / "open_clip_config.json"
    if not candidate.is_file():
        return None
    try:
        raw = json.loads(read_capped_text(candidate, MAX_CONFIG_BYTES, "open_clip_config.json", LoadError))
        model = raw["model_cfg"]
        text = model["text_cfg"]
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
        raise LoadError(f"{one_line(candidate)} is not an OpenCLIP config (model_cfg.text_cfg)") from None
    if not isinstance(text, dict) or text.get("hf_model_name"):
        raise UnsupportedModel(f"{one_line(candidate)} describes a Hugging Face text tower "
                               f"({one_line(text.get('hf_model_name'), 80) if isinstance(text, dict) else '?'}), "
                               "not a CLIP one")
    heads = text.get("heads", 8)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise LoadError(f"{one_line(candidate)}: text_cfg.heads is not a positive integer")
    return {"heads": heads, "hidden_act": "quick_gelu" if model.get("quick_gelu") is True else "gelu"}


def check_shapes(tower: TowerMap, chosen: ChosenConfig, file_name: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, with exactly its shape, and no other; the expected shapes."""
    expected = CLIP.expected_shapes(chosen.config)
    projection = tower.shape(PROJECTION)
    if projection is not None:
        expected[PROJECTION] = (projection[0], chosen.config["hidden_size"])
    where = {"--config": "--config", "shipped": f"the shipped {chosen.family} config"}.get(chosen.source,
                                                                                         "the inferred config")
    for name, source in sorted(tower.tensors.items()):
        if name not in expected:
            raise LoadError(f"{file_name}: {tower.part.name} has tensor {one_line(source.key, 100)} that {where} "
                            "has no place for")
        if source.shape != expected[name]:
            raise LoadError(f"{file_name}: {tower.part.name}'s {one_line(source.key, 100)} has shape "
                            f"{list(source.shape)} but {where} implies {list(expected[name])}")
    missing = sorted(set(expected) - set(tower.tensors))
    if missing:
        raise LoadError(f"{file_name}: {tower.part.name} lacks {len(missing)} tensors {where} implies, "
                        f"e.g. {missing[0]}")
    return expected
