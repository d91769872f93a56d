"""The one sanitiser for untrusted text: every name, token, path, config value or exception text
that amdet-gate prints or writes passes through here first (docs/supply-chain.md, "Sanitiser").

Where the text goes decides which function:

  one_line(text)      terminal, CI log, stderr error lines, warnings, the stdout verdict line,
                      SARIF message.text: one printable line
  md_text(text)       Markdown (summary.md, $GITHUB_STEP_SUMMARY): one_line, then HTML entities
                      and Markdown punctuation escaped, so nothing renders as a link or image
  visible(text)       HTML (autoescaped by Jinja2 as well): hidden characters shown as escapes,
                      everything else kept
  uri_path(text)      SARIF artifact URIs: percent-encoded

A hidden character is one that renders as nothing, moves the cursor, reorders text or starts a
new line: C0/C1 controls (ESC starts terminal escape sequences, "\\n" lets a folder named
`x\\n::error::y` open a line that GitHub Actions runs as a workflow command), format characters
(bidi overrides such as U+202E, zero-width characters), surrogates (undecodable file-name bytes),
private-use and unassigned code points, line and paragraph separators. Whitespace among them
becomes a space; the others become a visible `\\uXXXX` escape, so that something hidden is seen
rather than silently dropped.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~=:])")
_MAX_WORK = 64 * 1024  # characters looked at: bounds the cost of a hostile megabyte-long string


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _is_hidden(ch: str) -> bool:
    return ch != " " and unicodedata.category(ch) in _HIDDEN_CATEGORIES


def visible(text: str) -> str:
    """Hidden characters as `\\uXXXX` escapes (line breaks included); everything else as is."""
    if text.isprintable():
        return text
    return "".join(_escape(ch) if _is_hidden(ch) else ch for ch in text)


def one_line(value: object, limit: int | None = None) -> str:
    """Untrusted text as one printable line: whitespace runs (line breaks included) become one
    space, other hidden characters visible escapes; cut to `limit` characters with an ellipsis."""
    text = value if isinstance(value, str) else str(value)
    bound = _MAX_WORK if limit is None else min(_MAX_WORK, 4 * limit + 16)
    cut = len(text) > bound
    text = text[:bound]
    if not text.isprintable():
        text = "".join(" " if ch.isspace() or unicodedata.category(ch) in ("Zl", "Zp")
                       else _escape(ch) if _is_hidden(ch) else ch for ch in text)
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        return text[: max(limit - 1, 0)] + "…"
    return text + ("…" if cut else "")


def md_text(value: object, limit: int = 200) -> str:
    """An untrusted string as inert Markdown text on one line (no HTML, link, image or table cell break)."""
    text = one_line(value, limit)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def uri_path(path: str) -> str:
    """A relative POSIX path or `org/name/file` for a SARIF artifactLocation.uri, percent-encoded
    byte for byte: spaces, `#`, `?`, `%`, quotes, line breaks and hidden characters cannot change
    what the URI names or reach a log raw."""
    return quote(path, safe="/-._~", errors="backslashreplace")
