"""The gate pipeline around the scan: verdict cache, reports from a stored result, job summary, lock/verify,
the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import amdet_gate
from amdet_gate.errors import ExitCode, GateError
from tests.conftest import run_cli

PASS = ("--max-steps", "16", "--n-prompts", "40", "--restarts", "2", "-q", "--threshold", "same_target=1")


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_second_scan_is_a_cache_hit_and_a_changed_byte_rescans(tiny_dir: Path, tmp_path: Path) -> None:
    code, stdout, _ = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "a")
    assert code == 0 and "verdict cache" not in stdout
    first = json.loads((tmp_path / "a" / "result.json").read_text())
    code, stdout, _ = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "b")
    assert code == 0 and "verdict cache" in stdout
    second = json.loads((tmp_path / "b" / "result.json").read_text())
    assert second["search"] == first["search"] and second["model"]["identity_sha256"] == first["model"][
        "identity_sha256"]
    assert (tmp_path / "b" / "report.html").is_file() and (tmp_path / "b" / "result.sarif").is_file()
    # A flag that changes the scan changes the key.
    code, stdout, _ = run_cli("scan", tiny_dir, *PASS, "--seed", "3", "--out", tmp_path / "c")
    assert "verdict cache" not in stdout
    # One changed byte of the weights (the last byte of a float: still finite) forces a rescan.
    flip_last_byte(tiny_dir / "model.safetensors")
    code, stdout, _ = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "d")
    assert code == 0 and "verdict cache" not in stdout
    assert json.loads((tmp_path / "d" / "result.json").read_text())["model"]["identity_sha256"] != first["model"][
        "identity_sha256"]
    # --no-cache never reads it.
    code, stdout, _ = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "e", "--no-cache")
    assert "verdict cache" not in stdout


def test_tampered_cache_entry_is_ignored_and_rescanned(tiny_dir: Path, tmp_path: Path) -> None:
    run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "a")
    cache = tmp_path / "amdet-cache"
    stored = [p for p in cache.rglob("result.json")]
    assert len(stored) == 1
    data = json.loads(stored[0].read_text())
    data["score"] = 0.0
    stored[0].write_text(json.dumps(data))
    code, stdout, stderr = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "b")
    assert code == 0 and "verdict cache" not in stdout and "ignored" in stderr
    code, stdout, _ = run_cli("cache", "list")
    assert code == 0 and "1 entries" in stdout  # the rescan stored a fresh entry
    assert run_cli("cache", "clear")[0] == 0 and "0 entries" in run_cli("cache", "list")[1]


def test_report_rerenders_from_a_stored_result(tiny_dir: Path, tmp_path: Path) -> None:
    run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "o", "--no-cache")
    code, _, _ = run_cli("report", tmp_path / "o" / "result.json", "--html", tmp_path / "r.html",
                              "--sarif", tmp_path / "r.sarif", "--markdown", tmp_path / "r.md")
    assert code == 0
    assert (tmp_path / "r.sarif").read_text() == (tmp_path / "o" / "result.sarif").read_text()
    assert (tmp_path / "r.md").read_text() == (tmp_path / "o" / "summary.md").read_text()
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html  # the tokens card, read from the result's folder
    assert run_cli("report", tmp_path / "o" / "result.json")[0] == ExitCode.USAGE
    (tmp_path / "bad.json").write_text('{"verdict": "pass"}')
    code, _, stderr = run_cli("report", tmp_path / "bad.json", "--html", tmp_path / "x.html")
    assert code == ExitCode.USAGE and "not an amdet-gate result" in stderr


def test_job_summary_and_copies(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, _ = run_cli("scan", tiny_dir, *PASS, "--out", tmp_path / "o", "--html", tmp_path / "h" / "r.html",
                         "--markdown", tmp_path / "m.md", "--sarif", tmp_path / "s.sarif")
    assert code == 0
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "amdet-gate: ✅ PASS" in text
    assert (tmp_path / "h" / "r.html").read_bytes() == (tmp_path / "o" / "report.html").read_bytes()
    assert (tmp_path / "m.md").is_file() and (tmp_path / "s.sarif").is_file()


def test_local_lock_verify_and_python_api(tiny_dir: Path, tmp_path: Path) -> None:
    lock = tmp_path / "amdet.lock"
    outcome = amdet_gate.scan(str(tiny_dir), out=tmp_path / "o", lock=lock, max_steps=16, n_prompts=40,
                              restarts=2, thresholds={"same_target": 1.0})
    assert outcome.exit_code == 0 and outcome.result["verdict"] == "pass" and outcome.paths["html"].is_file()
    assert amdet_gate.verify(str(tiny_dir), lock=lock) == []
    assert run_cli("verify", tiny_dir, "--lock", lock)[0] == 0
    assert run_cli("lock", "check", lock)[0] == 0  # a local folder has no revision to pin
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    assert amdet_gate.verify(str(other), lock=lock)  # not in the lock
    flip_last_byte(tiny_dir / "model.safetensors")
    problems = amdet_gate.verify(str(tiny_dir), lock=lock)
    assert problems and "model.safetensors" in " ".join(problems)
    code, _, stderr = run_cli("verify", tiny_dir, "--lock", lock)
    assert code == ExitCode.FAIL and "model.safetensors" in stderr
    with pytest.raises(GateError) as info:
        amdet_gate.scan(str(tmp_path / "missing" / "model"), out=tmp_path / "x")
    assert info.value.exit_code == ExitCode.ERROR


def test_unpinned_hub_model_is_amdet100_before_any_download(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pin.yaml").write_text("version: 1\nrequire_pinned_revision: true\n")
    args = ("scan", "acme/some-model", "--revision", "main", "--policy", "pin.yaml", "-q", "--out", "o")
    code, _, stderr = run_cli(*args)
    assert code == ExitCode.FAIL and "pinned revision" in stderr
    sarif = json.loads((tmp_path / "o" / "result.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "AMDET100"
    assert "AMDET100" in (tmp_path / "o" / "summary.md").read_text()
    assert run_cli(*args, "--exit-zero")[0] == 0  # report-only turns every 1 into 0


def test_failed_run_leaves_no_stale_verdict(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run_cli("scan", tiny_dir, *PASS, "--out", out)[0] == 0
    assert json.loads((out / "result.json").read_text())["verdict"] == "pass"
    (tiny_dir / "config.json").write_text("{not json")
    code, _, _ = run_cli("scan", tiny_dir, *PASS, "--out", out)
    assert code == ExitCode.ERROR
    assert not (out / "result.json").exists() and not (out / "report.html").exists()
    sarif = json.loads((out / "result.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["ruleId"] == "AMDET003"  # could not decide


def test_api_and_report_refuse_bad_input(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GateError) as info:
        amdet_gate.scan(str(tiny_dir), out=tmp_path / "o", thresholds={"assimilation_ratio": 5})
    assert info.value.exit_code == ExitCode.USAGE
    result = json.loads((Path(__file__).parent / "data" / "sample_result.json").read_text())
    del result["model"]["weight_files"]
    (tmp_path / "broken.json").write_text(json.dumps(result))
    code, _, stderr = run_cli("report", tmp_path / "broken.json", "--sarif", tmp_path / "s.sarif")
    assert code == ExitCode.USAGE and "well-formed" in stderr
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\nallow:\n  - rule: AMDET100\n    sha256: {'a' * 64}\n    statement: x\n"
                      "    expires: '2099-01-01'\n")
    code, _, stderr = run_cli("policy", "validate", policy)
    assert code == ExitCode.USAGE and "line 3" in stderr


def test_pipeline_scan_renders_the_target_through_diffusion(tmp_path: Path) -> None:
    """A diffusers pipeline end to end: text encoder by subfolder, its sibling tokenizer, diffusion images."""
    from tests.tiny_pipelines import save_tiny_sd_pipeline

    pipe = save_tiny_sd_pipeline(tmp_path / "pipe")
    code, _, stderr = run_cli("scan", pipe, "--subfolder", "text_encoder", "--pipeline", pipe, "--render",
                              "diffusion", "--render-steps", "2", *PASS, "--out", tmp_path / "o")
    assert code == 0, stderr
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["model"]["tokenizer"] == "model folder"  # pipe/tokenizer, beside text_encoder
    images = [i["path"] for i in result["reversed_target"]["images"]]
    assert images == [f"images/diffusion_{i}.png" for i in range(4)] + ["images/tokens.png"]
    assert all((tmp_path / "o" / p).is_file() for p in images)
    assert (tmp_path / "o" / "report.html").read_text().count("data:image/png;base64,") == 5


def test_full_clip_checkpoint_renders_through_its_vision_tower(tmp_path: Path) -> None:
    from tests.tiny_pipelines import save_tiny_clip

    clip = tmp_path / "clip"
    save_tiny_clip(clip)
    code, _, stderr = run_cli("scan", clip, "--render-steps", "2", *PASS, "--out", tmp_path / "o")
    assert code == 0, stderr
    renderers = {i["renderer"] for i in json.loads((tmp_path / "o" / "result.json").read_text())[
        "reversed_target"]["images"]}
    assert renderers == {"clip-vision", "tokens"}


def test_weights_swapped_between_hashing_and_loading_are_refused(tiny_dir: Path) -> None:
    from amdet_gate.errors import LoadError
    from amdet_gate.scanner import ScanRequest, scan_model
    from amdet_gate.settings import SearchSettings
    from amdet_gate.sources.identity import WeightFile

    hashed_earlier = [WeightFile("model.safetensors", "0" * 64, 1)]  # what the gate hashed before loading
    with pytest.raises(LoadError, match="changed while"):
        scan_model(ScanRequest(model=tiny_dir, n_prompts=40, settings=SearchSettings(max_steps=1)),
                   weights=hashed_earlier)
