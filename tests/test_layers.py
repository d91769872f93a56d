"""The package's layers: no import circle, and no import that points up (docs/development.md#layers).

Every import counts, at the top of a module, inside a function or under TYPE_CHECKING: a lazy import
that points up is still a circle, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "amdet_gate"

# What a layer may not import: a module under the key's prefix never imports one under these.
BELOW = {
    "amdet_gate.sources": ("amdet_gate.checkpoints", "amdet_gate.encoders", "amdet_gate.engine", "amdet_gate.scanner",
                           "amdet_gate.gate", "amdet_gate.multiscan", "amdet_gate.cli", "amdet_gate.tokenizer"),
    "amdet_gate.encoders": ("amdet_gate.checkpoints", "amdet_gate.engine", "amdet_gate.scanner", "amdet_gate.gate",
                            "amdet_gate.multiscan", "amdet_gate.cli"),
    "amdet_gate.engine": ("amdet_gate.checkpoints", "amdet_gate.scanner", "amdet_gate.gate", "amdet_gate.multiscan",
                          "amdet_gate.cli", "amdet_gate.verdict"),
    "amdet_gate.checkpoints": ("amdet_gate.scanner", "amdet_gate.gate", "amdet_gate.multiscan", "amdet_gate.cli"),
    "amdet_gate.scanner": ("amdet_gate.gate", "amdet_gate.multiscan", "amdet_gate.cli"),
    "amdet_gate.multiscan": ("amdet_gate.gate", "amdet_gate.cli"),
    "amdet_gate.gate": ("amdet_gate.cli",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1],
                                     *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {t for t in map(owner, targets) if t is not None and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circle() -> None:
    assert _circles(_graph()) == []


def test_no_import_points_up() -> None:
    upward = sorted((name, target) for name, targets in _graph().items() for layer, above in BELOW.items()
                    if name == layer or name.startswith(layer + ".") for target in targets
                    if any(target == a or target.startswith(a + ".") for a in above))
    assert upward == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
