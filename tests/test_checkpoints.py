"""Single-file checkpoints of every layout load to the tensors of the equivalent Hugging Face folder.

Tiny encoders (64 and 128 wide, 2 layers) in fp16, bf16 and fp32, with UNet / VAE / T5 tensors
beside them (tests/tiny_checkpoints.py). No scan runs here: tests/test_checkpoints_scan.py scans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

from amdet_gate.checkpoints.attach import EncoderOptions, attach, scan_targets
from amdet_gate.checkpoints.families import choose_config
from amdet_gate.checkpoints.inventory import inventory
from amdet_gate.checkpoints.loader import load_ref, tokenizer_of
from amdet_gate.checkpoints.tower import map_tower
from amdet_gate.encoders import load_encoder
from amdet_gate.safetensors_header import read_header
from amdet_gate.sources import resolve_source
from amdet_gate.sources.files import identities
from amdet_gate.sources.identity import sha256_file
from amdet_gate.sources.local import local_model
from tests import tiny_checkpoints as tc

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def rounded(model, dtype: torch.dtype):
    """The model with every weight rounded to `dtype`: what a file saved in that dtype holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {"l": tc.tiny_encoder(64, 2, seed=0), "g": tc.tiny_encoder(128, 2, seed=1)}


def loaded(path: Path, encoder: str | None = None, **flags):
    source = attach(resolve_source(str(path)), EncoderOptions(encoder=encoder, **flags))
    return source, load_ref(source, None)


def assert_same_tensors(a, b) -> None:
    sa, sb = a.adapter.model.state_dict(), b.adapter.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def folder_encoder(tmp: Path, model) -> object:
    return load_encoder(local_model(tc.hf_folder(tmp, model)))


