"""Reversed-target images: what the backdoor makes the model produce (docs/method.md section 4).

A scan recovers the target feature T (L x d: the encoder's final-layer-norm output with the
pseudo-trigger inserted; every position has collapsed to the backdoor's target). Three
renderers turn T into something a person can look at:

- `diffusion`: a Stable Diffusion 1.x/2.x pipeline conditioned directly on T, as the method's
  reference does (optional extra `amdet-gate[render]`, which installs diffusers).
- `clip-vision`: when a CLIP vision tower is at hand (the scanned model is a full CLIPModel, or
  `--vision PATH`), feature visualisation: pixels, through a smooth Fourier parametrisation and
  random augmentations, are optimised until their image embedding matches T's text embedding.
  Needs no diffusion weights.
- `tokens`: always available: the nearest vocabulary tokens and corpus prompts (computed by
  `reverse.py`), drawn as an image card and given as plain text.

`render` runs the chosen renderer and, because it is cheap, always the tokens card too.

Everything read from disk is untrusted. Weights are read from safetensors only (pickle is
refused, never opened); configs are read as small JSON and checked before any tensor is
built; only known classes of installed libraries are instantiated (no custom pipelines, no
remote code). Strings from the tokenizer and the prompt corpus are sanitised before they are
drawn or printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from amdet_gate.encoder import FLOAT_DTYPES, load_encoder, read_tensors, validate_transformer_config
from amdet_gate.encoder import reason as _reason
from amdet_gate.errors import LoadError, PickleRefused, UsageError
from amdet_gate.files import write_atomic
from amdet_gate.sanitise import one_line
from amdet_gate.source import PICKLE_SUFFIXES, find_weight_files, is_hub_id, read_small
from amdet_gate.tokenizer import load_tokenizer

RENDERERS = ("diffusion", "clip-vision", "tokens")
REQUEST_KINDS = ("auto", *RENDERERS, "none")
IMAGES_DIR = "images"
MAX_IMAGES = 16
MAX_STEPS = 5000
INSTALL_HINT = "pip install 'amdet-gate[render]'"


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
    steps: int | None = None  # None: the renderer's default (see default_steps)
    guidance: float = 7.5  # classifier-free guidance scale (diffusion)
    device: str = "cpu"  # auto | cpu | cuda[:N]


def default_steps(renderer: str, device: torch.device) -> int:
    """25 sampling steps as in the method; 200 optimisation steps for clip-vision on a GPU, 25 on a CPU
    (a full-size CLIP vision tower costs seconds per step there)."""
    if renderer == "diffusion":
        return 25
    return 200 if device.type == "cuda" else 25


# ----------------------------------------------------------------------------- choosing


def choose_renderer(req: RenderRequest, model_folder: Path, subfolder: str | None) -> str:
    """The renderer `req` asks for, checked cheaply so that a CLI can fail before a long scan.

    auto: diffusion when a pipeline is given; clip-vision when `--vision` is given or the scanned
    model is a full CLIPModel checkpoint; else tokens. An explicit kind that cannot work raises
    UsageError.
    """
    _check_request(req)
    kind = req.kind
    if kind in ("none", "tokens"):
        return kind
    model_dir = _model_dir(model_folder, subfolder)
    if kind == "auto":
        if req.pipeline is not None:
            kind = "diffusion"
        elif req.vision is not None or _is_full_clip(model_dir):
            kind = "clip-vision"
        else:
            return "tokens"
    if kind == "diffusion":
        if req.pipeline is None:
            raise UsageError("--render diffusion needs --pipeline PATH (a local Stable Diffusion pipeline folder)")
        if not _diffusers_available():
            raise UsageError(f"--render diffusion needs diffusers, which is not installed: {INSTALL_HINT}")
        check_pipeline_index(pipeline_folder(req.pipeline))
    else:  # clip-vision
        if req.vision is not None:
            if not Path(req.vision).is_dir():
                raise UsageError(f"--vision {req.vision}: no such folder")
        elif not _is_full_clip(model_dir):
            raise UsageError("--render clip-vision needs a CLIP vision tower: scan a full CLIPModel checkpoint "
                             "or pass --vision PATH")
    return kind


def _check_request(req: RenderRequest) -> None:
    if req.kind not in REQUEST_KINDS:
        raise UsageError(f"--render {req.kind!r}: use one of {', '.join(REQUEST_KINDS)}")
    if not isinstance(req.n_images, int) or not 1 <= req.n_images <= MAX_IMAGES:
        raise UsageError(f"--render-images {req.n_images!r}: use an integer in [1, {MAX_IMAGES}]")
    if req.steps is not None and (not isinstance(req.steps, int) or not 0 <= req.steps <= MAX_STEPS):
        raise UsageError(f"--render-steps {req.steps!r}: use an integer in [0, {MAX_STEPS}]")
    if not isinstance(req.guidance, int | float) or not math.isfinite(req.guidance) or not 0 <= req.guidance <= 50:
        raise UsageError(f"--guidance {req.guidance!r}: use a number in [0, 50]")
    _device(req.device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"render device {name!r}: use auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"render device {name}: no CUDA device is available")
    return torch.device(name)


def _model_dir(model_folder: Path, subfolder: str | None) -> Path:
    folder = Path(model_folder)
    if subfolder:
        if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise UsageError(f"--subfolder {subfolder!r} must be a relative path inside the model")
        folder = folder / subfolder
    return folder


def _is_full_clip(folder: Path) -> bool:
    """True when config.json describes a CLIPModel (text and vision towers); any problem means no."""
    try:
        raw = json.loads(read_small(folder / "config.json"))
    except (OSError, LoadError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict)


def _diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


# ----------------------------------------------------------------------------- rendering


def render(req: RenderRequest, target_feature: Tensor, result: dict, model_folder: Path, subfolder: str | None,
           out_dir: Path, *, empty_feature: Tensor | None = None) -> list[Rendering]:
    """Run the chosen renderer, then the tokens card; PNGs go to `out_dir/images/`.

    `result` is the scan's result dict (its `reversed_target` feeds the tokens card).
    `empty_feature` (L x d) is the scanned encoder's output for the empty prompt, the
    unconditional branch of the diffusion renderer; when None it is computed by reloading the
    model from `model_folder`.
    """
    kind = choose_renderer(req, model_folder, subfolder)
    if kind == "none":
        return []
    target = _check_feature(target_feature, "target feature")
    made = []
    if kind == "diffusion":
        made.append(render_diffusion(req, target, model_folder, subfolder, Path(out_dir), empty_feature))
    elif kind == "clip-vision":
        made.append(render_clip_vision(req, target, model_folder, subfolder, Path(out_dir), trigger_vectors(result)))
    made.append(render_tokens(result, Path(out_dir)))
    return made


def _check_feature(feature: Tensor, what: str) -> Tensor:
    if not isinstance(feature, Tensor) or feature.dim() != 2 or 0 in feature.shape:
        raise LoadError(f"the {what} must be a non-empty L x d tensor")
    feature = feature.detach().float().cpu()
    if not torch.isfinite(feature).all():
        raise LoadError(f"the {what} contains NaN or infinite values")
    return feature


def _write_image(out_dir: Path, name: str, data: bytes) -> str:
    """Write `images/<name>` under `out_dir`; returns the path relative to `out_dir` (for result.json)."""
    relative = f"{IMAGES_DIR}/{name}"
    write_atomic(Path(out_dir) / relative, data)
    return relative


def _png_bytes(pixels: Tensor) -> bytes:
    """(3, H, W) floats in [0, 1] -> PNG bytes (PIL writes no timestamp: same pixels, same bytes)."""
    from PIL import Image

    array = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")  # H x W x 3 uint8: RGB
    return buffer.getvalue()


def _read_json(path: Path, what: str) -> dict:
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


# ----------------------------------------------------------------------------- tokens card

CARD_FONT = "DejaVuSansMono.ttf"  # shipped inside matplotlib: same glyphs (and bytes) on every machine
CARD_BOLD_FONT = "DejaVuSansMono-Bold.ttf"
CARD_ROWS = 12  # rows per section
CARD_CHARS = 60  # characters per untrusted string
CARD_DPI = 100


def _code_points(raw: object, limit: int = 3) -> str:
    """Code points of the non-ASCII and non-printable characters of the raw string, so that
    homoglyphs (a Cyrillic o, U+043E, for a Latin o) and hidden characters are told apart."""
    text = raw if isinstance(raw, str) else str(raw)
    seen = list(dict.fromkeys(ch for ch in text[: CARD_CHARS * 4] if ord(ch) > 127 or not ch.isprintable()))
    if not seen:
        return ""
    shown = " ".join(f"U+{ord(ch):04X}" for ch in seen[:limit])
    return f"  [{shown}{' ...' if len(seen) > limit else ''}]"


def _number(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:6.3f}"
    return "   n/a"


def _entries(reversed_target: object, key: str) -> list[dict]:
    items = reversed_target.get(key) if isinstance(reversed_target, dict) else None
    if not isinstance(items, list):
        return []
    return [item for item in items[:CARD_ROWS] if isinstance(item, dict)]


def _position(item: dict) -> str:
    position = item.get("position")
    return f"pos {position:>2}  " if isinstance(position, int) and not isinstance(position, bool) else ""


def trigger_vectors(result: dict) -> int:
    """K, the pseudo-trigger's vectors, from an (untrusted) result: 1 when absent or implausible."""
    rt = result.get("reversed_target") if isinstance(result, dict) else None
    k = rt.get("trigger_vectors") if isinstance(rt, dict) else None
    return k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 16 else 1


