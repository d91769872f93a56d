"""The diffusion renderer: a Stable Diffusion 1.x/2.x pipeline conditioned directly on the target feature.

`--render diffusion --pipeline DIR` (or `auto` with `--pipeline`) renders what the backdoor
makes a text-to-image model draw, as the method's reference does: `prompt_embeds = T[None]`,
the unconditional branch being the scanned encoder's encoding of "". Needs the optional extra
`amdet-gate[render]` (diffusers); diffusers is imported only when rendering, never when this
module is imported.

The pipeline folder is untrusted: `model_index.json` must name plain Stable Diffusion with the
standard diffusers component classes (no custom pipeline code is ever run), every component
config is size-checked and built on the meta device before a weight is read, weights are read
from safetensors only (pickle is refused, never opened), and no safety checker is run (the
images must show what the backdoor produces).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from amdet_gate.encoders import load_encoder
from amdet_gate.encoders.tensors import reason as _reason
from amdet_gate.errors import LoadError, PickleRefused, UsageError
from amdet_gate.render.common import (
    RenderedImage,
    Rendering,
    RenderJob,
    RenderRequest,
    check_feature,
    parse_device,
    png_bytes,
    read_json,
    write_image,
)
from amdet_gate.sanitise import one_line
from amdet_gate.sources.hub import is_hub_id
from amdet_gate.sources.local import PICKLE_SUFFIXES, local_model
from amdet_gate.tokenizer import load_tokenizer

INSTALL_HINT = "pip install 'amdet-gate[render]'"
DEFAULT_STEPS = 25  # sampling steps, as in the method
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


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


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
    index = read_json(folder / "model_index.json", f"--pipeline {folder}")
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
    config = read_json(folder / name / "config.json", what)
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
    loaded = load_encoder(local_model(model_folder, subfolder), identities=[])  # no need to hash the weights again
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
    if not diffusers_available():
        raise UsageError(f"--render diffusion needs diffusers, which is not installed: {INSTALL_HINT}")
    device = parse_device(req.device)
    steps = DEFAULT_STEPS if req.steps is None else req.steps
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
    empty = check_feature(empty_feature, "empty-prompt feature")
    if empty.shape[1] != width:
        raise LoadError(f"the empty-prompt feature is {empty.shape[1]} wide but the target feature {width}")
    if target.shape[0] != SD_POSITIONS:
        notes.append(f"the target feature has {target.shape[0]} positions; "
                     f"{'truncated' if target.shape[0] > SD_POSITIONS else 'padded'} to the {SD_POSITIONS} "
                     "Stable Diffusion was trained with")
    cond, uncond = fit_positions(target), fit_positions(empty)

    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "--pipeline scheduler")
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
        relative = write_image(out_dir, f"diffusion_{i}.png", png_bytes(image))
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


class DiffusionRenderer:
    """`--render diffusion`: auto-chosen whenever `--pipeline` is given."""

    name = "diffusion"

    def applies(self, req: RenderRequest, model_dir: Path) -> bool:
        return req.pipeline is not None

    def check(self, req: RenderRequest, model_dir: Path) -> None:
        if req.pipeline is None:
            raise UsageError("--render diffusion needs --pipeline PATH (a local Stable Diffusion pipeline folder)")
        if not diffusers_available():
            raise UsageError(f"--render diffusion needs diffusers, which is not installed: {INSTALL_HINT}")
        check_pipeline_index(pipeline_folder(req.pipeline))

    def render(self, req: RenderRequest, job: RenderJob) -> Rendering:
        return render_diffusion(req, job.target, job.model_folder, job.subfolder, job.out_dir, job.empty_feature)