LAYOUTS = [  # (builder, encoders in the file (name, which tiny encoder), layout, the consumer's layer)
    ("sd1", lambda p, e, d: tc.sd1_file(p, e["l"], d), [("text_encoder", "l")], "sd1", "final"),
    ("sd1-legacy", lambda p, e, d: tc.sd1_file(p, e["l"], d, legacy=True), [("text_encoder", "l")], "sd1", "final"),
    ("sdxl", lambda p, e, d: tc.sdxl_file(p, e["l"], e["g"], d), [("text_encoder", "l"), ("text_encoder_2", "g")],
     "sdxl-base", "-2"),
    ("sdxl-refiner", lambda p, e, d: tc.sdxl_refiner_file(p, e["g"], d), [("text_encoder_2", "g")], "sdxl-refiner",
     "-2"),
    ("sd3", lambda p, e, d: tc.sd3_file(p, e["l"], e["g"], d), [("text_encoder", "l"), ("text_encoder_2", "g")],
     "sd3", "-2"),
    ("flux", lambda p, e, d: tc.flux_file(p, e["l"], d), [("text_encoder", "l")], "flux", "final"),
    ("clip_l", lambda p, e, d: tc.standalone_file(p, e["l"], d), [("text_encoder", "l")], "text-encoder", "final"),
    ("comfyui", lambda p, e, d: tc.comfy_save_file(p, e["l"], e["g"], d),
     [("text_encoder", "l"), ("text_encoder_2", "g")], "comfyui-clip", "final"),
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize(("label", "build", "parts", "layout", "layer"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_every_layout_loads_the_tensors_of_the_equivalent_folder(tmp_path: Path, encoders: dict, label, build, parts,
                                                                 layout, layer, dtype) -> None:
    models = {k: rounded(tc.tiny_encoder(v.config.hidden_size, 2, seed=i), DTYPES[dtype])
              for i, (k, v) in enumerate(encoders.items())}
    path = build(tmp_path / f"{label}.safetensors", models, DTYPES[dtype])
    assert scan_targets(str(path), None, EncoderOptions()) == [name for name, _ in parts]
    for name, which in parts:
        source, enc = loaded(path, name)  # the default: the final features, whatever the consumer reads
        assert (source.encoder.layout, source.encoder.layer.name) == (layout, "final")
        assert_same_tensors(enc, folder_encoder(tmp_path / f"hf-{name}", models[which]))
        if name == "text_encoder_2" or label == "clip_l":
            assert torch.equal(enc.adapter.projection, tc.text_state(models[which])["text_projection.weight"])
        assert enc.details["encoder"] == name and enc.details["layer"]["scanned"] == "final"
        reads = enc.details["layer"]["consumer_reads"]  # recorded when the consumer reads another layer
        assert reads is None if layer == "final" else reads.startswith(f"{layer} (")
        _, consumer = loaded(path, name, layer="consumer")
        assert consumer.details["layer"]["scanned"] == layer


def test_sd2_drops_the_last_block_and_pads_with_zero(tmp_path: Path, encoders: dict) -> None:
    """SD 2.x files carry 24 blocks of which the pipeline runs 23: the loaded encoder is the first n."""
    model = rounded(tc.tiny_encoder(128, 2, seed=3), torch.float16)
    path = tc.sd2_file(tmp_path / "sd2.safetensors", model)
    assert len([k for k in read_header(path).tensors if k.endswith("attn.in_proj_weight")]) == 3
    source, enc = loaded(path)
    assert enc.config["num_hidden_layers"] == 2 and enc.adapter.projection is None  # SD 2.x reads no projection
    assert_same_tensors(enc, folder_encoder(tmp_path / "hf", model))
    tokenizer = tokenizer_of(source, enc)
    assert tokenizer.tokenizer.pad_token_id == 0 and tokenizer(["a cat"], 77)[0, -1] == 0
    _, sd1 = loaded(tc.sd1_file(tmp_path / "sd1.safetensors", model))
    assert tokenizer_of(attach(resolve_source(str(tmp_path / "sd1.safetensors")), EncoderOptions()),
                         sd1).tokenizer.pad_token_id == 49407  # OpenAI's CLIP pads with <|endoftext|>


def open_clip_reference(state: dict[str, torch.Tensor], ids: torch.Tensor, heads: int, act) -> torch.Tensor:
    """OpenCLIP's text tower forward, written from its definition (nn.MultiheadAttention with a fused in_proj,
    pre-norm blocks, ln_final), independently of the conversion under test."""
    width = state["token_embedding.weight"].shape[1]
    length = ids.shape[1]
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    blocks = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    for i in range(blocks):
        b = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in state.items()
             if k.startswith(f"transformer.resblocks.{i}.")}
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({"in_proj_weight": b["attn.in_proj_weight"],
                                   "in_proj_bias": b["attn.in_proj_bias"], "out_proj.weight": b["attn.out_proj.weight"],
                                   "out_proj.bias": b["attn.out_proj.bias"]})
        h = nnf.layer_norm(x, (width,), b["ln_1.weight"], b["ln_1.bias"])
        x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = nnf.layer_norm(x, (width,), b["ln_2.weight"], b["ln_2.bias"])
        x = x + nnf.linear(act(nnf.linear(h, b["mlp.c_fc.weight"], b["mlp.c_fc.bias"])), b["mlp.c_proj.weight"],
                           b["mlp.c_proj.bias"])
    return nnf.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"])


@pytest.mark.parametrize("under_text", [False, True])
def test_converted_open_clip_gives_the_same_outputs(tmp_path: Path, under_text: bool) -> None:
    """open_clip_model.safetensors (keys at the top or under text.) with open_clip_config.json, gelu as OpenCLIP's
    ViT-H and bigG: token features and the projected pooled feature equal OpenCLIP's own forward within 1e-5."""
    model = tc.tiny_encoder(128, 3, seed=4, act="gelu")
    folder = tc.open_clip_folder(tmp_path / "oc", model, under_text=under_text, act="gelu")
    source, enc = loaded(folder)
    assert (source.encoder.layout, enc.config["hidden_act"], enc.config["num_attention_heads"]) == \
        ("open-clip", "gelu", 2)
    ids = tokenizer_of(source, enc)(["a photo of a cat", "an astronaut riding a horse on the moon"], 77)
    assert ids[0, -1] == 0  # OpenCLIP pads with 0
    prefix = "text." if under_text else ""
    state = {k.removeprefix(prefix): v for k, v in tc.to_open_clip(model, prefix).items()}
    expected = open_clip_reference(state, ids, heads=2, act=nnf.gelu)
    with torch.no_grad():
        features = enc.adapter.encode(enc.adapter.embed(ids))
        pooled = enc.adapter.pooled(features, ids)
    assert (features - expected).abs().max() < 1e-5
    eos = ids.argmax(dim=1)  # 49407 is the largest id
    assert (pooled - expected[torch.arange(2), eos] @ state["text_projection"]).abs().max() < 1e-5


def test_layer_minus_two_reads_the_penultimate_hidden_state(tmp_path: Path, encoders: dict) -> None:
    """--layer -2 gives transformers' hidden_states[-2] (no final LayerNorm); final gives last_hidden_state."""
    model = encoders["l"]
    path = tc.standalone_file(tmp_path / "clip_l.safetensors", model, torch.float32)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True)
        for flag, want in (("-2", reference.hidden_states[-2]), ("final", reference.last_hidden_state)):
            _, enc = loaded(path, layer=flag)
            assert (enc.adapter.encode(enc.adapter.embed(ids)) - want).abs().max() < 1e-5
            assert enc.details["layer"]["chosen_by"] == "--layer"


def test_shipped_family_configs_are_chosen_from_the_header_alone(tmp_path: Path) -> None:
    """A 2 GB SDXL-sized file that is all header and holes: the layout, both encoders' families (CLIP-L, bigG)
    and every shape check come from its first bytes; its data is never read."""
    from tests.test_checkpoints_hostile import sparse_checkpoint

    path = sparse_checkpoint(tmp_path / "sdxl.safetensors", size=2 * 1024**3)
    before = _bytes_read()
    inv = inventory(path)
    header = read_header(path)
    chosen = {p.name: choose_config(map_tower(p, header, path.name), path.name) for p in inv.parts}
    assert inv.layout == "sdxl-base" and inv.names == ["text_encoder", "text_encoder_2"]
    assert {n: (c.family, c.config["num_attention_heads"], c.config["hidden_act"], c.pad.value)
            for n, c in chosen.items()} == {"text_encoder": ("clip-l", 12, "quick_gelu", "eos"),
                                            "text_encoder_2": ("openclip-bigg", 20, "gelu", "zero")}
    if before is not None:
        assert _bytes_read() - before < 8 * 1024 * 1024  # the header and a few small files, not 2 GB
    assert path.stat().st_size == 2 * 1024**3 and os.stat(path).st_blocks * 512 < 64 * 1024 * 1024


def _bytes_read() -> int | None:
    try:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def test_pipeline_folder_lists_its_encoders_and_its_t5(tmp_path: Path, encoders: dict) -> None:
    """A diffusers SD 3 folder: text_encoder and text_encoder_2 scanned (final by default, hidden_states[-2] with
    --layer consumer), text_encoder_3 (T5) not."""
    root = tmp_path / "sd3"
    for name, which in (("text_encoder", "l"), ("text_encoder_2", "g")):
        tc.hf_folder(root / name, encoders[which])
    (root / "text_encoder_3").mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    assert scan_targets(str(root), None, EncoderOptions()) == ["text_encoder", "text_encoder_2"]
    source, enc = loaded(root, "text_encoder_2")
    assert source.subfolder == "text_encoder_2" and enc.details["layer"]["scanned"] == "final"
    assert loaded(root, "text_encoder_2", layer="consumer")[1].details["layer"]["scanned"] == "-2"
    assert [u.name for u in source.encoder.not_scanned] == ["text_encoder_3"]
    assert_same_tensors(enc, load_encoder(local_model(root / "text_encoder_2")))
    # --subfolder into the pipeline: the same encoder, the same layer, the T5 still listed
    sub = attach(resolve_source(str(root), subfolder="text_encoder"), EncoderOptions(layer="consumer"))
    assert sub.encoder.layer.name == "-2" and [u.name for u in sub.encoder.not_scanned] == ["text_encoder_3"]


def test_identity_names_the_encoder_of_a_multi_encoder_file(tmp_path: Path, encoders: dict) -> None:
    """One file, two encoders: each has its own identity (an allow entry for one never covers the other); a
    stand-alone file's identity is its sha256, as a folder's weights."""
    path = tc.sdxl_file(tmp_path / "sdxl.safetensors", encoders["l"], encoders["g"])
    ids = {}
    for name in ("text_encoder", "text_encoder_2"):
        source = attach(resolve_source(str(path)), EncoderOptions(encoder=name))
        files = identities(source)
        assert [w.name for w in files] == ["sdxl.safetensors"]
        ids[name] = source.encoder.identity(files)
    assert len(set(ids.values())) == 2 and sha256_file(path) not in ids.values()
    alone = tc.standalone_file(tmp_path / "clip_l.safetensors", encoders["l"])
    source = attach(resolve_source(str(alone)), EncoderOptions())
    assert source.encoder.identity(identities(source)) == sha256_file(alone)


def test_encoder_aliases_select_one(tmp_path: Path, encoders: dict) -> None:
    path = tc.sd3_file(tmp_path / "sd3.safetensors", encoders["l"], encoders["g"])
    assert scan_targets(str(path), None, EncoderOptions(encoder="clip_g")) == ["text_encoder_2"]
    assert scan_targets(str(path), None, EncoderOptions(encoder="text_encoder")) == ["text_encoder"]


def with_hole(tensors: dict[str, torch.Tensor], path: Path, hole: int) -> Path:
    """A safetensors file of `tensors` plus a `hole`-byte UNet tensor that is never written (a sparse file)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()})
    length = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8: 8 + length]), blob[8 + length:]
    header["model.diffusion_model.input_blocks.0.0.weight"] = {"dtype": "U8", "shape": [hole],
                                                               "data_offsets": [len(data), len(data) + hole]}
    text = json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text + data)
        fh.truncate(8 + len(text) + len(data) + hole)
    return path


def test_memory_is_bounded_by_the_encoder_not_the_file(tmp_path: Path, encoders: dict) -> None:
    """A 2 GB SDXL-style file whose UNet is a hole: loading each encoder touches its own tensors only
    (the process's peak memory grows by far less than the file)."""
    import resource

    tensors = {**tc.to_transformers(encoders["l"], "conditioner.embedders.0.transformer."),
               **tc.to_open_clip(encoders["g"], "conditioner.embedders.1.model.")}
    path = with_hole(tensors, tmp_path / "sd_xl_base.safetensors", 2 * 1024**3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name in ("text_encoder", "text_encoder_2"):
        _, enc = loaded(path, name)
        assert enc.config["hidden_size"] in (64, 128)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 512 * 1024**2, grown
