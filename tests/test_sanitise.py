"""The one sanitiser: untrusted text never reaches a terminal, log, Markdown, HTML or SARIF raw."""

from __future__ import annotations

import unicodedata

import pytest

from amdet_gate.sanitise import md_text, one_line, uri_path, visible

# What a hostile folder, token or config value can carry: a GitHub workflow command on a new line,
# terminal escapes, bidi overrides, zero-width characters, NUL, C1 controls, an undecodable byte.
HOSTILE = ["evil\n::error file=x::pwned", "a\r::warning::b", "\x1b[2J\x1b]0;title\x07", "ab\u202ecd",
           "zero\u200bwidth", "nul\x00byte", "c1\x85\x9bctl", "sep\u2028line\u2029para", "bad\udcffbyte",
           "tab\tand\vform\x0c", "\u2066isolate\u2069", "private\ue000use"]


def _raw_hidden(text: str) -> list[str]:
    return [ch for ch in text if ch != " " and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn",
                                                                          "Zl", "Zp", "Zs")]


@pytest.mark.parametrize("text", HOSTILE)
def test_one_line_leaves_no_hidden_character(text: str) -> None:
    line = one_line(text)
    assert _raw_hidden(line) == [] and "\n" not in line
    assert not line.startswith("::")
    print(line)  # printable (a lone surrogate would raise UnicodeEncodeError here)


def test_one_line_shows_what_was_hidden_and_cuts_long_text() -> None:
    assert one_line("evil\n::error file=x::pwned") == "evil ::error file=x::pwned"
    assert one_line("a\x1b[2Jb\u202ec") == "a\\u001b[2Jb\\u202ec"
    assert one_line("y" * 100, 10) == "y" * 9 + "…"
    assert one_line(None) == "None"
    assert len(one_line("x" * 10_000_000)) < 70_000  # bounded work on a hostile megabyte string


@pytest.mark.parametrize("text", [*HOSTILE, "![x](https://tracker.example/p.png)", "<img src=x onerror=alert(1)>"])
def test_markdown_text_is_one_inert_line(text: str) -> None:
    md = md_text(text)
    assert _raw_hidden(md) == [] and "<" not in md and "](" not in md


def test_visible_keeps_text_and_escapes_hidden_characters() -> None:
    assert visible("ab\u202ecd\u200bef\x1b[31m") == "ab\\u202ecd\\u200bef\\u001b[31m"
    assert visible("plain text, ünïcode, 猫") == "plain text, ünïcode, 猫"


def test_uri_path_percent_encodes() -> None:
    assert uri_path("models/evil\n::error::x/model.safetensors") == "models/evil%0A%3A%3Aerror%3A%3Ax/model.safetensors"
    assert uri_path("a b/#?%\u202e") == "a%20b/%23%3F%25%E2%80%AE"
    assert _raw_hidden(uri_path("bad\udcffbyte")) == []
