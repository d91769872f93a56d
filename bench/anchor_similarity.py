"""How far an anchor's outputs are from the model's: near-copies against genuine clean references.

    python bench/anchor_similarity.py [--width 128] [--layers 4] [--out bench-out/anchor]

Measures `scanner.anchor_output_difference` (the median relative difference of the final token
features on the probe prompts) for what an attacker could pass as the anchor of a model M -- M
re-saved with other metadata, M in fp16 / bf16, M with relative weight noise -- and for what a
user passes: the clean base that M was fine-tuned from (every benign and backdoored control).
`scanner.ANCHOR_MIN_DIFFERENCE` must sit between the disguises and the clean base of every
backdoored student (where the anchor is what gate 3 compares against); the run says whether it
does. The controls are saved in --out and reused by a second run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amdet_gate import controls
from amdet_gate.encoders import load_encoder
from amdet_gate.scanner import ANCHOR_MIN_DIFFERENCE, anchor_output_difference, probe_ids
from amdet_gate.sources.local import local_model
from amdet_gate.tokenizer import bundled_tokenizer


def variant(folder: Path, out: Path, change) -> Path:
    """A copy of `folder` whose tensors are `change(tensor)`, re-saved with other metadata."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (folder / name).exists():
            (out / name).write_bytes((folder / name).read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: change(v).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"n": "x"})
    return out


def noisy(scale: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def change(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return t + scale * t.float().std() * torch.randn(t.shape, generator=generator)

    return change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-out/anchor"))
    args = parser.parse_args()
    shape = controls.ControlShape(args.width, args.layers, 77)
    names = ("benign_distill", "benign_contrastive", "backdoor_homoglyph", "backdoor_rare_word", "backdoor_phrase",
             "backdoor_pair_rare_word")
    base_dir = args.out / "base"
    folders = {name: args.out / name for name in names}
    if not all((f / "model.safetensors").is_file() for f in (base_dir, *folders.values())):  # else: a rerun
        t0 = time.monotonic()
        base = controls.pretrain_base(shape)
        models = {"benign_distill": controls.benign_finetune(base, "distill", seed=1),
                  "benign_contrastive": controls.benign_finetune(base, "contrastive", seed=2),
                  "backdoor_homoglyph": controls.backdoor_text_on_text(base, "homoglyph", seed=3),
                  "backdoor_rare_word": controls.backdoor_text_on_text(base, "rare_word", seed=4),
                  "backdoor_phrase": controls.backdoor_text_on_text(base, "phrase", seed=6),
                  "backdoor_pair_rare_word": controls.backdoor_text_on_pair(base, "rare_word", seed=20)}
        print(f"controls {shape} built in {time.monotonic() - t0:.0f} s")
        controls.save_control(base, base_dir)
        for name, model in models.items():
            controls.save_control(model, folders[name])
    tokenizer = bundled_tokenizer()

    def difference(model_dir: Path, anchor_dir: Path) -> float:
        model, anchor = load_encoder(local_model(model_dir)), load_encoder(local_model(anchor_dir))
        ids = probe_ids(tokenizer, model)
        return anchor_output_difference(model, anchor, ids, tokenizer.tokenizer.eos_token_id)

    copies: dict[str, float] = {}
    suspect = folders["backdoor_rare_word"]
    for name, change in {"re-saved copy": lambda t: t, "fp16 round trip": lambda t: t.half().float(),
                         "bf16 round trip": lambda t: t.bfloat16().float(), "noise 1e-4": noisy(1e-4),
                         "noise 1e-3": noisy(1e-3), "noise 1e-2": noisy(1e-2)}.items():
        copies[name] = difference(suspect, variant(suspect, args.out / name.replace(" ", "_"), change))
    references = {f"base as anchor of {name}": difference(folder, base_dir) for name, folder in folders.items()}
    print(f"{'anchor':44s} {'difference':>10s}")
    for name, value in {**copies, **references}.items():
        print(f"{name:44s} {value:10.5f}")
    # Where the anchor matters: it must tell a backdoored student from its clean base (gate 3).
    students = min(v for k, v in references.items() if "backdoor" in k)
    attack = max(copies.values())
    separates = attack < ANCHOR_MIN_DIFFERENCE < students
    print(f"disguises at most {attack:.5f}; the clean base of a backdoored student at least {students:.5f}; "
          f"threshold {ANCHOR_MIN_DIFFERENCE}: {'separates them' if separates else 'DOES NOT separate them'}")


if __name__ == "__main__":
    main()
