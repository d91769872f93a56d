"""Reading a transformer tower from untrusted safetensors, whatever its family: the size limits every
tower shares, the config check before a tensor is built, the header check before a byte is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from amdet_gate.errors import LoadError
from amdet_gate.sanitise import one_line

MAX_PARAMETERS = 3_000_000_000
ALLOWED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# The ranges every transformer tower's config must stay in (a text tower adds its vocabulary and
# positions, a vision tower its image and patch sizes); anything outside is refused before building tensors.
TOWER_LIMITS = {
    "hidden_size": (8, 16_384),
    "intermediate_size": (8, 65_536),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 256),
}


def validate_transformer_config(raw: dict, limits: dict[str, tuple[int, int]], defaults: object,
                                where: str) -> dict:
    """What every transformer tower's config must satisfy before a tensor is built: integer sizes within
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


def read_tensors(files: list[Path], expected: dict[str, tuple[int, ...]],
                 key_map: Callable[[str], str | None], what: str = "text-encoder",
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
    check_finite(tensors)
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], what: str | None = None) -> None:
    """LoadError for a weight with NaN or infinite values (`what`: which file and encoder, for the message)."""
    where = f"{what}: " if what else ""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise LoadError(f"{where}tensor {one_line(name, 100)} contains NaN or infinite values")


def reason(exc: Exception) -> str:
    """A short, one-line reason from an exception raised by untrusted input."""
    return one_line(exc, 160) or type(exc).__name__


def check_parameter_budget(params: int, where: str) -> None:
    """LoadError for a config that describes more parameters than MAX_PARAMETERS (memory before a tensor is read)."""
    if params > MAX_PARAMETERS:
        raise LoadError(f"{where} describes {params:,} parameters; above the {MAX_PARAMETERS:,} limit")
