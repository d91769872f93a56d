"""The YAML policy: validated against a shipped JSON Schema, errors name the line and key.

Precedence for every setting: command-line flag > `AMDET_*` environment variable > policy
file > built-in default. The policy text is untrusted: safe YAML only, a size limit,
duplicate keys refused (YAML would silently keep the last one), dates kept as strings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from amdet_gate.errors import ExitCode, UsageError
from amdet_gate.files import read_capped_text
from amdet_gate.result import AllowedBy, PolicyDecision, Verdict
from amdet_gate.settings import SearchSettings, Thresholds

MAX_POLICY_BYTES = 1024 * 1024
ENV_SETTINGS = {  # AMDET_* variable -> (section, key, type)
    "AMDET_SEED": ("scan", "seed", int),
    "AMDET_RESTARTS": ("scan", "restarts", int),
    "AMDET_MAX_STEPS": ("scan", "max_steps", int),
    "AMDET_TIME_BUDGET": ("scan", "time_budget_s", float),
    "AMDET_DEVICE": ("scan", "device", str),
    "AMDET_N_PROMPTS": ("scan", "n_prompts", int),
    "AMDET_ON_FINDING": (None, "on_finding", str),
    "AMDET_ON_INCONCLUSIVE": (None, "on_inconclusive", str),
    "AMDET_ON_UNSCANNED": (None, "on_unscanned", str),
}


class PolicyError(UsageError):
    """An invalid policy: exit 4, with the file, line and key in the message."""


@dataclass(frozen=True)
class AllowEntry:
    rule: str
    sha256: str
    statement: str
    expires: date
    line: int


@dataclass(frozen=True)
class ScanDefaults:
    """The policy's `scan` section; search defaults come from the engine's own settings."""

    seed: int = SearchSettings.seed
    restarts: int = SearchSettings.restarts
    max_steps: int = SearchSettings.max_steps
    time_budget_s: float = SearchSettings.time_budget_s
    device: str = "auto"
    n_prompts: int = 4000


@dataclass(frozen=True)
class Policy:
    source: str  # the file, or "built-in default"
    sha256: str  # of the effective policy, for cache keys and the report
    on_finding: str = "fail"
    on_inconclusive: str = "fail"
    # A model component that was not scanned (a T5 encoder beside the CLIP ones): warn (reported, visibly)
    # or fail (exit 1). Never a silent pass either way.
    on_unscanned: str = "warn"
    require_pinned_revision: bool = False
    anchor: dict | None = None
    scan: ScanDefaults = field(default_factory=ScanDefaults)
    thresholds: Thresholds = field(default_factory=Thresholds)
    allow: tuple[AllowEntry, ...] = ()

    def allowed(self, rule: str, sha256: str) -> AllowEntry | None:
        return next((a for a in self.allow if a.rule == rule and a.sha256 == sha256), None)


class _Loader(yaml.SafeLoader):
    """Safe YAML where dates stay strings (validated by the schema, parsed by us)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _schema() -> dict:
    return json.loads(resources.files("amdet_gate").joinpath("schemas/policy.schema.json").read_text("utf-8"))


def _lines(node: yaml.Node, path: tuple = (), seen_nodes: set[int] | None = None) -> dict[tuple, int]:
    """Map every key path to its 1-based line; refuse duplicate keys and aliases.

    An alias makes two paths share one node; nested aliases ("billion laughs") would make
    this walk exponential, and a policy has no use for them.
    """
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        raise PolicyError(f"line {node.start_mark.line + 1}: YAML anchors and aliases are not allowed in a policy")
    seen_nodes.add(id(node))
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            name = key.value
            if name in seen:
                raise PolicyError(f"line {key.start_mark.line + 1}: duplicate key {name!r}")
            seen.add(name)
            out[(*path, name)] = key.start_mark.line + 1
            out.update({k: v for k, v in _lines(value, (*path, name), seen_nodes).items() if k != (*path, name)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_lines(item, (*path, i), seen_nodes))
    return out


def _where(error: jsonschema.ValidationError, lines: dict[tuple, int]) -> tuple[int, str]:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            key = (*path, extra[0])
            return lines.get(key, lines.get(path, 1)), ".".join(map(str, key))
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1), ".".join(map(str, path)) or "(top level)"


def non_finite(data: object, path: tuple = ()) -> tuple | None:
    """The key path of the first NaN or infinity in plain data, else None.

    JSON Schema's `minimum`/`maximum` let NaN through (every comparison with NaN is false), and a
    NaN threshold or budget silently disables the check it feeds: refused wherever a setting is read.
    """
    if isinstance(data, float) and not math.isfinite(data):
        return path
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = non_finite(value, (*path, key))
        if found is not None:
            return found
    return None


def require_finite(label: str, value: object) -> None:
    """A setting from a flag, a variable or the API: NaN and infinities are usage errors (exit 4)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyError(f"{label}={value!r}: not a finite number")


def parse_policy(text: str, source: str) -> dict:
    """YAML text -> validated plain data (raises PolicyError naming line and key)."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: larger than 1 MiB")
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "parse error"
        raise PolicyError(f"{source}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if node is None or data is None:
        raise PolicyError(f"{source}: the policy is empty (it needs at least `version: 1`)")
    try:
        lines = _lines(node)
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(data),
                    key=lambda e: _where(e, lines)[0])
    if errors:
        line, key = _where(errors[0], lines)
        raise PolicyError(f"{source}: line {line}: {key}: {errors[0].message}")
    bad = non_finite(data)
    if bad is not None:
        raise PolicyError(f"{source}: line {lines.get(bad, 1)}: {'.'.join(map(str, bad))}: not a finite number "
                          "(NaN and infinity are refused)")
    for i, entry in enumerate(data.get("allow") or []):
        try:
            date.fromisoformat(entry["expires"])
        except ValueError:
            raise PolicyError(f"{source}: line {lines[('allow', i, 'expires')]}: allow[{i}].expires: "
                              f"{entry['expires']!r} is not a date") from None
    data["_lines"] = lines
    return data


