"""What every reversed-target renderer shares: the request, the result types and small safe helpers.

The request (`RenderRequest`) and what one render call works on (`RenderJob`); what a renderer
returns (`Rendering`, `RenderedImage`); the checks of its inputs (target feature, device,
subfolder); and the writing of its output (PNG bytes under `<out>/images/`). Also the reading
of small JSON files from untrusted folders, which the diffusion and clip-vision renderers both
do before any tensor is built. Nothing heavy is imported here: no diffusers, no matplotlib.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from amdet_gate.errors import LoadError, UsageError
from amdet_gate.files import write_atomic
from amdet_gate.result import ReversedTarget
from amdet_gate.sources.local import read_small

IMAGES_DIR = "images"
MAX_IMAGES = 16
MAX_STEPS = 5000


@dataclass
class RenderedImage:
    path: str  # relative to the output folder, e.g. "images/diffusion_0.png"
    caption: str
    renderer: str


@dataclass
class Rendering:
    renderer: str
    images: list[RenderedImage]
    text: str  # a plain-text view (sanitised: no control characters)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # renderer-specific numbers, JSON-safe


@dataclass(frozen=True)
class RenderRequest:
    kind: str = "auto"  # auto | diffusion | clip-vision | tokens | none
    pipeline: str | None = None  # a local diffusers Stable Diffusion folder (Hub ids: resolve first)
    vision: Path | None = None  # a CLIPModel or CLIPVisionModelWithProjection folder
    n_images: int = 4
    seed: int = 0
    steps: int | None = None  # None: the renderer's default (its module's default_steps / DEFAULT_STEPS)
    guidance: float = 7.5  # classifier-free guidance scale (diffusion)
    device: str = "cpu"  # auto | cpu | cuda[:N]


@dataclass(frozen=True)
class RenderJob:
    """What one `render` call works on, beside the request: the same for every renderer."""

    target: Tensor  # L x d, checked by `check_feature` (finite, float32, on the CPU)
    reversed_target: ReversedTarget  # the scan's reversed target (its nearest tokens feed the tokens card)
    model_folder: Path  # the scanned model's folder
    subfolder: str | None  # the encoder's subfolder inside it, as given to the scan
    out_dir: Path  # PNGs go to out_dir/images/
    empty_feature: Tensor | None = None  # L x d encoding of "", when the scan computed it

    @property
    def model_dir(self) -> Path:
        return model_dir(self.model_folder, self.subfolder)


def parse_device(name: str) -> torch.device:
    """`RenderRequest.device` -> a torch device (UsageError, exit 4, for anything else or a missing GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"render device {name!r}: use auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"render device {name}: no CUDA device is available")
    return torch.device(name)


def model_dir(model_folder: Path, subfolder: str | None) -> Path:
    """The scanned encoder's folder: `model_folder/subfolder`, the subfolder relative and inside."""
    folder = Path(model_folder)
    if subfolder:
        if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise UsageError(f"--subfolder {subfolder!r} must be a relative path inside the model")
        folder = folder / subfolder
    return folder


def check_feature(feature: Tensor, what: str) -> Tensor:
    """A non-empty, finite L x d tensor, detached, as float32 on the CPU (LoadError otherwise)."""
    if not isinstance(feature, Tensor) or feature.dim() != 2 or 0 in feature.shape:
        raise LoadError(f"the {what} must be a non-empty L x d tensor")
    feature = feature.detach().float().cpu()
    if not torch.isfinite(feature).all():
        raise LoadError(f"the {what} contains NaN or infinite values")
    return feature


def write_image(out_dir: Path, name: str, data: bytes) -> str:
    """Write `images/<name>` under `out_dir`; returns the path relative to `out_dir` (for result.json)."""
    relative = f"{IMAGES_DIR}/{name}"
    write_atomic(Path(out_dir) / relative, data)
    return relative


def png_bytes(pixels: Tensor) -> bytes:
    """(3, H, W) floats in [0, 1] -> PNG bytes (PIL writes no timestamp: same pixels, same bytes)."""
    from PIL import Image

    array = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")  # H x W x 3 uint8: RGB
    return buffer.getvalue()


def read_json(path: Path, what: str) -> dict:
    """A small JSON object from an untrusted folder (1 MiB cap, UTF-8, must be an object)."""
    if not path.is_file():
        raise LoadError(f"{what}: {path} is missing")
    try:
        raw = json.loads(read_small(path))
    except json.JSONDecodeError as exc:
        raise LoadError(f"{what}: {path.name} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    except RecursionError as exc:  # "[[[[..." a megabyte deep
        raise LoadError(f"{what}: {path.name} is nested too deeply") from exc
    if not isinstance(raw, dict):
        raise LoadError(f"{what}: {path.name} is not a JSON object")
    if "auto_map" in raw:
        raise LoadError(f"{what}: {path.name} asks for remote code (auto_map); amdet-gate never runs model code")
    return raw
