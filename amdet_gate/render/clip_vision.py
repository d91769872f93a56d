"""The clip-vision renderer: feature visualisation of the target through a CLIP vision tower.

When a CLIP vision tower is at hand (the scanned model is a full CLIPModel, or `--vision PATH`),
pixels, through a smooth Fourier parametrisation and random augmentations, are optimised until
their image embedding matches the target's text embedding. Needs no diffusion weights.

Loading is as strict as the scanner's: the vision config is validated and size-bounded before
the tower is built on the meta device, weights are read from safetensors only (pickle is
refused, never opened) after a header check of every tensor, and no remote code is run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as nnf
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from amdet_gate.encoders.clip import PROJECTION
from amdet_gate.encoders.tensors import (
    FLOAT_DTYPES,
    TOWER_LIMITS,
    check_parameter_budget,
    read_tensors,
    validate_transformer_config,
)
from amdet_gate.encoders.tensors import reason as _reason
from amdet_gate.errors import LoadError, UsageError
from amdet_gate.render.common import (
    RenderedImage,
    Rendering,
    RenderJob,
    RenderRequest,
    model_dir,
    parse_device,
    png_bytes,
    read_json,
    write_image,
)
from amdet_gate.sanitise import one_line
from amdet_gate.sources.local import find_weight_files, read_small

# The tower sizes every transformer shares (encoders/tensors.py), then the image's.
VISION_LIMITS = {**TOWER_LIMITS, "image_size": (8, 1024), "patch_size": (1, 1024)}
MAX_PATCHES = 4096  # ViT-L/14 at 336 px has 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing, used when no preprocessor file
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Lucid's square root of the ImageNet colour covariance: optimising decorrelated colour channels
# gives natural colours instead of saturated per-channel noise.
COLOR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
VIEWS = {"cuda": 4, "cpu": 2}  # augmented views per image per step: fewer on a CPU, where each costs seconds
LEARNING_RATE = 0.05


def default_steps(device: torch.device) -> int:
    """200 optimisation steps on a GPU, 25 on a CPU (a full-size CLIP vision tower costs seconds per step there)."""
    return 200 if device.type == "cuda" else 25


def is_full_clip(folder: Path) -> bool:
    """True when config.json describes a CLIPModel (text and vision towers); any problem means no."""
    try:
        raw = json.loads(read_small(folder / "config.json"))
    except (OSError, LoadError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict)



@dataclass
class VisionTower:
    model: CLIPVisionModelWithProjection
    image_size: int
    mean: Tensor  # (3,)
    std: Tensor  # (3,)
    text_projection: Tensor | None  # (projection_dim, text width) when the checkpoint is a full CLIPModel
    folder: Path


def _validate_vision_config(raw: dict, projection_dim: object) -> dict:
    cfg = validate_transformer_config(raw, VISION_LIMITS, CLIPVisionConfig(), "vision config")
    if cfg["patch_size"] > cfg["image_size"]:
        raise LoadError("vision config: patch_size is larger than image_size")
    if (cfg["image_size"] // cfg["patch_size"]) ** 2 > MAX_PATCHES:  # attention is quadratic in the patch count
        raise LoadError(f"vision config: image_size / patch_size gives more than {MAX_PATCHES} patches")
    if raw.get("num_channels", 3) != 3:
        raise LoadError("vision config: num_channels must be 3 (RGB)")
    if not isinstance(projection_dim, int) or isinstance(projection_dim, bool) or not 1 <= projection_dim <= 16_384:
        raise LoadError(f"vision config: projection_dim={one_line(repr(projection_dim), 40)} is not an integer "
                        "in [1, 16384]")
    cfg["projection_dim"] = projection_dim
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    params = (3 * cfg["patch_size"] ** 2 + patches) * d + n * (4 * d * d + 2 * d * f) + d * projection_dim
    check_parameter_budget(params, "vision config")
    return cfg


def _vision_hf_config(cfg: dict) -> CLIPVisionConfig:
    config = CLIPVisionConfig(**cfg)
    config._attn_implementation = "sdpa"
    return config


def _preprocessing(folder: Path) -> tuple[Tensor, Tensor]:
    """image_mean / image_std from preprocessor_config.json when present and sane, else CLIP's."""
    mean, std = CLIP_MEAN, CLIP_STD
    path = folder / "preprocessor_config.json"
    if path.is_file():
        raw = read_json(path, f"--vision {folder}")
        m, s = raw.get("image_mean"), raw.get("image_std")
        ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                              for x in v) for v in (m, s))
        if ok and all(0 <= x <= 1 for x in m) and all(0 < x <= 1 for x in s):
            mean, std = tuple(m), tuple(s)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _vision_key(key: str) -> str | None:
    """The vision tower's keys, its projection, and the text projection a CLIPModel carries beside them."""
    if key.startswith("vision_model.") and not key.endswith("position_ids"):
        return key
    return key if key in ("visual_projection.weight", PROJECTION) else None


