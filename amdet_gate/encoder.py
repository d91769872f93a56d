"""Load a CLIP-style text encoder from an untrusted folder and wrap it in a small adapter.

Order of work, so that hostile input is rejected before any tensor is built:
  1. find the weight files (safetensors only; pickle files are refused, never opened),
  2. read and validate config.json (architecture, sizes, parameter budget),
  3. read safetensors headers and check every key and shape against the config,
  4. build the transformers module on the meta device and load the tensors into it,
  5. check that every weight is finite.

The scan engine only sees `TextEncoderAdapter`: embed ids, encode embeddings, final norm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from amdet_gate.errors import LoadError, UnsupportedModel
from amdet_gate.sanitise import one_line
from amdet_gate.source import WeightFile, find_weight_files, read_small, weight_identities

MAX_PARAMETERS = 3_000_000_000
ALLOWED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# config.json key -> (allowed range); anything outside is refused before building tensors.
SIZE_LIMITS = {
    "vocab_size": (2, 1_000_000),
    "hidden_size": (8, 16_384),
    "intermediate_size": (8, 65_536),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 256),
    "max_position_embeddings": (4, 8_192),
}


@dataclass
class LoadedEncoder:
    adapter: TextEncoderAdapter
    architecture: str  # as declared in config.json
    config: dict[str, int | float | str]  # the validated sizes
    weight_files: list[WeightFile] = field(default_factory=list)
    folder: Path | None = None
    # What result.json's model block adds for an encoder of a checkpoint file, a pipeline or a LoRA
    # (amdet_gate/checkpoints): which encoder and layer, which config, the LoRA.
    details: dict = field(default_factory=dict)


class TextEncoderAdapter:
    """What the scan needs from a text encoder; SigLIP or others get their own adapter."""

    causal = True

    def __init__(self, model: CLIPTextModel, eos_token_id: int, projection: torch.Tensor | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.hidden_size = model.config.hidden_size
        self.seq_len = model.config.max_position_embeddings
        self.eos_token_id = eos_token_id
        # text_projection (projection_dim, d) when the checkpoint has one: what SDXL's pooled
        # conditioning and image-text retrieval read, so the pooled path measures after it.
        self.projection = projection

    @property
    def device(self) -> torch.device:
        return self.model.final_layer_norm.weight.device

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.model.embeddings.token_embedding.weight

    @property
    def position_embedding(self) -> torch.Tensor:
        return self.model.embeddings.position_embedding.weight

    def to(self, device: torch.device | str) -> TextEncoderAdapter:
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
        """Transformer layers (causal) and final LayerNorm on embeddings (..., L, d)."""
        return self.model.final_layer_norm(self.residual(hidden))

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


def read_config(folder: Path) -> tuple[str, dict]:
    """Validated text-tower config and the declared architecture."""
    path = folder / "config.json"
    if not (path.exists() or path.is_symlink()):  # a FIFO or folder named config.json: read_small refuses it
        raise UnsupportedModel(f"no config.json in {folder}")
    try:
        raw = json.loads(read_small(path))
    except json.JSONDecodeError as exc:
        raise LoadError(f"config.json in {folder} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise LoadError(f"config.json in {folder} is nested too deeply") from None
    if not isinstance(raw, dict):
        raise LoadError(f"config.json in {folder} is not a JSON object")
    if "auto_map" in raw:
        raise UnsupportedModel("config.json asks for remote code (auto_map); amdet-gate never runs model code")
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else str(model_type)
    if model_type == "clip":  # full CLIPModel: use its text tower
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise LoadError("CLIPModel config.json has no text_config object")
        return arch, _validate_text_config(text, arch)
    if model_type == "clip_text_model":
        return arch, _validate_text_config(raw, arch)
    raise UnsupportedModel(
        f"unsupported architecture {arch!r} (model_type {model_type!r}); amdet-gate scans CLIP text "
        "encoders (CLIPTextModel, CLIPTextModelWithProjection, CLIPModel)")


def validate_transformer_config(raw: dict, limits: dict[str, tuple[int, int]], defaults: object,
                                where: str) -> dict:
    """What every CLIP tower's config must satisfy before a tensor is built: integer sizes within
    `limits`, heads dividing the width, a known activation, a small positive layer-norm epsilon."""
    cfg: dict = {}
    for key, (low, high) in limits.items():
        value = raw.get(key, getattr(defaults, key))
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise LoadError(f"{where}: {key}={_shown(value)} is not an integer in [{low}, {high}]")
        cfg[key] = value
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise LoadError(f"{where}: hidden_size is not divisible by num_attention_heads")
    act = raw.get("hidden_act", defaults.hidden_act)
    if act not in ALLOWED_ACTIVATIONS:
        raise LoadError(f"{where}: hidden_act {_shown(act)} is not supported")
    cfg["hidden_act"] = act
    eps = raw.get("layer_norm_eps", defaults.layer_norm_eps)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < 1:
        raise LoadError(f"{where}: layer_norm_eps={_shown(eps)} is not a small positive number")
    cfg["layer_norm_eps"] = float(eps)
    return cfg


def _shown(value: object) -> str:
    """An untrusted config value in an error message: one line, short."""
    return one_line(repr(value), 40)


def _validate_text_config(raw: dict, arch: str) -> dict:
    cfg = validate_transformer_config(raw, SIZE_LIMITS, CLIPTextConfig(), "config.json")
    eos = raw.get("eos_token_id", 49407)
    cfg["eos_token_id"] = eos if isinstance(eos, int) and 0 <= eos < cfg["vocab_size"] else cfg["vocab_size"] - 1
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    params = (cfg["vocab_size"] + cfg["max_position_embeddings"]) * d + n * (4 * d * d + 2 * d * f)
    if params > MAX_PARAMETERS:
        raise LoadError(f"config.json describes {params:,} parameters; above the {MAX_PARAMETERS:,} limit")
    return cfg


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CLIPTextModel(_hf_config(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _hf_config(cfg: dict) -> CLIPTextConfig:
    config = CLIPTextConfig(**{k: cfg[k] for k in (*SIZE_LIMITS, "hidden_act", "layer_norm_eps",
                                                   "eos_token_id")})
    config._attn_implementation = "sdpa"
    return config


def _text_key(key: str) -> str | None:
    """Map a checkpoint key to CLIPTextModel's own name, or None if it is not the text tower.

    transformers 5 saves CLIPTextModel without a prefix; CLIPTextModelWithProjection,
    CLIPModel and Stable Diffusion 1.x text encoders carry `text_model.`.
    """
    if key.startswith("text_model."):
        key = key[len("text_model."):]
    if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return None if key.endswith("position_ids") else key
    return None


def read_tensors(files: list[Path], expected: dict[str, tuple[int, ...]],
                 key_map: Callable[[str], str | None] = _text_key, what: str = "text-encoder",
                 optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Check headers against the expected keys and shapes, then load only the mapped tensors.

    `key_map` names the checkpoint keys wanted (None: not this tower's); a -1 in an expected
    shape accepts any size there; `optional` names may be absent. Every failure is a LoadError.
    """
    found: dict[str, tuple[Path, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = key_map(key)
                    if name is None:
                        continue
                    shown = one_line(key, 80)  # key names are untrusted text
                    if name in found:
                        raise LoadError(f"tensor {shown} appears twice in the checkpoint")
                    info = fh.get_slice(key)
                    dtype, shape = info.get_dtype(), tuple(info.get_shape())
                    if name not in expected:
                        raise LoadError(f"{path.name}: unexpected tensor {shown} for this config")
                    want = expected[name]
                    if len(shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, shape, strict=True)):
                        raise LoadError(f"{path.name}: {shown} has shape {list(shape)} but config.json "
                                        f"implies {list(want)}")
                    if dtype not in FLOAT_DTYPES:
                        raise LoadError(f"{path.name}: {shown} has dtype {dtype}; expected F32/F16/BF16")
                    found[name] = (path, key)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"{path.name} is not a readable safetensors file ({reason(exc)})") from exc
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        raise LoadError(f"checkpoint lacks {len(missing)} {what} tensors, e.g. {missing[0]}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:  # only the wanted tower's tensors are read (a CLIPModel has two towers)
        wanted = {name: key for name, (src, key) in found.items() if src == path}
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name, key in wanted.items():
                    tensors[name] = fh.get_tensor(key).float()
        except Exception as exc:  # any failure to read untrusted bytes is a load error
            raise LoadError(f"{path.name} is not a readable safetensors file ({reason(exc)})") from exc
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise LoadError(f"tensor {name} contains NaN or infinite values")
    return tensors


def reason(exc: Exception) -> str:
    """A short, one-line reason from an exception raised by untrusted input."""
    return one_line(exc, 160) or type(exc).__name__


def load_encoder(folder: Path, subfolder: str | None = None,
                 identities: list[WeightFile] | None = None) -> LoadedEncoder:
    """Load the text encoder in `folder` (or `folder/subfolder`, e.g. a diffusers pipeline).

    `identities`: the weight files' sha256s when the caller has already hashed them.
    """
    folder = Path(folder)
    if subfolder:
        if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise LoadError(f"--subfolder {subfolder!r} must be a relative path inside the model")
        folder = folder / subfolder
    if not folder.exists():
        raise LoadError(f"model folder {folder} does not exist")
    files = find_weight_files(folder)
    arch, cfg = read_config(folder)
    expected = _expected_shapes(cfg)
    tensors = read_tensors(files, expected)
    with torch.device("meta"):
        model = CLIPTextModel(_hf_config(cfg))
    model.load_state_dict(tensors, strict=False, assign=True)
    model.embeddings.position_ids = torch.arange(cfg["max_position_embeddings"]).expand((1, -1))
    projection = read_projection(files, cfg["hidden_size"])
    if identities is None:
        identities = weight_identities(folder)
    return LoadedEncoder(TextEncoderAdapter(model, cfg["eos_token_id"], projection), arch, cfg, identities, folder)


def read_projection(files: list[Path], width: int) -> torch.Tensor | None:
    """`text_projection.weight` (projection_dim, width) when a checkpoint has it
    (CLIPTextModelWithProjection, CLIPModel), else None."""
    tensors = read_tensors(files, {"text_projection.weight": (-1, width)},
                           key_map=lambda key: key if key == "text_projection.weight" else None,
                           what="projection", optional=frozenset({"text_projection.weight"}))
    return tensors.get("text_projection.weight")