def _token_label(item: dict) -> str:
    raw = item.get("text", "")
    token_id = item.get("id")
    ident = f"  id {token_id}" if isinstance(token_id, int) and not isinstance(token_id, bool) else ""
    return f'"{one_line(raw, 30)}"{_code_points(raw)}{ident}'


def token_sections(result: dict) -> list[tuple[str, list[str]]]:
    """The card's sections as (heading, rows), from result["reversed_target"]."""
    rt = result.get("reversed_target") if isinstance(result, dict) else None
    trigger = [f"{_position(t)}{_number(t.get('cosine'))}  {_token_label(t)}" for t in _entries(rt, "trigger_tokens")]
    # reverse.py decodes the positions after the trigger: 0 is BOS, 1..K the pseudo-trigger itself.
    target = [f"{_position(t)}{_number(t.get('cosine'))}  {_token_label(t)}" for t in _entries(rt, "target_tokens")]
    prompts = [f"{_number(p.get('similarity'))}  {one_line(p.get('prompt', ''), CARD_CHARS)}"
               for p in _entries(rt, "target_prompts")]
    return [
        ("Pseudo-trigger: nearest vocabulary tokens (cosine, input embeddings)", trigger or ["(none)"]),
        ("Target feature, position by position: nearest corpus tokens", target or ["(none)"]),
        ("Corpus prompts whose clean features are nearest the target", prompts or ["(none)"]),
    ]


