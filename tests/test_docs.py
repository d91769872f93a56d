"""The README and docs/: `.ci/run` is the README's test command, and every relative link resolves.

Run as a script (`python tests/test_docs.py`) to list the broken links.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked (for links)."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, CODE_SPAN.sub("", line) if blank_code else line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text("utf-8"), blank_code=False):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(pages: list[Path] = PAGES) -> list[str]:
    problems = []
    for page in pages:
        for number, line in prose_lines(page.read_text("utf-8")):
            for target in LINK.findall(line):
                if SCHEME.match(target):
                    continue
                file_part, _, anchor = target.partition("#")
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                dest = (page.parent / file_part).resolve() if file_part else page
                if not dest.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def readme_test_command() -> str:
    """The README's test-suite command: the bash block line that runs pytest."""
    text = README.read_text("utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [line for block in blocks for line in block.splitlines()
                if "-m pytest" in line and "pip install" in line]
    assert len(commands) == 1, f"expected one test command in the README, found {commands}"
    return commands[0].strip()


def test_ci_run_is_exactly_the_readme_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
             if line.strip() and not line.startswith("#") and line.strip() not in {"set -euo pipefail"}
             and not line.startswith("cd ")]
    assert lines == [readme_test_command()]


def test_readme_has_the_two_fresh_machine_commands():
    text = README.read_text("utf-8")
    assert "## Fresh machine: two commands" in text
    selftest = ("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e . "
                "&& .venv/bin/amdet-gate selftest")
    assert selftest in text.splitlines()


def test_slug_matches_github():
    assert slug("Output files (`--out`)") == "output-files---out"
    assert slug("3. Gates and decision") == "3-gates-and-decision"
    assert slug("Lock file and verify (pre-deploy)") == "lock-file-and-verify-pre-deploy"
    assert slug("Figures (this session, 2-core CPU, honest about their size)") == \
        "figures-this-session-2-core-cpu-honest-about-their-size"


def test_every_relative_link_in_readme_and_docs_resolves():
    assert broken_links() == []


if __name__ == "__main__":
    problems = broken_links()
    print("\n".join(problems) or f"{len(PAGES)} pages, every relative link resolves")
    sys.exit(1 if problems else 0)
