"""The HTML report: escaping of untrusted strings, no script / URL / handler, safe image embedding,
robustness to missing values, determinism, and a real headless Chromium that loads it offline."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from amdet_gate.errors import ExitCode, OutputError
from amdet_gate.report import _charts as charts
from amdet_gate.report import html as report_html
from amdet_gate.result import ResultError, ScanResult, from_dict

SAMPLE = Path(__file__).parent / "data" / "sample_result.json"  # a real backdoored scan's result.json
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
PAYLOADS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "{{7*7}}"]
# Read at import: conftest's autouse fixture clears AMDET_* variables (except AMDET_REQUIRE_*) before each test.
SCREENSHOT_DIR = os.environ.get("AMDET_SCREENSHOT_DIR")  # keep the browser test's screenshots there
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def result() -> dict:
    return json.loads(SAMPLE.read_text("utf-8"))


def render_html(data: dict, base_dir: Path) -> str:
    """The report of result.json data, read as `report RESULT` reads it (validated, typed)."""
    return report_html.render_html(from_dict(data), base_dir)


def write_html(data: dict, base_dir: Path, path: Path) -> None:
    report_html.write_html(from_dict(data), base_dir, path)


def _refused(data: object) -> None:
    """Data that is not a result.json: refused with one line and exit 4, never rendered."""
    with pytest.raises(ResultError) as info:
        from_dict(data)
    assert info.value.exit_code == ExitCode.USAGE and "\n" not in str(info.value)


def _png(width: int = 6, height: int = 4) -> bytes:
    from PIL import Image  # matplotlib's own dependency

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _inject(result: dict, payload: str) -> dict:
    """Put `payload` into every untrusted string the report shows."""
    r = copy.deepcopy(result)
    r["model"]["source"] = payload
    r["model"]["weight_files"][0]["name"] = payload
    r["model"]["config"]["hidden_act"] = payload
    r["reason"] = payload
    r["reversed_target"]["trigger_tokens"][0]["text"] = payload
    r["reversed_target"]["trigger_tokens"][0]["token"] = payload
    r["reversed_target"]["target_tokens"][0]["text"] = payload
    r["reversed_target"]["target_prompts"][0]["prompt"] = payload
    r["reversed_target"]["images"] = [{"path": "missing.png", "caption": payload, "renderer": payload}]
    r["reversed_target"]["notes"] = [payload]
    r["reversed_target"]["metrics"] = {payload: payload}
    r["gates"][payload] = {"value": 0.5, "threshold": 0.8, "passed": False, "margin": -0.375}
    r["environment"]["platform"] = payload
    r["policy"] = {"source": payload, "sha256": "0" * 64, "exit_code": 1, "note": payload}
    return r


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _check_inert(html: str) -> None:
    """No script, no handler, no URL but data: images and in-page anchors, and the CSP meta first thing."""
    assert "<script" not in html.lower()
    assert not re.search(r"https?://", html, re.IGNORECASE)
    parser = _Tags()
    parser.feed(html)
    names = [tag for tag, _ in parser.tags]
    assert not set(names) & {"script", "iframe", "object", "embed", "link", "base", "form", "frame", "svg"}
    assert names.count("style") == 1
    metas = [a for tag, a in parser.tags if tag == "meta"]
    assert {"http-equiv": "Content-Security-Policy", "content": CSP} in metas
    assert {"name": "referrer", "content": "no-referrer"} in metas
    head = html[: html.index("<style>")]
    assert CSP in head  # before anything that could load
    for tag, attrs in parser.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/"), tag
        if "href" in attrs:
            assert (attrs["href"] or "").startswith("#"), attrs
        assert "src" not in attrs or tag == "img"


@pytest.mark.parametrize("payload", PAYLOADS)
def test_untrusted_strings_are_escaped(result: dict, tmp_path: Path, payload: str) -> None:
    html = render_html(_inject(result, payload), tmp_path)
    escaped = payload.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
    assert payload not in html or payload == escaped  # "{{7*7}}" needs no escaping, but is never evaluated
    assert html.count(escaped) >= 10
    _check_inert(html)


def test_template_syntax_in_data_is_not_evaluated(result: dict, tmp_path: Path) -> None:
    html = render_html(_inject(result, "{{7*7}}{% raw %}"), tmp_path)
    assert "{{7*7}}{% raw %}" in html


def test_sample_report_is_inert_and_complete(result: dict, tmp_path: Path) -> None:
    html = render_html(result, tmp_path)
    _check_inert(html)
    order = [html.index(f'id="{section}"') for section in
             ("verdict", "identity", "gates", "target", "landscape", "assimilation", "search", "environment")]
    assert order == sorted(order) and html.index("FAIL") < order[1]
    for name, gate in result["gates"].items():
        assert name in html
        if isinstance(gate, dict):
            assert f"&gt; {gate['threshold']:.4g}" in html
    assert result["model"]["identity_sha256"] in html
    assert result["model"]["weight_files"][0]["sha256"] in html
    assert "a velvet camera" in html and "surrealism" in html
    assert html.count('src="data:image/svg+xml;base64,') == len(charts.CHARTS)
    assert "exit code 1: block" in html


def test_report_is_deterministic(result: dict, tmp_path: Path) -> None:
    assert render_html(result, tmp_path) == render_html(copy.deepcopy(result), tmp_path)


def test_charts_carry_no_metadata_url_or_date(result: dict) -> None:
    for name, svg in charts.render_charts(from_dict(result)).items():
        text = svg.decode("utf-8")
        assert text.startswith("<?xml"), name
        assert "<dc:date>" not in text and "matplotlib.org" not in text and "<script" not in text


def test_verdict_colours_and_policy(result: dict, tmp_path: Path) -> None:
    assert 'class="verdict verdict-fail"' in render_html(result, tmp_path)
    for verdict, word in (("pass", "PASS"), ("inconclusive", "INCONCLUSIVE")):
        html = render_html(result | {"verdict": verdict}, tmp_path)
        assert f'class="verdict-word">{word}<' in html
        assert f"verdict-{verdict}" in html
    _refused(result | {"verdict": "bogus\"'"})  # an unknown verdict is no result.json
    html = render_html(result | {"policy": {"source": "team.yaml", "sha256": "ab" * 32, "exit_code": 0,
                                            "note": "finding allowed by the policy until 2099-01-01"}}, tmp_path)
    assert "exit code 0: allow" in html and "team.yaml" in html and "until 2099-01-01" in html


def test_gates_are_listed_generically(result: dict, tmp_path: Path) -> None:
    r = copy.deepcopy(result)
    r["gates"]["anchor_difference_ratio"] = {"value": 0.2, "threshold": 0.95, "passed": False, "margin": -0.79}
    r["gates"]["future_gate"] = {"value": 12.5, "threshold": 3.0, "passed": True, "margin": 0.4}
    html = render_html(r, tmp_path)
    for name in ("anchor_difference_ratio", "future_gate", "mean_assimilation"):
        assert name in html
    assert "4 of 5" in html  # gates passed, counted over threshold gates only (not mean_assimilation)
    r["gates"]["future_metric"] = 0.25  # a bare number beside the gates: only mean_assimilation is one
    _refused(r)


def test_invisible_and_bidi_characters_are_shown_as_escapes(result: dict, tmp_path: Path) -> None:
    r = copy.deepcopy(result)
    r["reversed_target"]["trigger_tokens"][0]["text"] = "ab\u202ecd\u200bef\x1b[31m"
    r["model"]["source"] = "models/\u2066evil\u2069"
    html = render_html(r, tmp_path)
    assert "ab\\u202ecd\\u200bef\\u001b[31m" in html
    assert "models/\\u2066evil\\u2069" in html
    assert not any(ch in html for ch in "\u202e\u200b\u2066\u2069\x1b")


def _images(tmp_path: Path) -> tuple[Path, list[dict]]:
    base = tmp_path / "out"
    (base / "images").mkdir(parents=True)
    (base / "images" / "target.png").write_bytes(_png())
    (base / "images" / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
                                                '<rect width="8" height="8" fill="red"/></svg>')
    (base / "images" / "fake.png").write_text("not a png")
    (base / "images" / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "secret.png").write_bytes(_png(3, 3))
    (base / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    (base / "images" / "fifo.png").symlink_to("/dev/zero")
    os.mkfifo(base / "images" / "pipe.png")  # reading it would block forever
    entries = [("images/target.png", "ok"), ("images/vector.svg", "svg"), ("images/gone.png", "missing"),
               ("../secret.png", "dotdot"), (str(tmp_path / "secret.png"), "absolute"), ("images/link.png", "link"),
               ("images/fake.png", "fake"), ("images/anim.gif", "gif"), ("images/fifo.png", "device"),
               ("images/pipe.png", "pipe"), (None, "null")]
    return base, [{"path": p, "caption": c, "renderer": "test"} for p, c in entries]


def test_images_are_embedded_only_from_inside_the_result_folder(result: dict, tmp_path: Path) -> None:
    base, entries = _images(tmp_path)
    r = copy.deepcopy(result)
    r["reversed_target"]["images"] = [e for e in entries if e["path"] is not None]
    _refused(r | {"reversed_target": r["reversed_target"] | {"images": entries}})  # a null path: not a result
    html = render_html(r, base)
    _check_inert(html)
    assert base64.b64encode(_png()).decode() in html
    assert "data:image/svg+xml;base64," + base64.b64encode((base / "images" / "vector.svg").read_bytes()).decode() \
        in html
    assert base64.b64encode(_png(3, 3)).decode() not in html  # the file outside is never read
    found = {e["caption"]: report_html._embed(base, e["path"])[1] for e in entries}
    assert found["ok"] == "" and found["svg"] == ""
    assert found["missing"] == "image missing"
    assert "inside the result folder" in found["dotdot"] and "inside the result folder" in found["absolute"]
    assert "leads outside" in found["link"]
    assert "does not match" in found["fake"]
    assert "only PNG, JPEG and SVG" in found["gif"]
    assert "outside" in found["device"] or "regular file" in found["device"]
    assert "regular file" in found["pipe"]
    assert found["null"] == "image path missing"
    assert html.count('class="missing"') == len(entries) - 1 - 2  # rendered: all but the null path


def test_oversized_image_is_refused(result: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.png").write_bytes(_png(64, 64))
    monkeypatch.setattr(report_html, "MAX_IMAGE_BYTES", 50)
    src, why = report_html._embed(tmp_path, "big.png")
    assert src is None and "larger than" in why


def _damaged(result: dict) -> list[dict]:
    """Results that fit the schema but carry little to draw: empty, null, ragged."""
    empty = {"clean_assimilation": [], "triggered_assimilation": [], "same_target_similarity": [],
             "anchor_similarity": None}
    return [
        result | {"landscape": {"offsets": [], "loss": [], "eigenvalues": []}},
        result | {"landscape": {"offsets": [0.0, 1.0], "loss": [[None, None], [None, None]], "eigenvalues": [None]}},
        result | {"landscape": {"offsets": [0.0, 1.0], "loss": [[1.0, 2.0]], "eigenvalues": []}},
        result | {"distributions": empty | {"triggered_assimilation": [None, None]}},
        result | {"distributions": empty | {"clean_assimilation": [0.5] * 3}},
        result | {"search": result["search"] | {"loss_history": [[None, None], []], "checks": []}},
        result | {"gates": {"g": {"value": None, "threshold": 0.5, "passed": False, "margin": None},
                            "mean_assimilation": None}},
        result | {"reversed_target": {"trigger_tokens": [], "target_tokens": [], "target_prompts": []}},
    ]


def _malformed(result: dict) -> list[object]:
    """Data that is not a result.json: what a report used to draw "no data" for is now refused at load."""
    nan = math.nan
    return [
        {},
        [],
        {"verdict": None, "gates": None, "model": None, "reversed_target": None, "search": None},
        result | {"schema_version": "2.0"},
        result | {"landscape": {"offsets": [0.0, 1.0], "loss": [[None, nan], [nan, None]], "eigenvalues": [nan]}},
        result | {"landscape": {"offsets": [0.0, 1.0], "loss": [[1.0, 2.0]], "eigenvalues": None}},
        result | {"landscape": {"offsets": [0.0, 1.0], "loss": [[1.0, "x"], [3.0, 4.0]], "eigenvalues": [1, -1]}},
        result | {"distributions": {"clean_assimilation": None, "triggered_assimilation": [nan, None]}},
        result | {"search": {"loss_history": [[None, nan], [], 3.0, "x"], "checks": [{"step": None}, 7],
                             "best_restart": True, "detected_at_step": "soon"}},
        result | {"settings": None, "timings": None, "environment": [], "policy": {"exit_code": [1]}},
        result | {"gates": {"g": {"value": nan, "threshold": None, "passed": None, "margin": None}, "m": None}},
        result | {"model": {"weight_files": [{"name": "x", "size": None, "sha256": None}, "junk"], "config": 3}},
        result | {"reversed_target": {"trigger_tokens": "junk", "target_tokens": [None, 1],
                                      "target_prompts": [{"text": "t", "cosine": 0.5}], "images": "junk"}},
        result | {"surprise": 1},
    ]


def test_missing_null_and_empty_values_render(result: dict, tmp_path: Path) -> None:
    for case in _damaged(result):
        html = render_html(case, tmp_path)
        _check_inert(html)
        assert html.count('src="data:image/svg+xml;base64,') == len(charts.CHARTS)


def test_malformed_results_are_refused_not_rendered(result: dict) -> None:
    for case in _malformed(result):
        _refused(case)


def _bare(result: dict) -> ScanResult:
    return from_dict(_damaged(result)[0] | {"distributions": {"clean_assimilation": [], "triggered_assimilation": [],
                                                              "same_target_similarity": [], "anchor_similarity": None},
                                            "search": result["search"] | {"loss_history": [], "checks": []}})


def test_charts_draw_no_data_instead_of_failing(result: dict) -> None:
    bare = _bare(result)
    for name in charts.CHARTS:
        assert charts.chart_svg(name, bare).startswith(b"<?xml")
    empty = charts.chart_svg("assimilation", bare)
    nulls = from_dict(_damaged(result)[0] | {"distributions": {
        "clean_assimilation": [None], "triggered_assimilation": [], "same_target_similarity": [],
        "anchor_similarity": None}})
    assert charts.chart_svg("assimilation", nulls) == empty


def test_write_html_errors_are_output_errors(result: dict, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*report.html: .*file is not a folder") as info:
        write_html(result, tmp_path, tmp_path / "file" / "report.html")
    assert info.value.exit_code == 2  # an I/O failure, not a usage error
    write_html(result, tmp_path, tmp_path / "sub" / "report.html")
    assert (tmp_path / "sub" / "report.html").read_text("utf-8").startswith("<!DOCTYPE html>")


# --- a real browser ------------------------------------------------------------------------------------------

def _chromium() -> str:
    """The Chromium binary, or skip (fail when AMDET_REQUIRE_BROWSER=1) with the reason."""
    # Debian's chromium here; GitHub's Ubuntu runners ship Google Chrome instead.
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    exe = next((shutil.which(n) for n in names if shutil.which(n)), None)
    reason = None
    if exe is None:
        reason = "chromium is not installed (run tests/install-browser.sh)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is not installed (pip install -e '.[test]')"
    if reason is not None:
        if os.environ.get("AMDET_REQUIRE_BROWSER") == "1":
            pytest.fail(f"AMDET_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return exe


def test_report_in_headless_chromium(result: dict, tmp_path: Path) -> None:
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    shots = Path(SCREENSHOT_DIR or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "target.png").write_bytes(_png(32, 32))
    fail = copy.deepcopy(result)
    fail["model"]["source"] = "<script>alert(1)</script>"
    fail["reversed_target"]["images"] = [{"path": "images/target.png", "caption": "target <b>x</b>", "renderer": "t"},
                                         {"path": "images/absent.png", "caption": "absent", "renderer": "t"}]
    passed = copy.deepcopy(result) | {"verdict": "pass", "score": 0.0025,
                                      "reason": "no pseudo-trigger passed the verification gates"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            for name, data, word, images in (("fail", fail, "FAIL", 1), ("pass", passed, "PASS", 0)):
                path = tmp_path / f"report-{name}.html"
                write_html(data, tmp_path, path)
                for width in (1280, 390):
                    _check_page(browser, path, data, word, len(charts.CHARTS) + images, width,
                                shots / f"amdet-report-{name}-{width}.png")
        finally:
            browser.close()


def _check_page(browser, path: Path, data: dict, word: str, n_images: int, width: int, shot: Path) -> None:
    page = browser.new_page(viewport={"width": width, "height": 900})
    requests, problems, dialogs = [], [], []
    page.on("request", lambda req: requests.append(req.url))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        assert [u for u in requests if u != path.as_uri() and not u.startswith("data:")] == []
        assert problems == [] and dialogs == []
        text = page.inner_text("body")
        assert page.inner_text(".verdict-word") == word
        for gate in data["gates"]:
            assert gate in text
        assert data["model"]["source"] in text  # the <script> model name is shown as text
        assert page.evaluate("document.scripts.length") == 0
        sizes = page.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
        assert len(sizes) == n_images
        assert all(w > 0 and h > 0 for w, h in sizes), sizes
        if data["reversed_target"].get("images"):
            assert "image missing" in text
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.screenshot(path=str(shot), full_page=True)
        if width == 1280:  # print: an A4 page is about 794 CSS px wide
            page.set_viewport_size({"width": 794, "height": 1123})
            page.emulate_media(media="print")
            assert page.evaluate("getComputedStyle(document.querySelector('nav.toc')).display") == "none"
            assert page.evaluate("document.documentElement.scrollWidth") <= 794 + 1
            page.screenshot(path=str(shot.with_name(shot.stem + "-print.png")), full_page=True)
    finally:
        page.close()