def _read_vision_tensors(files: list[Path], expected: dict[str, tuple[int, ...]],
                         projection_dim: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """Header check (keys, shapes, dtypes) of every file, then read only the vision tower's tensors."""
    expected = {**expected, PROJECTION: (projection_dim, -1)}  # any text width; absent in a vision-only file
    tensors = read_tensors(files, expected, _vision_key, "vision-tower", optional=frozenset({PROJECTION}))
    return tensors, tensors.pop(PROJECTION, None)


def load_vision_tower(folder: Path) -> VisionTower:
    """A CLIP vision tower with its projection from a CLIPModel or CLIPVisionModelWithProjection folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--vision {folder}: no such folder")
    files = find_weight_files(folder)  # pickle-only folders are refused here, never opened
    raw = read_json(folder / "config.json", f"--vision {folder}")
    model_type = raw.get("model_type")
    if model_type == "clip":
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise LoadError(f"--vision {folder}: CLIPModel config.json has no vision_config object")
        projection_dim = raw.get("projection_dim", 512)
    elif model_type == "clip_vision_model":
        vision, projection_dim = raw, raw.get("projection_dim", 512)
    else:
        raise UsageError(f"--vision {folder}: config.json declares model_type {one_line(model_type, 60)!r}; "
                         "expected a CLIPModel or CLIPVisionModelWithProjection checkpoint")
    cfg = _validate_vision_config(vision, projection_dim)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(_vision_hf_config(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    tensors, text_projection = _read_vision_tensors(files, expected, cfg["projection_dim"])
    model.load_state_dict(tensors, strict=False, assign=True)
    embeddings = model.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))  # a non-persistent buffer
    mean, std = _preprocessing(folder)
    return VisionTower(model.eval().requires_grad_(False), cfg["image_size"], mean, std, text_projection, folder)


def _suspect_text_projection(model_dir: Path) -> Tensor | None:
    """The scanned model's own text_projection.weight (CLIPModel, CLIPTextModelWithProjection), if any.

    Preferred over the vision checkpoint's: a text-on-pair backdoor is trained through it.
    """
    try:
        files = find_weight_files(model_dir)
    except Exception:  # the scan loaded this model already; without readable weights there is simply none
        return None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                if PROJECTION not in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    continue
                info = fh.get_slice(PROJECTION)
                if len(info.get_shape()) != 2 or info.get_dtype() not in FLOAT_DTYPES:
                    raise LoadError(f"{path.name}: text_projection.weight is not a float matrix")
                tensor = fh.get_tensor(PROJECTION).float()
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"{path.name} is not a readable safetensors file ({_reason(exc)})") from exc
        if not torch.isfinite(tensor).all():
            raise LoadError("text_projection.weight contains NaN or infinite values")
        return tensor
    return None


def target_text_embedding(target: Tensor, projection: Tensor, trigger_vectors: int = 1) -> Tensor:
    """T's projected, normalised text embedding.

    CLIP pools the EOS position. In T every position after the trigger has collapsed to the
    target, but position 0 (BOS, which under the causal mask sees only itself) is the same for
    every input and positions 1..K are the pseudo-trigger itself; so the mean of positions K+1..
    stands in for the EOS feature (the last position when T is shorter).
    """
    first = 1 + trigger_vectors
    pooled = target[first:].mean(dim=0) if target.shape[0] > first else target[-1]
    return nnf.normalize(projection.float() @ pooled.float(), dim=0)


def _fourier_scale(size: int, decay: float = 1.0) -> Tensor:
    """1/f amplitude scaling: optimising in this basis favours smooth, natural-looking images."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    return 1.0 / (fy**2 + fx**2).sqrt().clamp(min=1.0 / size) ** decay


def spectrum_to_rgb(spectrum: Tensor, scale: Tensor, size: int) -> Tensor:
    """(n, 3, size, size//2+1, 2) Fourier coefficients -> (n, 3, size, size) RGB in (0, 1)."""
    coefficients = torch.view_as_complex(spectrum) * scale
    image = torch.fft.irfft2(coefficients, s=(size, size), norm="ortho") / 4
    colour = torch.tensor(COLOR_CORRELATION, device=spectrum.device)
    colour = colour / colour.norm(dim=0).max()
    return torch.sigmoid(torch.einsum("ij,njhw->nihw", colour, image))


def augment(images: Tensor, views: int, generator: torch.Generator, size: int) -> Tensor:
    """Random scale (0.9-1.1), rotation (+-5 degrees), shift (+-5 %) and pixel noise per view.

    Without them the optimisation finds adversarial high-frequency patterns that only this
    exact crop of this exact network reads as the target. Draws come from a CPU generator so a
    seed gives the same augmentations on any device.
    """
    batch = images.repeat(views, 1, 1, 1)
    b = batch.shape[0]
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(5)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * 0.1
    noise = torch.randn(batch.shape, generator=generator) * 0.02
    cos, sin = angle.cos() * scale, angle.sin() * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta, noise = theta.to(batch.device, batch.dtype), noise.to(batch.device, batch.dtype)
    grid = nnf.affine_grid(theta, [b, 3, size, size], align_corners=False)
    warped = nnf.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (warped + noise).clamp(0, 1)


def _image_embeddings(tower: VisionTower, pixels: Tensor) -> Tensor:
    mean, std = tower.mean.to(pixels.device)[:, None, None], tower.std.to(pixels.device)[:, None, None]
    return nnf.normalize(tower.model(pixel_values=(pixels - mean) / std).image_embeds, dim=-1)


def visualise(tower: VisionTower, text_embed: Tensor, n_images: int, steps: int, seed: int,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise n images so their CLIP image embedding matches `text_embed`.

    Returns the images (n, 3, S, S) and each image's cosine to the target before and after.
    Loss: minus the mean cosine over augmented views (VIEWS), Adam (lr 0.05) on the Fourier
    coefficients; the tower's weights are frozen.
    """
    size = tower.image_size
    generator = torch.Generator("cpu").manual_seed(seed)
    spectrum = torch.randn(n_images, 3, size, size // 2 + 1, 2, generator=generator) * 0.01
    spectrum = spectrum.to(device).requires_grad_(True)
    scale = _fourier_scale(size).to(device)
    target = text_embed.to(device)
    tower.model.to(device)
    optimiser = torch.optim.Adam([spectrum], lr=LEARNING_RATE)
    with torch.no_grad():
        before = _image_embeddings(tower, spectrum_to_rgb(spectrum, scale, size)) @ target
    for _ in range(steps):
        images = spectrum_to_rgb(spectrum, scale, size)
        views = augment(images, VIEWS.get(device.type, 2), generator, size)
        loss = -(_image_embeddings(tower, views) @ target).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        images = spectrum_to_rgb(spectrum, scale, size)
        after = _image_embeddings(tower, images) @ target
    return images.detach().cpu(), before.cpu(), after.cpu()


def render_clip_vision(req: RenderRequest, target: Tensor, model_folder: Path, subfolder: str | None,
                       out_dir: Path, trigger_vectors: int = 1) -> Rendering:
    """Feature visualisation of `target` (L x d): `req.n_images` PNGs `images/clip_vision_<i>.png` in `out_dir`.

    The vision tower is `req.vision`, else the scanned model itself (a full CLIPModel); the text
    projection is the scanned model's own when it has one of the right shape, else the vision
    checkpoint's. `trigger_vectors` (K) says which positions of T to pool (see target_text_embedding).
    """
    device = parse_device(req.device)
    steps = default_steps(device) if req.steps is None else req.steps
    scanned = model_dir(model_folder, subfolder)
    tower = load_vision_tower(Path(req.vision) if req.vision is not None else scanned)
    projection_dim = tower.model.config.projection_dim
    wanted = (projection_dim, target.shape[1])
    # The scanned model's own projection first (a text-on-pair backdoor is trained through it),
    # then the vision checkpoint's (e.g. the base CLIP of a Stable Diffusion text encoder).
    candidates = [("model", _suspect_text_projection(scanned)), ("vision", tower.text_projection)]
    present = [(origin, p) for origin, p in candidates if p is not None]
    if not present:
        raise UsageError("--render clip-vision needs a text projection: the scanned model has none and --vision is a "
                         "vision-only checkpoint; pass a full CLIPModel checkpoint with --vision")
    matching = [(origin, p) for origin, p in present if tuple(p.shape) == wanted]
    if not matching:
        raise UsageError(f"the vision tower does not match the encoder: the text projection is "
                         f"{list(present[0][1].shape)} but the target feature is {target.shape[1]} wide and the image "
                         f"embedding has {projection_dim} dimensions")
    origin, projection = matching[0]
    source = "the scanned model's" if origin == "model" else "the vision checkpoint's"
    text_embed = target_text_embedding(target, projection, trigger_vectors)
    images, before, after = visualise(tower, text_embed, req.n_images, steps, req.seed, device)
    rendered = []
    for i, image in enumerate(images):
        relative = write_image(out_dir, f"clip_vision_{i}.png", png_bytes(image))
        rendered.append(RenderedImage(relative, f"CLIP feature visualisation of the target, image {i + 1} of "
                                                f"{len(images)} (seed {req.seed}): cosine to the target "
                                                f"{float(before[i]):.2f} -> {float(after[i]):.2f}", "clip-vision"))
    text = (f"{len(rendered)} images ({tower.image_size}x{tower.image_size}) whose CLIP image embedding (vision tower "
            f"from {tower.folder.name}) was optimised for {steps} steps to match the target's text embedding "
            f"({source} text projection; mean of target positions 2..); seed {req.seed}. Mean cosine to the "
            f"target: {float(before.mean()):.3f} before, {float(after.mean()):.3f} after.")
    notes = ["feature visualisation shows what the vision tower associates with the target embedding; "
             "expect textures and motifs, not photographs"]
    metrics = {"steps": steps, "seed": req.seed, "text_projection": origin,
               "cosine_before": [round(float(c), 6) for c in before],
               "cosine_after": [round(float(c), 6) for c in after]}
    return Rendering("clip-vision", rendered, text, notes, metrics)


class ClipVisionRenderer:
    """`--render clip-vision`: auto-chosen when `--vision` is given or the scanned model is a full CLIPModel."""

    name = "clip-vision"

    def applies(self, req: RenderRequest, model_dir: Path) -> bool:
        return req.vision is not None or is_full_clip(model_dir)

    def check(self, req: RenderRequest, model_dir: Path) -> None:
        if req.vision is not None:
            if not Path(req.vision).is_dir():
                raise UsageError(f"--vision {req.vision}: no such folder")
        elif not is_full_clip(model_dir):
            raise UsageError("--render clip-vision needs a CLIP vision tower: scan a full CLIPModel checkpoint "
                             "or pass --vision PATH")

    def render(self, req: RenderRequest, job: RenderJob) -> Rendering:
        return render_clip_vision(req, job.target, job.model_folder, job.subfolder, job.out_dir,
                                  job.reversed_target.vectors)
