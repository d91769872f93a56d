"""The tokens renderer: the reversed target as text and as an image card (always available).

The nearest vocabulary tokens to the pseudo-trigger, the nearest corpus tokens to the target
feature position by position, and the corpus prompts whose clean features are nearest it (all
computed by `reverse.py` into the result's `reversed_target`), drawn as `images/tokens.png`
and given as plain text. It needs no weights, so `render` draws it after every other renderer.

Every string comes from the model's tokenizer or the prompt corpus and is untrusted: it is
sanitised before it is drawn or printed, non-ASCII code points are listed (homoglyphs), and
matplotlib's math text and TeX are off.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from amdet_gate.render.common import RenderedImage, Rendering, RenderJob, RenderRequest, write_image
from amdet_gate.result import NearToken, ReversedTarget
from amdet_gate.sanitise import one_line

CARD_FONT = "DejaVuSansMono.ttf"  # shipped inside matplotlib: same glyphs (and bytes) on every machine
CARD_BOLD_FONT = "DejaVuSansMono-Bold.ttf"
CARD_ROWS = 12  # rows per section
CARD_CHARS = 60  # characters per untrusted string
CARD_DPI = 100


def _code_points(raw: object, limit: int = 3) -> str:
    """Code points of the non-ASCII and non-printable characters of the raw string, so that
    homoglyphs (a Cyrillic o, U+043E, for a Latin o) and hidden characters are told apart."""
    text = raw if isinstance(raw, str) else str(raw)
    seen = list(dict.fromkeys(ch for ch in text[: CARD_CHARS * 4] if ord(ch) > 127 or not ch.isprintable()))
    if not seen:
        return ""
    shown = " ".join(f"U+{ord(ch):04X}" for ch in seen[:limit])
    return f"  [{shown}{' ...' if len(seen) > limit else ''}]"


def _number(value: float | None) -> str:
    if value is not None and math.isfinite(value):
        return f"{value:6.3f}"
    return "   n/a"


def _position(item: NearToken) -> str:
    return f"pos {item.position:>2}  " if item.position is not None else ""


def _token_label(item: NearToken) -> str:
    return f'"{one_line(item.text, 30)}"{_code_points(item.text)}  id {item.id}'


def _row(item: NearToken) -> str:
    return f"{_position(item)}{_number(item.cosine)}  {_token_label(item)}"


def token_sections(target: ReversedTarget) -> list[tuple[str, list[str]]]:
    """The card's sections as (heading, rows), from the reversed target."""
    trigger = [_row(t) for t in target.trigger_tokens[:CARD_ROWS]]
    # reverse.py decodes the positions after the trigger: 0 is BOS, 1..K the pseudo-trigger itself.
    targets = [_row(t) for t in target.target_tokens[:CARD_ROWS]]
    prompts = [f"{_number(p.similarity)}  {one_line(p.prompt, CARD_CHARS)}" for p in target.target_prompts[:CARD_ROWS]]
    return [
        ("Pseudo-trigger: nearest vocabulary tokens (cosine, input embeddings)", trigger or ["(none)"]),
        ("Target feature, position by position: nearest corpus tokens", targets or ["(none)"]),
        ("Corpus prompts whose clean features are nearest the target", prompts or ["(none)"]),
    ]


def render_tokens(target: ReversedTarget, out_dir: Path) -> Rendering:
    """The tokens card of the reversed target: `images/tokens.png` in `out_dir`, and the same as text."""
    sections = token_sections(target)
    title = "amdet-gate: reversed target (nearest tokens and prompts)"
    lines = [title]
    for heading, rows in sections:
        lines.extend(["", heading, *("  " + row for row in rows)])
    text = "\n".join(lines)
    relative = write_image(out_dir, "tokens.png", _card_png(title, sections))
    caption = "Nearest vocabulary tokens to the pseudo-trigger and to the target, and the nearest corpus prompts"
    return Rendering("tokens", [RenderedImage(relative, caption, "tokens")], text,
                     ["strings come from the model's tokenizer and the prompt corpus; hidden characters are "
                      "shown as \\u escapes and non-ASCII code points are listed"])


def _card_png(title: str, sections: list[tuple[str, list[str]]]) -> bytes:
    """Draw the card with an explicit Figure and Agg canvas: no pyplot, no global figure state."""
    import matplotlib
    from matplotlib import ft2font
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    regular = FontProperties(fname=str(fonts / CARD_FONT), size=10)
    bold = FontProperties(fname=str(fonts / CARD_BOLD_FONT), size=10)
    title_font = FontProperties(fname=str(fonts / CARD_BOLD_FONT), size=12)
    charmap = set(ft2font.FT2Font(str(fonts / CARD_FONT)).get_charmap())

    def drawable(line: str) -> str:  # a missing glyph would only warn, but U+FFFD is explicit and quiet
        return "".join(ch if ord(ch) in charmap or ch == " " else "\ufffd" for ch in line)

    lines: list[tuple[str, FontProperties, str]] = [(title, title_font, "#111111")]
    for heading, rows in sections:
        lines.append(("", regular, "#000000"))
        lines.append((heading, bold, "#1f3a5f"))
        lines.extend(("  " + row, regular, "#222222") for row in rows)
    line_height, margin, width = 0.22, 0.25, 9.0  # inches
    height = 2 * margin + line_height * len(lines)
    figure = Figure(figsize=(width, height), dpi=CARD_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    for i, (line, font, colour) in enumerate(lines):
        y = 1 - (margin + line_height * (i + 0.75)) / height
        # parse_math / usetex off: a "$...$" token from a hostile tokenizer stays literal text.
        figure.text(0.025, y, drawable(line), fontproperties=font, color=colour, ha="left", va="baseline",
                    parse_math=False, usetex=False, wrap=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=CARD_DPI, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()



class TokensRenderer:
    """`--render tokens`: needs nothing but the scan result, so it always applies and always works."""

    name = "tokens"

    def applies(self, req: RenderRequest, model_dir: Path) -> bool:
        return True

    def check(self, req: RenderRequest, model_dir: Path) -> None:
        return None

    def render(self, req: RenderRequest, job: RenderJob) -> Rendering:
        return render_tokens(job.reversed_target, job.out_dir)
