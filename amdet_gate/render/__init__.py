"""Reversed-target images: what the backdoor makes the model produce (docs/method.md section 4).

A scan recovers the target feature T (L x d: the encoder's final-layer-norm output with the
pseudo-trigger inserted; every position has collapsed to the backdoor's target). Three
renderers turn T into something a person can look at, one module each:

- `diffusion` (diffusion.py): a Stable Diffusion 1.x/2.x pipeline conditioned directly on T,
  as the method's reference does (optional extra `amdet-gate[render]`, which installs diffusers).
- `clip-vision` (clip_vision.py): when a CLIP vision tower is at hand (the scanned model is a
  full CLIPModel, or `--vision PATH`), feature visualisation: pixels, through a smooth Fourier
  parametrisation and random augmentations, are optimised until their image embedding matches
  T's text embedding. Needs no diffusion weights.
- `tokens` (tokens.py): always available: the nearest vocabulary tokens and corpus prompts
  (computed by `reverse.py`), drawn as an image card and given as plain text.

`render` runs the chosen renderer and, because it is cheap, always the tokens card too.
This module holds only the interface (`Renderer`), the registry (`REGISTRY`) and the choice;
common.py holds the request and result types and the helpers the renderers share.

Adding a renderer: a new module with a class that satisfies `Renderer`, and one line in
`REGISTRY` ("name": "module:Class"). Registry order is the order in which `--render auto`
asks each renderer whether it applies; the first that does is chosen (tokens, last, always
applies). A renderer module is imported only when it is asked, and must not import optional
extras (diffusers) or matplotlib at import time.

Everything read from disk is untrusted. Weights are read from safetensors only (pickle is
refused, never opened); configs are read as small JSON and checked before any tensor is
built; only known classes of installed libraries are instantiated (no custom pipelines, no
remote code). Strings from the tokenizer and the prompt corpus are sanitised before they are
drawn or printed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, cast

from torch import Tensor

from amdet_gate.errors import UsageError
from amdet_gate.render.common import (
    IMAGES_DIR,
    MAX_IMAGES,
    MAX_STEPS,
    RenderedImage,
    Rendering,
    RenderJob,
    RenderRequest,
    check_feature,
    model_dir,
    parse_device,
)
from amdet_gate.result import ReversedTarget

__all__ = [
    "CARD", "IMAGES_DIR", "MAX_IMAGES", "MAX_STEPS", "REGISTRY", "RENDERERS", "REQUEST_KINDS", "RenderJob",
    "RenderRequest", "RenderedImage", "Renderer", "Rendering", "choose_renderer", "get_renderer", "render",
]


class Renderer(Protocol):
    """One way of turning the target feature into images (and a plain-text view)."""

    name: str  # the `--render` value, also `Rendering.renderer`

    def applies(self, req: RenderRequest, model_dir: Path) -> bool:
        """Whether `--render auto` picks this renderer for `req` and the scanned encoder's folder (cheap)."""
        ...

    def check(self, req: RenderRequest, model_dir: Path) -> None:
        """Raise UsageError (exit 4) when this renderer cannot work here: cheap, before a long scan."""
        ...

    def render(self, req: RenderRequest, job: RenderJob) -> Rendering:
        """Draw `job.target`; PNGs go to `job.out_dir/images/`."""
        ...


# name -> "module:Class", one line per renderer (Bandit-style plugin registration). Order is auto's order.
REGISTRY: Mapping[str, str] = MappingProxyType({
    "diffusion": "amdet_gate.render.diffusion:DiffusionRenderer",
    "clip-vision": "amdet_gate.render.clip_vision:ClipVisionRenderer",
    "tokens": "amdet_gate.render.tokens:TokensRenderer",
})
RENDERERS = tuple(REGISTRY)
REQUEST_KINDS = ("auto", *RENDERERS, "none")
CARD = "tokens"  # drawn after whichever renderer was chosen: cheap, and needs nothing but the result


def get_renderer(name: str) -> Renderer:
    """The registered renderer called `name` (its module is imported on first use)."""
    module, _, attribute = REGISTRY[name].partition(":")
    renderer = cast(Renderer, getattr(importlib.import_module(module), attribute)())
    if renderer.name != name:
        raise RuntimeError(f"renderer registry: {REGISTRY[name]} is named {renderer.name!r}, registered as {name!r}")
    return renderer


# ----------------------------------------------------------------------------- choosing


def choose_renderer(req: RenderRequest, model_folder: Path, subfolder: str | None) -> str:
    """The renderer `req` asks for, checked cheaply so that a CLI can fail before a long scan.

    auto: diffusion when a pipeline is given; clip-vision when `--vision` is given or the scanned
    model is a full CLIPModel checkpoint; else tokens (the first in REGISTRY that applies). An
    explicit kind that cannot work raises UsageError.
    """
    _check_request(req)
    if req.kind in ("none", CARD):
        return req.kind
    folder = model_dir(model_folder, subfolder)
    if req.kind == "auto":
        chosen = next((r for r in map(get_renderer, RENDERERS) if r.applies(req, folder)), get_renderer(CARD))
    else:
        chosen = get_renderer(req.kind)
    chosen.check(req, folder)
    return chosen.name


def _check_request(req: RenderRequest) -> None:
    if req.kind not in REQUEST_KINDS:
        raise UsageError(f"--render {req.kind!r}: use one of {', '.join(REQUEST_KINDS)}")
    if not isinstance(req.n_images, int) or not 1 <= req.n_images <= MAX_IMAGES:
        raise UsageError(f"--render-images {req.n_images!r}: use an integer in [1, {MAX_IMAGES}]")
    if req.steps is not None and (not isinstance(req.steps, int) or not 0 <= req.steps <= MAX_STEPS):
        raise UsageError(f"--render-steps {req.steps!r}: use an integer in [0, {MAX_STEPS}]")
    if not isinstance(req.guidance, int | float) or not math.isfinite(req.guidance) or not 0 <= req.guidance <= 50:
        raise UsageError(f"--guidance {req.guidance!r}: use a number in [0, 50]")
    parse_device(req.device)


# ----------------------------------------------------------------------------- rendering


def render(req: RenderRequest, target_feature: Tensor, reversed_target: ReversedTarget, model_folder: Path,
           subfolder: str | None, out_dir: Path, *, empty_feature: Tensor | None = None) -> list[Rendering]:
    """Run the chosen renderer, then the tokens card; PNGs go to `out_dir/images/`.

    `reversed_target` is the scan result's (its nearest tokens feed the tokens card).
    `empty_feature` (L x d) is the scanned encoder's output for the empty prompt, the
    unconditional branch of the diffusion renderer; when None it is computed by reloading the
    model from `model_folder`.
    """
    kind = choose_renderer(req, model_folder, subfolder)
    if kind == "none":
        return []
    job = RenderJob(check_feature(target_feature, "target feature"), reversed_target, Path(model_folder), subfolder,
                    Path(out_dir), empty_feature)
    names = [kind] if kind == CARD else [kind, CARD]
    return [get_renderer(name).render(req, job) for name in names]