def load_policy(path: Path | None, env: Mapping[str, str], today: date) -> Policy:
    """The effective policy: file (or defaults), then AMDET_* variables on top."""
    if path is None and env.get("AMDET_POLICY"):
        path = Path(env["AMDET_POLICY"])
    if path is None:
        data: dict = {"version": 1, "_lines": {}}
        source = "built-in default"
    else:
        text = read_capped_text(path, MAX_POLICY_BYTES, "policy", PolicyError)
        data = parse_policy(text, str(path))
        source = str(path)
    lines = data.pop("_lines")
    scan = dict(data.get("scan") or {})
    top = {k: data[k] for k in ("on_finding", "on_inconclusive", "on_unscanned") if k in data}
    for var, (section, key, kind) in ENV_SETTINGS.items():
        if var in env:
            try:
                value = kind(env[var])
            except ValueError:
                raise PolicyError(f"{var}={env[var]!r} is not a valid {kind.__name__}") from None
            require_finite(var, value)
            (scan if section == "scan" else top)[key] = value
    checked = {"version": 1, **top, "scan": scan}
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(checked))
    if errors:
        raise PolicyError(f"environment: {'.'.join(map(str, errors[0].absolute_path))}: {errors[0].message}")
    allow = []
    for i, entry in enumerate(data.get("allow") or []):
        expires = date.fromisoformat(entry["expires"])
        line = lines.get(("allow", i), 0)
        if expires < today:
            raise PolicyError(f"{source}: line {line}: allow[{i}] for {entry['rule']} expired on {expires}; "
                              "renew or remove it")
        allow.append(AllowEntry(entry["rule"], entry["sha256"], entry["statement"], expires, line))
    effective = {**data, **top, "scan": scan}
    digest = hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()
    known = {f.name for f in fields(ScanDefaults)}
    return Policy(
        source=source, sha256=digest,
        on_finding=top.get("on_finding", "fail"), on_inconclusive=top.get("on_inconclusive", "fail"),
        on_unscanned=top.get("on_unscanned", "warn"),
        require_pinned_revision=bool(data.get("require_pinned_revision", False)),
        anchor=data.get("anchor"),
        scan=ScanDefaults(**{k: v for k, v in scan.items() if k in known}),
        thresholds=Thresholds(**(data.get("thresholds") or {})),
        allow=tuple(allow),
    )


STARTER_POLICY = """\
# amdet-gate policy (validated against amdet_gate/schemas/policy.schema.json)
version: 1
on_finding: fail            # fail | warn: what an injected backdoor does to the exit code
on_inconclusive: fail       # fail | warn: fail closed unless you accept undecided scans
on_unscanned: warn          # fail | warn: a component that cannot be scanned (a T5 encoder)
require_pinned_revision: false
# anchor: {id: path/or/org-name, revision: <40-hex sha>}   # clean reference encoder
scan:
  seed: 0
  restarts: 4               # random starts optimised together
  max_steps: 640
  time_budget_s: 900        # a scan that runs out is inconclusive
  device: auto              # auto | cpu | cuda[:N]
thresholds:                 # names as in docs/method.md section 3
  assimilation: 0.8
  assimilation_ratio: 0.8
  same_target: 0.92
  same_target_ratio: 0.995
  anchor_difference_ratio: 0.95
  landscape_positive_ratio: 0.8
  pooled_same_target: 0.98       # the pooled path (text-on-pair backdoors)
  pooled_same_target_ratio: 0.5
allow: []                   # accepted findings, keyed by rule + weight sha256:
#  - rule: AMDET001
#    sha256: <sha256 of the weight file>
#    statement: "why this is accepted, and by whom"
#    expires: 2027-03-31    # an expired entry is an error, not silently ignored
"""


def apply_policy(verdict: str, identity_sha256: str, policy: Policy) -> PolicyDecision:
    """The exit code a verdict gets, and why: allow entries, then on_finding / on_inconclusive."""
    verdict = Verdict(verdict)
    if verdict is Verdict.PASS:
        return PolicyDecision(ExitCode.PASS, verdict)
    rule, setting, code = (("AMDET001", policy.on_finding, ExitCode.FAIL) if verdict is Verdict.FAIL
                           else ("AMDET003", policy.on_inconclusive, ExitCode.ERROR))
    entry = policy.allowed(rule, identity_sha256)
    if entry is not None:
        allowed = AllowedBy(rule, policy.source, entry.line, entry.expires.isoformat(), entry.statement)
        return PolicyDecision(ExitCode.PASS, verdict, allowed=allowed, note=allowed.justification())
    if setting == "warn":
        key = "on_finding" if verdict is Verdict.FAIL else "on_inconclusive"
        return PolicyDecision(ExitCode.PASS, verdict, warn_only=True,
                              note=f"{rule} reported as a warning ({key}: warn)")
    return PolicyDecision(code, verdict)
