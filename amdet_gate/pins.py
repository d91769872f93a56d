"""Pinned revisions: `amdet-gate pins`, the cheap pre-commit / CI check that model references are pinned.

`pin_problems(path)` reads an amdet policy (its `anchor: {id, revision}`), a lock file (every
Hub entry needs a resolved_sha and a 40-hex revision: `lock.lock_pin_problems`) or a GitHub
Actions workflow (steps that use the amdet-gate action, inputs `model` + `revision` and
`anchor` + `anchor-revision`) and reports each Hub model that is not pinned to a 40-hex
commit as a `lock.Problem` with SARIF rule AMDET100. No model is read, nothing heavy is
imported (stdlib, yaml).

Policy and workflow files are untrusted: parsed with a safe YAML loader only (no Python
tags), size-capped, duplicate keys refused; the checks read YAML nodes, so every problem
names its line. A file that cannot be read or is none of the three kinds is a `LockError`
(a `UsageError`, exit 4).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from amdet_gate.files import read_capped_text
from amdet_gate.lock import MAX_LOCK_BYTES, UNPINNED, LockError, Problem, YamlLoader, lock_pin_problems, parse_lock
from amdet_gate.sanitise import one_line
from amdet_gate.sources.hub import COMMIT_SHA, is_hub_id

MAX_YAML_BYTES = 1024 * 1024
ACTION_MODEL_INPUTS = (("model", "revision"), ("anchor", "anchor-revision"))  # action.yml's inputs
_EXPRESSION = re.compile(r"\$\{\{.*\}\}")  # a GitHub Actions expression: its value is unknown here


def pin_problems(path: Path) -> list[Problem]:
    """Model references in a file that are not pinned to a 40-hex commit (`amdet-gate pins`).

    The file may be an amdet policy (its `anchor: {id, revision}`), a lock file (every Hub
    entry needs a resolved_sha and a 40-hex revision), or a GitHub Actions workflow (steps whose `uses:` is the
    amdet-gate action, `./` or a path ending in `amdet-gate`, with inputs `model` +
    `revision` and `anchor` + `anchor-revision`). Local paths need no pin: a name is a Hub
    id when it has the form org/name and no such path exists from the working folder (run
    from the repository root, as pre-commit does; write `./models/x` to be unambiguous).
    A model given as an expression (`${{ ... }}`) cannot be checked and is skipped; a
    revision given as an expression for a literal Hub id is a problem.

    Raises LockError (exit 4) for a file that cannot be read, is not valid, or is none of
    the three kinds.
    """
    path = Path(path)
    source = str(path)
    head = read_capped_text(path, MAX_LOCK_BYTES, "policy, lock or workflow file", LockError)
    if path.name.endswith(".lock") or head.lstrip().startswith("{"):
        return lock_pin_problems(parse_lock(head, source))
    if len(head.encode("utf-8")) > MAX_YAML_BYTES:
        raise LockError(f"{source}: larger than {MAX_YAML_BYTES // 1024} KiB")
    root = _load_yaml(head, source)
    if not isinstance(root, yaml.MappingNode):
        raise LockError(f"{source}: not an amdet policy, lock file or GitHub workflow (not a mapping)")
    top = _mapping(root)
    if "jobs" in top:
        return _workflow_pins(top["jobs"][1], source)
    if "version" in top or "anchor" in top:
        return _policy_pins(top, source)
    raise LockError(f"{source}: not an amdet policy, lock file or GitHub workflow")


def _load_yaml(text: str, source: str) -> yaml.Node | None:
    """Compose and safely construct the document (refuses Python tags), refusing duplicate keys."""
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_duplicates(node, source)
            loader.construct_document(node)  # only to refuse unsafe tags; the checks read nodes
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = one_line(getattr(exc, "problem", None) or exc, 200)
        raise LockError(f"{source}: {where}not valid YAML ({problem})") from None
    except RecursionError:
        raise LockError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()
    return node


def _check_duplicates(node: yaml.Node, source: str) -> None:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            names: set = set()
            for key, value in current.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                if name in names:
                    raise LockError(f"{source}: line {key.start_mark.line + 1}: duplicate key {name!r}")
                names.add(name)
                stack.extend((key, value))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)


def _mapping(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's scalar keys -> (key node, value node); {} for anything else."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _scalar(node: yaml.Node | None) -> str | None:
    """A scalar's text (null and empty as None); None for mappings and sequences."""
    if not isinstance(node, yaml.ScalarNode) or node.tag.endswith(":null"):
        return None
    return node.value if node.value != "" else None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _unpinned(model: str, revision: str | None) -> str | None:
    """Why a literal Hub model reference is not pinned, or None (pinned, or a local path)."""
    if not is_hub_id(model):
        return None
    if revision is None:
        return f"{model} has no revision (the default branch, which can move)"
    if _EXPRESSION.search(revision):
        return f"{model} has revision {revision!r}, an expression that cannot be checked here"
    if not COMMIT_SHA.fullmatch(revision):
        return f"{model} has revision {revision!r}, not a 40-hex commit sha"
    return None


def _policy_pins(top: dict[str, tuple[yaml.Node, yaml.Node]], source: str) -> list[Problem]:
    if "anchor" not in top:
        return []
    anchor = top["anchor"][1]
    fields = _mapping(anchor)
    model = _scalar(fields.get("id", (None, None))[1])
    if model is None:
        return []
    rev_key, rev_node = fields.get("revision", (None, None))
    why = _unpinned(model, _scalar(rev_node))
    if why is None:
        return []
    line = _line(rev_key) if rev_key is not None else _line(fields["id"][0])
    return [Problem(source, line, f"anchor {why}; set anchor.revision to the commit sha", UNPINNED)]


def _is_amdet_action(uses: str) -> bool:
    """`./`, or an action path whose last component is amdet-gate (owner/amdet-gate@ref, ./x/amdet-gate)."""
    if uses.startswith("docker://"):
        return False
    where = uses.split("@", 1)[0].strip()
    if where in (".", "./"):
        return True
    return where.rstrip("/").rsplit("/", 1)[-1].lower() == "amdet-gate"


def _workflow_pins(jobs: yaml.Node, source: str) -> list[Problem]:
    problems = []
    for _name, (_, job) in _mapping(jobs).items():
        steps = _mapping(job).get("steps", (None, None))[1]
        if not isinstance(steps, yaml.SequenceNode):
            continue
        for step in steps.value:
            fields = _mapping(step)
            uses = _scalar(fields.get("uses", (None, None))[1])
            if uses is None or not _is_amdet_action(uses):
                continue
            inputs = _mapping(fields.get("with", (None, None))[1])
            for name, rev_name in ACTION_MODEL_INPUTS:
                model = _scalar(inputs.get(name, (None, None))[1])
                if model is None or _EXPRESSION.search(model):
                    continue  # no such input, or one only known when the workflow runs
                rev_key, rev_node = inputs.get(rev_name, (None, None))
                why = _unpinned(model, _scalar(rev_node))
                if why is not None:
                    line = _line(rev_key) if rev_key is not None else _line(inputs[name][0])
                    problems.append(Problem(source, line, f"step `uses: {uses}`: {name} {why}; "
                                            f"set `{rev_name}:` to the commit sha", UNPINNED))
    return problems
