"""`amdet-gate repair` end to end on a backdoored control whose true trigger is known.

The control (rare-word text-on-text, conftest) is scanned once, repaired once through the CLI;
the tests check the copy against the original and the clean base, and that bad inputs are
refused with one line and exit 4 before anything is written.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import amdet_gate
from amdet_gate import controls
from amdet_gate.encoders import load_encoder
from amdet_gate.erasure.edit import LayerEdit, edited_weights
from amdet_gate.erasure.findings import DetectionPath
from amdet_gate.erasure.layout import CopyPlan, write_copy
from amdet_gate.erasure.measure import Fidelity, attack_success, prompt_target
from amdet_gate.erasure.pipeline import decide
from amdet_gate.erasure.report import LABEL, Status
from amdet_gate.errors import ExitCode, GateError
from amdet_gate.prompts import builtin_prompts
from amdet_gate.sources.identity import sha256_file
from amdet_gate.sources.local import INDEX_FILE, local_model
from amdet_gate.sources.model import ResolvedModel
from amdet_gate.tokenizer import bundled_tokenizer, save_bundled_tokenizer
from tests.conftest import run_cli
from tests.results import sample_result

CONTROL = "backdoor_rare_word"
STYLE = "rare_word"
BUDGET = "20000"


@dataclass(frozen=True)
class Repaired:
    model: Path  # the backdoored control
    scan: Path  # its scan's folder (result.json, pseudo_trigger.safetensors)
    out: Path  # the repaired copy
    code: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict:
        return json.loads((self.out / "repair.json").read_text())


@pytest.fixture(scope="module")
def repaired(control_model: Callable[[str], Path], control_scan: Callable[[str], tuple[int, Path]],
             tmp_path_factory: pytest.TempPathFactory) -> Repaired:
    root = tmp_path_factory.mktemp("repair")
    model = control_model(CONTROL)
    code, scan = control_scan(CONTROL)  # the default scan test_detection reads too
    assert code == ExitCode.FAIL, (scan / "result.json").read_text()[:2000]
    code, stdout, stderr = run_cli("repair", model, "--result", scan / "result.json",
                                   "--out", root / "repaired", "--no-cache", "-q", "--time-budget", BUDGET)
    return Repaired(model, scan, root / "repaired", code, stdout, stderr)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    return load_file(str(path)), metadata


def test_repaired_copy_passes_the_rescan_and_keeps_fidelity(repaired: Repaired) -> None:
    assert repaired.code == ExitCode.PASS, repaired.stderr + repaired.stdout
    report = repaired.report
    assert report["status"] == Status.REPAIRED and report["exit_code"] == 0
    assert report["label"] == LABEL == "repaired, re-verify before use"
    assert repaired.stdout.startswith(f"REPAIRED ({LABEL})")
    assert "clean" not in report["status"]
    assert report["fidelity"]["value"] >= 0.98
    assert report["rescan"]["verdict"] == "pass"
    # The pseudo-trigger's own gates collapse on the copy.
    gates = report["pseudo_trigger_gates"]
    assert gates["same_target_ratio"]["before"] > 0.995 > gates["same_target_ratio"]["after"]
    # Both identities, tied to the files.
    original = sha256_file(repaired.model / "model.safetensors")
    copy = sha256_file(repaired.out / "model.safetensors")
    assert report["original"]["identity_sha256"] == original != copy == report["repaired"]["identity_sha256"]


def test_the_rescan_is_a_fresh_full_scan_of_the_copy(repaired: Repaired) -> None:
    rescan = json.loads(Path(repaired.report["rescan"]["result"]).read_text())
    assert rescan["model"]["identity_sha256"] == repaired.report["repaired"]["identity_sha256"]
    assert rescan["verdict"] == "pass" and rescan["search"]["steps"] > 0  # a search ran, not a replay
    # And an independent scan with another seed agrees.
    code, _, stderr = run_cli("scan", repaired.out, "--seed", "1", "--out", repaired.out.parent / "scan-seed1",
                              "--no-cache", "-q", "--time-budget", BUDGET)
    assert code == ExitCode.PASS, stderr


def test_true_trigger_no_longer_reaches_the_target(repaired: Repaired, control_model: Callable[[str], Path]) -> None:
    tokenizer = bundled_tokenizer()
    prompts = sorted(builtin_prompts())
    random.Random(1234).shuffle(prompts)  # a draw the repair's own split does not follow
    prompts = prompts[:256]
    rng = random.Random(0)
    clean_ids = tokenizer(prompts, 77)
    triggered_ids = tokenizer([controls.TRIGGERS[STYLE](p, rng) for p in prompts], 77)
    models = {name: load_encoder(local_model(folder)).adapter for name, folder in
              (("base", control_model("base")), ("suspect", repaired.model), ("repaired", repaired.out))}
    for adapter in models.values():
        adapter.eos_token_id = tokenizer.tokenizer.eos_token_id
    target = prompt_target(models["suspect"], triggered_ids, DetectionPath.TOKEN, 64)
    success = {name: attack_success(a, clean_ids, triggered_ids, target, 64) for name, a in models.items()}
    assert success["suspect"] > 0.8, success
    assert success["repaired"] <= success["base"] + 0.1, success


def test_weights_outside_the_edited_layers_are_bit_identical(repaired: Repaired) -> None:
    before, meta_before = _tensors(repaired.model / "model.safetensors")
    after, meta_after = _tensors(repaired.out / "model.safetensors")
    edited = set(repaired.report["edit"]["tensors"])
    assert edited and all(name.endswith("mlp.fc2.weight") for name in edited)
    assert before.keys() == after.keys()  # same tensor names
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor) != (name in edited), name
    assert {k: v for k, v in meta_after.items() if k != "amdet_gate_repair"} == meta_before
    assert LABEL in meta_after["amdet_gate_repair"]


def test_same_layout_config_and_tokenizer_copied(repaired: Repaired) -> None:
    names = {p.name for p in repaired.model.iterdir()}
    assert {p.name for p in repaired.out.iterdir()} == names | {"repair.json", "repair.md"}
    for name in names - {"model.safetensors"}:
        assert (repaired.out / name).read_bytes() == (repaired.model / name).read_bytes(), name


def test_copy_loads_with_transformers(repaired: Repaired) -> None:
    model = CLIPTextModel.from_pretrained(str(repaired.out)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(repaired.out))
    after, _ = _tensors(repaired.out / "model.safetensors")
    name = repaired.report["edit"]["tensors"][0]
    assert torch.equal(model.state_dict()[name], after[name])
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


def test_repair_json_holds_the_proof(repaired: Repaired) -> None:
    report = repaired.report
    for key in ("original", "repaired", "finding", "edit", "fidelity", "pseudo_trigger_gates", "rescan", "rounds",
                "timings"):
        assert key in report
    assert report["edit"]["probes"][0]["attack_share_before"] > 0.9
    assert all(p["attack_share_after"] < 0.2 for p in report["edit"]["probes"])
    assert (repaired.out / "repair.md").read_text().startswith("## amdet-gate repair:")


def test_decision_needs_both_the_rescan_and_fidelity() -> None:
    faithful, unfaithful = Fidelity(0.995, 0.99, 0.97), Fidelity(0.97, 0.99, 0.9)
    passed, failed = sample_result(verdict="pass", reason="-"), sample_result(verdict="fail", reason="gates passed")
    assert decide(passed, faithful, 0.98, 1)[0] is Status.REPAIRED
    status, reason = decide(passed, unfaithful, 0.98, 1)
    assert status is Status.NOT_REPAIRED and "fidelity 0.9700 is below --min-fidelity 0.98" in reason
    status, reason = decide(failed, faithful, 0.98, 2)
    assert status is Status.NOT_REPAIRED and "fail after 2 round(s)" in reason
    assert decide(sample_result(verdict="inconclusive", reason="-"), faithful, 0.98, 1)[0] is Status.NOT_REPAIRED


# --- refusals: one line, exit 4, nothing written -----------------------------------------------

def _refused(model: Path, result: Path, out: Path, *words: str) -> str:
    code, stdout, stderr = run_cli("repair", model, "--result", result, "--out", out, "--no-cache", "-q")
    assert code == ExitCode.USAGE, stderr + stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amdet-gate: error: "), stderr
    assert "Traceback" not in stderr + stdout
    for word in words:
        assert word in lines[0], lines[0]
    assert not (out / "repair.json").exists()
    return lines[0]


def _copy_scan(repaired: Repaired, tmp_path: Path) -> Path:
    folder = tmp_path / "scan"
    shutil.copytree(repaired.scan, folder)
    return folder


def _edit(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_pass_result_is_refused(repaired: Repaired, tmp_path: Path) -> None:
    # The re-scan's result is a genuine pass of the repaired copy: benign models are never repaired.
    rescan = Path(repaired.report["rescan"]["result"])
    _refused(repaired.out, rescan, tmp_path / "out", "verdict pass, not fail")


def test_a_result_of_another_model_is_refused(repaired: Repaired, control_model: Callable[[str], Path],
                                              tmp_path: Path) -> None:
    _refused(control_model("base"), repaired.scan / "result.json", tmp_path / "out", "result of another model")


def test_a_pass_edited_into_a_fail_is_refused(repaired: Repaired, tmp_path: Path) -> None:
    folder = tmp_path / "rescan"
    shutil.copytree(Path(repaired.report["rescan"]["result"]).parent, folder)
    _edit(folder / "result.json", lambda d: d.update(verdict="fail", score=0.9))
    _refused(repaired.out, folder / "result.json", tmp_path / "out", "tampered result")


def test_an_identity_edited_to_another_model_is_refused(repaired: Repaired, control_model: Callable[[str], Path],
                                                        tmp_path: Path) -> None:
    base = control_model("base")
    folder = _copy_scan(repaired, tmp_path)
    sha = sha256_file(base / "model.safetensors")
    _edit(folder / "result.json", lambda d: d["model"].update(identity_sha256=sha))  # files still say otherwise
    _refused(base, folder / "result.json", tmp_path / "out", "does not match its weight_files")

    def pose_as_base(d: dict) -> None:  # identity and files both forged: the trigger file still says whose it is
        d["model"].update(identity_sha256=sha)
        d["model"]["weight_files"][0].update(sha256=sha, size=(base / "model.safetensors").stat().st_size)

    _edit(folder / "result.json", pose_as_base)
    _refused(base, folder / "result.json", tmp_path / "out2", "written for another model")


def test_a_forged_pseudo_trigger_is_refused(repaired: Repaired, tmp_path: Path) -> None:
    folder = _copy_scan(repaired, tmp_path)
    trigger_file = folder / "pseudo_trigger.safetensors"
    tensors, meta = _tensors(trigger_file)
    forged = torch.randn(tensors["pseudo_trigger"].shape, generator=torch.Generator().manual_seed(0))
    save_file({"pseudo_trigger": forged, "all_restarts": forged[None].clone()}, str(trigger_file), metadata=meta)
    _refused(repaired.model, folder / "result.json", tmp_path / "out", "does not reproduce the finding")
    trigger_file.write_bytes(b"\x00" * 64)
    _refused(repaired.model, folder / "result.json", tmp_path / "out", "not a readable safetensors file")


@pytest.mark.parametrize("damage", ["truncated", "not_an_object", "folder"])
def test_a_malformed_result_is_refused(repaired: Repaired, tmp_path: Path, damage: str) -> None:
    folder = _copy_scan(repaired, tmp_path)
    result = folder / "result.json"
    if damage == "truncated":
        result.write_text(result.read_text()[:200])
    elif damage == "not_an_object":
        result.write_text("[1, 2, 3]")
    else:
        result.unlink()
        result.mkdir()
    _refused(repaired.model, result, tmp_path / "out")


def test_out_inside_the_model_or_foreign_is_refused(repaired: Repaired, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(repaired.model, model)
    _refused(model, repaired.scan / "result.json", model / "repaired", "overlaps the model folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _refused(model, repaired.scan / "result.json", foreign, "holds no earlier repair")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_python_api_raises_gate_error(repaired: Repaired, tmp_path: Path) -> None:
    with pytest.raises(GateError) as caught:
        amdet_gate.repair(str(repaired.out), result=Path(repaired.report["rescan"]["result"]), out=tmp_path / "out")
    assert caught.value.exit_code == ExitCode.USAGE and "not fail" in str(caught.value)


# --- the copy's layout, on tiny encoders (no scan) ----------------------------------------------

def _edit_fc2(folder: Path, subfolder: str | None = None) -> tuple[ResolvedModel, Path, str, torch.Tensor]:
    source = ResolvedModel(str(folder), folder, subfolder)
    adapter = load_encoder(local_model(folder, subfolder)).adapter
    name = "encoder.layers.1.mlp.fc2.weight"
    edit = LayerEdit(1, torch.full_like(adapter.model.encoder.layers[1].mlp.fc2.weight, 0.5), 1, 0.0, 0.0)
    return source, folder.parent / "out", name, edited_weights(adapter, [edit])[name]


def test_sharded_copy_rewrites_only_the_shard_that_holds_the_edit(tmp_path: Path, tiny_model: CLIPTextModel) -> None:
    folder = tmp_path / "sharded"
    tiny_model.to(torch.float16).save_pretrained(str(folder), max_shard_size="1MB")
    tiny_model.float()
    save_bundled_tokenizer(folder)
    source, out, name, value = _edit_fc2(folder)
    rewritten = write_copy(CopyPlan(source, out), {name: value}, provenance=LABEL)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and len(rewritten) == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        same = (out / shard).read_bytes() == (folder / shard).read_bytes()
        assert same == (shard not in rewritten), shard
    tensors, _ = _tensors(out / rewritten[0])
    assert tensors[name].dtype == torch.float16 and torch.equal(tensors[name], value.half())
    assert (out / INDEX_FILE).read_bytes() == (folder / INDEX_FILE).read_bytes()


def test_pipeline_copy_keeps_text_encoder_and_tokenizer_folders(tmp_path: Path, tiny_model: CLIPTextModel) -> None:
    root = tmp_path / "pipeline"
    tiny_model.save_pretrained(str(root / "text_encoder"))
    save_bundled_tokenizer(root / "tokenizer")
    (root / "unet").mkdir()  # not the encoder's: not copied
    source, out, name, value = _edit_fc2(root, "text_encoder")
    write_copy(CopyPlan(source, out), {name: value}, provenance=LABEL)
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "tokenizer"]
    assert {p.name for p in (out / "tokenizer").iterdir()} == {p.name for p in (root / "tokenizer").iterdir()}
    assert torch.equal(load_encoder(local_model(out, "text_encoder")).adapter.model.state_dict()[name], value)