def render_tokens(result: dict, out_dir: Path) -> Rendering:
    sections = token_sections(result)
    title = "amdet-gate: reversed target (nearest tokens and prompts)"
    lines = [title]
    for heading, rows in sections:
        lines.extend(["", heading, *("  " + row for row in rows)])
    text = "\n".join(lines)
    relative = _write_image(out_dir, "tokens.png", _card_png(title, sections))
    caption = "Nearest vocabulary tokens to the pseudo-trigger and to the target, and the nearest corpus prompts"
    return Rendering("tokens", [RenderedImage(relative, caption, "tokens")], text,
                     ["strings come from the model's tokenizer and the prompt corpus; hidden characters are "
                      "shown as \\u escapes and non-ASCII code points are listed"])


def _card_png(title: str, sections: list[tuple[str, list[str]]]) -> bytes:
    """Draw the card with an explicit Figure and Agg canvas: no pyplot, no global figure state."""
    import matplotlib
    from matplotlib import ft2font
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    regular = FontProperties(fname=str(fonts / CARD_FONT), size=10)
    bold = FontProperties(fname=str(fonts / CARD_BOLD_FONT), size=10)
    title_font = FontProperties(fname=str(fonts / CARD_BOLD_FONT), size=12)
    charmap = set(ft2font.FT2Font(str(fonts / CARD_FONT)).get_charmap())

    def drawable(line: str) -> str:  # a missing glyph would only warn, but U+FFFD is explicit and quiet
        return "".join(ch if ord(ch) in charmap or ch == " " else "\ufffd" for ch in line)

    lines: list[tuple[str, FontProperties, str]] = [(title, title_font, "#111111")]
    for heading, rows in sections:
        lines.append(("", regular, "#000000"))
        lines.append((heading, bold, "#1f3a5f"))
        lines.extend(("  " + row, regular, "#222222") for row in rows)
    line_height, margin, width = 0.22, 0.25, 9.0  # inches
    height = 2 * margin + line_height * len(lines)
    figure = Figure(figsize=(width, height), dpi=CARD_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    for i, (line, font, colour) in enumerate(lines):
        y = 1 - (margin + line_height * (i + 0.75)) / height
        # parse_math / usetex off: a "$...$" token from a hostile tokenizer stays literal text.
        figure.text(0.025, y, drawable(line), fontproperties=font, color=colour, ha="left", va="baseline",
                    parse_math=False, usetex=False, wrap=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=CARD_DPI, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- diffusion

SD_PIPELINES = ("StableDiffusionPipeline",)  # SD 1.x / 2.x text-to-image; they consume last_hidden_state
SD_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
SCHEDULERS = (
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler",
)
SD_POSITIONS = 77  # the UNet's cross-attention was trained on 77 CLIP positions
MAX_COMPONENT_PARAMETERS = {"unet": 5_000_000_000, "vae": 1_000_000_000}
MAX_CONFIG_INT = 1 << 20  # any integer in a component config (channels, timesteps, ...)
MAX_CONFIG_LIST = 16  # any list in a component config (blocks per UNet, ...)
LONG_CONFIG_LISTS = {"trained_betas": 100_000}  # a scheduler may list one beta per training timestep
MAX_DEPTH = {"layers_per_block": 16, "transformer_layers_per_block": 16}
WEIGHTS_NAME = "diffusion_pytorch_model"


def pipeline_folder(spec: str) -> Path:
    """The local folder behind `--pipeline`; a Hub id must be downloaded by the caller first."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"--pipeline {spec}: not a folder (expected a diffusers Stable Diffusion pipeline folder)")
    if is_hub_id(spec):
        raise UsageError(f"--pipeline {spec}: not a local folder, and Hub ids are not resolved here; download it "
                         f"first (huggingface-cli download {spec} --local-dir DIR) and pass --pipeline DIR")
    raise UsageError(f"--pipeline {spec}: no such folder")


def check_pipeline_index(folder: Path) -> dict:
    """model_index.json must declare a known SD pipeline class with the standard component classes.

    The index decides which code would run in `DiffusionPipeline.from_pretrained`; we never call
    that, but we refuse anything other than plain Stable Diffusion before loading a byte.
    """
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"--pipeline {folder}: no model_index.json (expected a diffusers Stable Diffusion folder)")
    index = _read_json(folder / "model_index.json", f"--pipeline {folder}")
    declared = index.get("_class_name")
    if declared not in SD_PIPELINES:
        raise UsageError(f"--pipeline {folder}: model_index.json declares {one_line(declared, 60)!r}; only "
                         f"{', '.join(SD_PIPELINES)} is supported (custom pipeline code is never run)")
    for name, cls in SD_COMPONENTS.items():
        if index.get(name) != ["diffusers", cls]:
            raise UsageError(f"--pipeline {folder}: component {name} is {one_line(index.get(name), 60)}, "
                             f"expected diffusers {cls}")
    scheduler = index.get("scheduler")
    if not (isinstance(scheduler, list) and len(scheduler) == 2 and scheduler[0] == "diffusers"
            and scheduler[1] in SCHEDULERS):
        raise UsageError(f"--pipeline {folder}: scheduler {one_line(scheduler, 60)} is not a known diffusers scheduler")
    return index


def _check_config_values(config: dict, what: str) -> None:
    """Plain size sanity before diffusers builds anything from the config (no accelerate: it allocates)."""

    def check(key: str, value: object) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int):
            if not -MAX_CONFIG_INT <= value <= MAX_CONFIG_INT:
                raise LoadError(f"{what}: {key}={value} is implausibly large")
            if key in MAX_DEPTH and value > MAX_DEPTH[key]:
                raise LoadError(f"{what}: {key}={value} is above {MAX_DEPTH[key]}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise LoadError(f"{what}: {key} is not a finite number")
        elif isinstance(value, list):
            limit = LONG_CONFIG_LISTS.get(key, MAX_CONFIG_LIST)
            if len(value) > limit:
                raise LoadError(f"{what}: {key} has {len(value)} entries; at most {limit} are accepted")
            for item in value:
                check(key, item)
        elif isinstance(value, dict):
            raise LoadError(f"{what}: {key} is a nested object, which Stable Diffusion configs do not have")

    for key, value in config.items():
        check(key, value)


def _component_variant(folder: Path, name: str) -> str | None:
    """None for the plain safetensors file (or shards); "fp16"/"bf16" when only such a variant exists."""
    sub = folder / name
    if (sub / f"{WEIGHTS_NAME}.safetensors").is_file() or (sub / f"{WEIGHTS_NAME}.safetensors.index.json").is_file():
        return None
    for variant in ("fp16", "bf16"):
        if (sub / f"{WEIGHTS_NAME}.{variant}.safetensors").is_file():
            return variant
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES) if sub.is_dir() else []
    if pickles:
        raise PickleRefused(f"{sub} has only pickle-based weights ({', '.join(pickles[:3])}); pickle can run code "
                            "when loaded, so amdet-gate reads safetensors only - convert the weights first")
    raise LoadError(f"{sub} has no {WEIGHTS_NAME}.safetensors")


def _checked_component(folder: Path, name: str, cls: type) -> dict:
    """Validate `name/config.json`, build the model on the meta device and bound its parameter count."""
    what = f"--pipeline {name}/config.json"
    config = _read_json(folder / name / "config.json", what)
    declared = config.get("_class_name")
    if declared is not None and declared != cls.__name__:
        raise LoadError(f"{what} declares {one_line(declared, 60)!r}, expected {cls.__name__}")
    _check_config_values(config, what)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:  # a hostile or broken config: one line, no traceback
        raise LoadError(f"{what} is not a valid {cls.__name__} config ({_reason(exc)})") from exc
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_COMPONENT_PARAMETERS[name]:
        raise LoadError(f"{what} describes {count:,} parameters; above the {MAX_COMPONENT_PARAMETERS[name]:,} limit")
    return config


@contextlib.contextmanager
def _quiet_transformers_import() -> Iterator[None]:
    """Importing diffusers' SD pipeline makes transformers warn that torchvision is absent (harmless here:
    we use no image processor). Raise that logger's level only for the import, then restore it."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fit_positions(feature: Tensor, length: int = SD_POSITIONS) -> Tensor:
    """Truncate to `length` positions, or pad by repeating the last one.

    CLIP's padding positions after EOS look like the last position, and a collapsed target is
    the same at every position anyway, so repeating the last row is the least surprising pad.
    """
    if feature.shape[0] >= length:
        return feature[:length]
    return torch.cat([feature, feature[-1:].expand(length - feature.shape[0], -1)])


def empty_prompt_feature(model_folder: Path, subfolder: str | None) -> Tensor:
    """The scanned encoder's output (L x d) for the empty prompt, loaded through the safe loader."""
    loaded = load_encoder(Path(model_folder), subfolder, identities=[])  # no need to hash the weights again
    tokenizer = load_tokenizer(loaded.folder)
    ids = tokenizer([""], loaded.adapter.seq_len)
    with torch.no_grad():
        return loaded.adapter.encode(loaded.adapter.embed(ids))[0]


def render_diffusion(req: RenderRequest, target: Tensor, model_folder: Path, subfolder: str | None, out_dir: Path,
                     empty_feature: Tensor | None = None) -> Rendering:
    """Stable Diffusion conditioned directly on the target feature (`prompt_embeds = T[None]`).

    Unconditional branch: the scanned encoder's encoding of "" (what the method's reference
    does, and what the pipeline itself would use if the scanned encoder were its text encoder).
    Zeros would be a different baseline than the one SD was trained against, shifting colours
    and contrast under guidance.
    """
    if not _diffusers_available():
        raise UsageError(f"--render diffusion needs diffusers, which is not installed: {INSTALL_HINT}")
    device = _device(req.device)
    steps = default_steps("diffusion", device) if req.steps is None else req.steps
    if steps < 1:
        raise UsageError("--render-steps must be at least 1 for the diffusion renderer")
    folder = pipeline_folder(str(req.pipeline))
    index = check_pipeline_index(folder)
    with _quiet_transformers_import():
        import diffusers
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    unet_config = _checked_component(folder, "unet", UNet2DConditionModel)
    _checked_component(folder, "vae", AutoencoderKL)
    width = target.shape[1]
    cross = unet_config.get("cross_attention_dim", 1280)
    cross_dims = set(cross) if isinstance(cross, list) else {cross}
    if cross_dims != {width}:
        raise UsageError(f"--pipeline {folder} does not match the encoder: its UNet attends to width "
                         f"{'/'.join(map(str, sorted(cross_dims, key=str)))} but the target feature is {width} wide")
    notes = []
    if empty_feature is None:
        empty_feature = empty_prompt_feature(model_folder, subfolder)
    empty = _check_feature(empty_feature, "empty-prompt feature")
    if empty.shape[1] != width:
        raise LoadError(f"the empty-prompt feature is {empty.shape[1]} wide but the target feature {width}")
    if target.shape[0] != SD_POSITIONS:
        notes.append(f"the target feature has {target.shape[0]} positions; "
                     f"{'truncated' if target.shape[0] > SD_POSITIONS else 'padded'} to the {SD_POSITIONS} "
                     "Stable Diffusion was trained with")
    cond, uncond = fit_positions(target), fit_positions(empty)

    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "--pipeline scheduler")
    _check_config_values(scheduler_config, "--pipeline scheduler/scheduler_config.json")
    scheduler_name = index["scheduler"][1]
    try:
        scheduler = getattr(diffusers, scheduler_name).from_config(scheduler_config)
    except ImportError:  # LMS needs scipy; the same noise schedule under DDIM is a faithful stand-in
        scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
        notes.append(f"{scheduler_name} needs scipy, which is not installed; sampled with DDIMScheduler instead")
    except Exception as exc:
        raise LoadError(f"--pipeline scheduler config is not valid for {scheduler_name} ({_reason(exc)})") from exc

    # fp16 on a GPU (how SD is normally run; 2x faster), fp32 on a CPU where fp16 is slow or unsupported.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # Without accelerate, diffusers cannot build on the meta device (and warns if asked to): ask only when it can.
    low_memory = importlib.util.find_spec("accelerate") is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(
            str(folder), subfolder="unet", use_safetensors=True, local_files_only=True,
            variant=_component_variant(folder, "unet"), torch_dtype=dtype, low_cpu_mem_usage=low_memory)
        vae = AutoencoderKL.from_pretrained(
            str(folder), subfolder="vae", use_safetensors=True, local_files_only=True,
            variant=_component_variant(folder, "vae"), torch_dtype=dtype, low_cpu_mem_usage=low_memory)
    except (PickleRefused, LoadError):
        raise
    except Exception as exc:
        raise LoadError(f"cannot load the pipeline in {folder} ({_reason(exc)})") from exc
    # Built from its parts: no text encoder or tokenizer is needed (we pass embeddings), and no
    # safety checker is run: the images must show what the backdoor produces, unfiltered.
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    # A CPU generator: the initial latents are the same for a seed on any device.
    generator = torch.Generator("cpu").manual_seed(req.seed)
    try:
        with torch.no_grad():
            output = pipe(prompt_embeds=cond[None].to(device, dtype),
                          negative_prompt_embeds=uncond[None].to(device, dtype),
                          num_inference_steps=steps, guidance_scale=float(req.guidance),
                          num_images_per_prompt=req.n_images, generator=generator, output_type="pt")
    except Exception as exc:
        raise LoadError(f"the Stable Diffusion pipeline failed to render ({_reason(exc)})") from exc
    pixels = output.images  # (n, 3, H, W) in [0, 1]
    if not torch.isfinite(pixels).all():
        notes.append("the pipeline produced NaN pixels (shown black); try --device cpu for fp32")
        pixels = torch.nan_to_num(pixels, nan=0.0)
    images = []
    for i, image in enumerate(pixels):
        relative = _write_image(out_dir, f"diffusion_{i}.png", _png_bytes(image))
        images.append(RenderedImage(relative, f"Stable Diffusion conditioned on the target feature, image {i + 1} of "
                                              f"{len(pixels)} (seed {req.seed})", "diffusion"))
    height, width_px = pixels.shape[-2:]
    text = (f"{len(images)} images ({width_px}x{height}) from the Stable Diffusion pipeline {folder.name}, conditioned "
            f"directly on the target feature: {steps} steps of {type(scheduler).__name__}, guidance "
            f"{float(req.guidance):g}, seed {req.seed}; unconditional branch: the scanned encoder's encoding of \"\".")
    notes.append("no safety checker was run: the images show what the backdoor makes the model produce")
    metrics = {"steps": steps, "guidance": float(req.guidance), "seed": req.seed,
               "scheduler": type(scheduler).__name__, "size": [int(width_px), int(height)]}
    return Rendering("diffusion", images, text, notes, metrics)


# ----------------------------------------------------------------------------- clip-vision

VISION_LIMITS = {
    "hidden_size": (8, 16_384),
    "intermediate_size": (8, 65_536),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 256),
    "image_size": (8, 1024),
    "patch_size": (1, 1024),
}
MAX_VISION_PARAMETERS = 3_000_000_000
MAX_PATCHES = 4096  # ViT-L/14 at 336 px has 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing, used when no preprocessor file
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Lucid's square root of the ImageNet colour covariance: optimising decorrelated colour channels
# gives natural colours instead of saturated per-channel noise.
COLOR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
VIEWS = {"cuda": 4, "cpu": 2}  # augmented views per image per step: fewer on a CPU, where each costs seconds
LEARNING_RATE = 0.05


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
    if params > MAX_VISION_PARAMETERS:
        raise LoadError(f"vision config describes {params:,} parameters; above the {MAX_VISION_PARAMETERS:,} limit")
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
        raw = _read_json(path, f"--vision {folder}")
        m, s = raw.get("image_mean"), raw.get("image_std")
        ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                              for x in v) for v in (m, s))
        if ok and all(0 <= x <= 1 for x in m) and all(0 < x <= 1 for x in s):
            mean, std = tuple(m), tuple(s)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


TEXT_PROJECTION = "text_projection.weight"


def _vision_key(key: str) -> str | None:
    """The vision tower's keys, its projection, and the text projection a CLIPModel carries beside them."""
    if key.startswith("vision_model.") and not key.endswith("position_ids"):
        return key
    return key if key in ("visual_projection.weight", TEXT_PROJECTION) else None


def _read_vision_tensors(files: list[Path], expected: dict[str, tuple[int, ...]],
                         projection_dim: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """Header check (keys, shapes, dtypes) of every file, then read only the vision tower's tensors."""
    expected = {**expected, TEXT_PROJECTION: (projection_dim, -1)}  # any text width; absent in a vision-only file
    tensors = read_tensors(files, expected, _vision_key, "vision-tower", optional=frozenset({TEXT_PROJECTION}))
    return tensors, tensors.pop(TEXT_PROJECTION, None)


def load_vision_tower(folder: Path) -> VisionTower:
    """A CLIP vision tower with its projection from a CLIPModel or CLIPVisionModelWithProjection folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--vision {folder}: no such folder")
    files = find_weight_files(folder)  # pickle-only folders are refused here, never opened
    raw = _read_json(folder / "config.json", f"--vision {folder}")
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
                if "text_projection.weight" not in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    continue
                info = fh.get_slice("text_projection.weight")
                if len(info.get_shape()) != 2 or info.get_dtype() not in FLOAT_DTYPES:
                    raise LoadError(f"{path.name}: text_projection.weight is not a float matrix")
                tensor = fh.get_tensor("text_projection.weight").float()
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
    device = _device(req.device)
    steps = default_steps("clip-vision", device) if req.steps is None else req.steps
    model_dir = _model_dir(model_folder, subfolder)
    tower = load_vision_tower(Path(req.vision) if req.vision is not None else model_dir)
    projection_dim = tower.model.config.projection_dim
    wanted = (projection_dim, target.shape[1])
    # The scanned model's own projection first (a text-on-pair backdoor is trained through it),
    # then the vision checkpoint's (e.g. the base CLIP of a Stable Diffusion text encoder).
    candidates = [("model", _suspect_text_projection(model_dir)), ("vision", tower.text_projection)]
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
        relative = _write_image(out_dir, f"clip_vision_{i}.png", _png_bytes(image))
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
