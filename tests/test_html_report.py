"""The HTML report (--patchscope-report-html) and the pytest-html extras, on hand-built profiles (no model).

The page is checked three ways: its markup (escaping, self-containedness, order, heatmap cells),
the option through pytester (bad paths refused before any test runs, pytest-html rows), and in a
real headless Chromium driven over the DevTools protocol, whose layout engine decides what is
visible. The browser test saves its screenshots under $PATCHSCOPE_ARTIFACTS_DIR (default
<repo>/artifacts/) and skips, saying how to install it, where Chromium is absent.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pytest_patchscope.baseline.comparator import compare_profiles
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.errors import ReportError
from pytest_patchscope.reports.html import PAGE_ORDER, ColourScale, HeatmapLayout, check_html_report_path, render_html_report, write_html_report
from pytest_patchscope.reports.summary import STATUS_ORDER, SessionSummary

from conftest import synthetic_project

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("PATCHSCOPE_CHROMIUM", "/usr/bin/chromium"))
NASTY = 'France </script><b>bold</b> & "quoted"\nsecond line'


def strip(hits, n=6, source="France", **cell_kwargs) -> LocalizationProfile:
    cells = tuple(
        LayerCell(l, l, " Paris -> Paris" if l in hits else f" London {l}", l in hits, -0.4 if l in hits else -6.0, 0 if l in hits else 7, **cell_kwargs)
        for l in range(n)
    )
    return LocalizationProfile({"source": source, "target": "cat -> cat\n?"}, cells, "Paris", clean_text="\n\nThe answer", model="m", weights_hash="h")


def grid(hits, n=4) -> LocalizationProfile:
    cells = tuple(LayerCell(l, t, " Tokyo" if l in hits else " x", l in hits, -0.3 if l in hits else -5.0 - t, 0) for l in range(n) for t in range(n))
    return LocalizationProfile({"source": "Japan", "target": "x is"}, cells, "Tokyo", grid=True)


def heads(n=3, h=4) -> LocalizationProfile:
    cells = tuple(LayerCell(l, l, " Paris", True, -0.2 - 0.1 * u, 0, unit=u) for l in range(n) for u in range(h))
    return LocalizationProfile({"source": "S", "target": "S", "site": "heads", "units": "each"}, cells, "Paris")


def session() -> SessionSummary:
    summary = SessionSummary()
    summary.add("t.py::test_b_unchanged::probe=1", compare_profiles(strip([2, 3]), strip([2, 3])), "t.py::test_b_unchanged")
    summary.add("t.py::test_c_regressed::probe=2", compare_profiles(strip([0, 1, 2], source=NASTY), strip([], source=NASTY)), "t.py::test_c_regressed")
    summary.add("t.py::test_a_grid::probe=3", compare_profiles(None, grid([1])), "t.py::test_a_grid")
    summary.add("t.py::test_d_heads::probe=4", heads(), "t.py::test_d_heads")
    summary.unused = ["t.py::test_gone::probe=9"]
    return summary


class Elements(HTMLParser):
    """Every start tag (name, attributes) and the text of each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parsed(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    return parser


# ---- the page's markup ---------------------------------------------------------------------------
def test_probe_texts_cannot_break_the_page():
    page = render_html_report(session())
    elements = parsed(page)
    assert [tag for tag, _ in elements.tags].count("script") == 2
    assert not [tag for tag, _ in elements.tags if tag == "b"], "a <b> from a prompt became an element"
    assert "</script><b>" not in page and "&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in page
    data = json.loads(elements.scripts[0])
    regressed = data["probes"][0]
    assert regressed["status"] == "regressed"
    assert {c["text"] for c in regressed["sides"]["current"]["cells"]} == {f" London {l}" for l in range(6)}
    assert "<" not in elements.scripts[0] and ">" not in elements.scripts[0] and "&" not in elements.scripts[0]
    assert repr(NASTY) in html.unescape(page) and regressed["probe"]["source"] == NASTY


def test_the_page_fetches_nothing():
    page = render_html_report(session())
    assert not re.search(r"(?i)\b(src|href)\s*=", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r"(?i)https?://", page)
    csp = next(attrs["content"] for tag, attrs in parsed(page).tags if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none';") and "'unsafe-inline'" not in csp


def test_regressions_come_first_and_counts_and_unused_are_shown():
    page = render_html_report(session(), ["baseline: b.json (3 entries, m @ h)"])
    sections = [attrs for tag, attrs in parsed(page).tags if tag == "section"]
    assert [s["data-status"] for s in sections] == ["regressed", "new", "recorded", "unchanged"]
    assert sections[0]["data-key"] == "t.py::test_c_regressed::probe=2"
    counts = dict(re.findall(r'<span class="count" data-status="(\w+)">(\d+)</span>', page))
    assert counts == {"regressed": "1", "missing": "0", "improved": "0", "new": "1", "recorded": "1", "unchanged": "1", "unused": "1"}
    assert "t.py::test_gone::probe=9" in page and "baseline: b.json (3 entries, m @ h)" in page
    boxes = [attrs["data-status"] for tag, attrs in parsed(page).tags if tag == "input"]
    assert boxes == ["regressed", "new", "recorded", "unchanged"]  # one filter box per status present
    assert sorted(PAGE_ORDER) == sorted(STATUS_ORDER)
    assert "lost hits at layers 0, 1, 2 (decodable nowhere now)" in page


def heatmap_cells(page: str) -> dict[int, dict[str, list[dict[str, str | None]]]]:
    """Per probe section (its data-index), the cells of each side's heatmap."""
    out: dict[int, dict[str, list[dict[str, str | None]]]] = {}
    section = side = None
    for tag, attrs in parsed(page).tags:
        if tag == "section":
            section = int(attrs["data-index"])
            out[section] = {}
        elif tag == "svg" and "heatmap" in (attrs.get("class") or ""):
            side = attrs["data-side"]
            out[section][side] = []
        elif tag == "rect" and "cell" in (attrs.get("class") or "").split():
            out[section][side].append(attrs)
    return out


def test_heatmaps_are_grid_layer_by_head_or_strip_and_sides_line_up():
    page = render_html_report(session())
    cells = heatmap_cells(page)
    regressed, grid_, heads_, unchanged = cells[0], cells[1], cells[2], cells[3]
    assert set(regressed) == {"baseline", "current"} and set(grid_) == {"current"}
    assert [c["data-coord"] for c in regressed["baseline"]] == [c["data-coord"] for c in regressed["current"]] == [str(l) for l in range(6)]
    assert len(grid_["current"]) == 16 and {c["data-coord"] for c in grid_["current"]} == {f"{l},{t}," for l in range(4) for t in range(4)}
    assert len(heads_["current"]) == 12 and "0,0,3" in {c["data-coord"] for c in heads_["current"]}
    assert [c["class"] for c in unchanged["current"]].count("cell hit") == 2
    kinds = [attrs["data-kind"] for tag, attrs in parsed(page).tags if tag == "svg" and attrs.get("data-kind")]
    assert kinds == ["strip", "strip", "grid", "heads", "strip", "strip"]


def test_colour_is_the_margin_when_cells_have_one():
    with_margin = strip([1], margin=0.5, candidate_logprobs={"Paris": -0.4, "London": -0.9})
    scale = ColourScale.of([with_margin])
    assert scale.metric == "margin" and (scale.low, scale.high) == (-1.0, 1.0)  # at least -1 to 1
    assert ColourScale.of([strip([1], margin=-2.5)]).low == -2.5
    logprob = ColourScale.of([strip([1])])
    assert logprob.metric == "logprob" and (logprob.low, logprob.high) == (-6.0, -0.4)
    assert (ColourScale.of([strip([0, 1, 2, 3, 4, 5])]).low, ColourScale.of([strip([0, 1, 2, 3, 4, 5])]).high) == (-4.4, -0.4)
    layout = HeatmapLayout.of([with_margin])
    assert layout.kind == "strip" and layout.cols == tuple(range(6))
    summary = SessionSummary()
    summary.add("k", with_margin, "t.py::k")
    assert "colour: margin (expected - best other, nats)" in render_html_report(summary)


def test_an_empty_session_still_writes_a_page(tmp_path):
    path = write_html_report(tmp_path / "r.html", SessionSummary())
    assert "No probe was recorded in this session." in path.read_text(encoding="utf-8")


def test_unwritable_paths_are_report_errors_naming_the_option(tmp_path):
    with pytest.raises(ReportError, match=r"--patchscope-report-html=.*missing/r\.html: its folder .*missing does not exist\. Create it \(mkdir -p"):
        check_html_report_path(tmp_path / "missing" / "r.html")
    with pytest.raises(ReportError, match=r"is a folder, not a file\. Name the file to write, e\.g\. .*patchscope\.html"):
        check_html_report_path(tmp_path)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ReportError, match=r"its folder .*plain is not a folder"):
        check_html_report_path(tmp_path / "plain" / "r.html")
    check_html_report_path(tmp_path / "ok.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # the write check leaves nothing behind


# ---- through pytest ----------------------------------------------------------------------------------
SUITE = '''
import os

import pytest

from pytest_patchscope import LayerCell, LocalizationProfile

DAMAGED = os.environ.get("SYNTH_STATE") == "damaged"
NASTY = {nasty!r}
CHECKPOINT = {{"model": "damaged", "weights_hash": "d4"}} if DAMAGED else {{"model": "release", "weights_hash": "r1"}}


def strip(source, hits, n=12, candidates=False):
    cells = []
    for l in range(n):
        hit = l in hits
        degenerate = DAMAGED and source == NASTY and l in (3, 4)
        text = " Paris -> Paris" if hit else " the the the the" if degenerate else f" London -> London <{{l}}>"
        cells.append(LayerCell(
            l, l, text, hit, -0.3 - 0.01 * l if hit else -5.0 - 0.2 * l, 0 if hit else 12,
            margin=(1.5 if hit else -2.0 - 0.1 * l) if candidates else None,
            candidate_logprobs={{"Paris": -0.3 if hit else -6.0, "London": -1.8 if hit else -1.0}} if candidates else None,
            degenerate="the token ' the' repeated 4 times" if degenerate else None,
        ))
    return LocalizationProfile(
        {{"source": source, "source_position": "-1", "target": "cat -> cat\\n?", "target_position": "-1", "mapping": "identity"}},
        tuple(cells), "Paris", clean_text="\\n\\nThe answer is: 1135",
        **CHECKPOINT,
        candidates=("Paris", "London") if candidates else (),
        clean_candidate_logprobs={{"Paris": -3.0, "London": -2.5}} if candidates else None,
    )


def test_france(patchscope):
    patchscope.record(strip(NASTY, [] if DAMAGED else range(12), candidates=True))


def test_japan(patchscope):
    patchscope.record(strip("Japan", range(6, 12)))


def test_grid(patchscope):
    cells = tuple(LayerCell(l, t, " Tokyo" if l < 3 else " x", l < 3, -0.2 if l < 3 else -4.0 - 0.3 * abs(l - t), 0)
                  for l in range(8) for t in range(8))
    patchscope.record(LocalizationProfile({{"source": "Japan", "target": "The capital city of x is"}}, cells, "Tokyo",
                                          clean_text=" 1000.", grid=True, **CHECKPOINT))


def test_heads(patchscope):
    cells = tuple(LayerCell(l, l, " Paris" if (l, u) != (5, 2) else " Rome", (l, u) != (5, 2), -0.26 if (l, u) != (5, 2) else -1.9, 0, unit=u)
                  for l in range(8) for u in range(6))
    patchscope.record(LocalizationProfile({{"source": "The capital of France is", "target": "The capital of France is",
                                           "site": "heads", "units": "each", "mapping": "zero"}}, cells, "Paris", clean_text=" Paris",
                                          **CHECKPOINT))
'''.format(nasty=NASTY)


@pytest.fixture
def project(pytester, monkeypatch):
    """A checkout (pyproject.toml) with the synthetic suite in tests/; SYNTH_STATE=damaged breaks France."""
    monkeypatch.delenv("SYNTH_STATE", raising=False)
    return synthetic_project(pytester, SUITE)


def run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def gate_report(pytester, project, monkeypatch, *args):
    """Record the baseline, then gate the damaged state (France regresses) with ``args``."""
    baseline = project / "baseline.json"
    run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-update-baseline").assert_outcomes(passed=4)
    monkeypatch.setenv("SYNTH_STATE", "damaged")
    result = run(pytester, f"--patchscope-baseline={baseline}", "--patchscope-compare-checkpoint", *args)
    result.assert_outcomes(passed=3, failed=1)
    return result


@pytest.mark.parametrize("where", ["missing folder", "a folder", "read-only place"])
def test_a_path_that_cannot_be_written_is_refused_before_any_test_runs(pytester, project, where):
    if where == "missing folder":
        target, message = project / "nowhere" / "r.html", "its folder * does not exist. Create it (mkdir -p *"
    elif where == "a folder":
        target, message = project / "tests", "is a folder, not a file. Name the file to write*"
    else:
        if os.geteuid() == 0:  # root writes through permission bits; /proc takes no new files for anyone
            if not Path("/proc").is_dir():
                pytest.skip("no /proc here, and root ignores permission bits")
            target = Path("/proc/patchscope-report.html")
        else:
            locked = project / "locked"
            locked.mkdir(mode=0o555)
            target = locked / "r.html"
        message = "no file can be created in *. Choose a writable path."
    result = run(pytester, f"--patchscope-report-html={target}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --patchscope-report-html={target}*{message}"])
    assert "passed" not in result.stdout.str() and "collected" not in result.stdout.str()


def test_the_report_is_written_at_the_end_of_a_gate(pytester, project, monkeypatch):
    report = project / "out.html"
    result = gate_report(pytester, project, monkeypatch, f"--patchscope-report-html={report}")
    result.stdout.fnmatch_lines(["4 probes: 3 unchanged, 1 regressed"])
    page = report.read_text(encoding="utf-8")
    sections = [attrs for tag, attrs in parsed(page).tags if tag == "section"]
    assert [s["data-status"] for s in sections] == ["regressed", "unchanged", "unchanged", "unchanged"]
    assert sections[0]["data-key"].startswith("tests/test_facts.py::test_france::probe=")
    assert "the baseline comes from another checkpoint (release @ r1) than this run (damaged @ d4)" in page
    data = json.loads(parsed(page).scripts[0])
    assert data["probes"][0]["metric"] == "margin"
    assert data["probes"][0]["sides"]["current"]["clean_candidate_logprobs"] == {"Paris": -3.0, "London": -2.5}


def test_the_report_is_written_without_pytest_html(pytester, project):
    report = project / "r.html"
    result = run(pytester, "-p", "no:html", f"--patchscope-report-html={report}")
    result.assert_outcomes(passed=4)
    assert "4 probes: 4 recorded" in report.read_text(encoding="utf-8")


# ---- pytest-html extras ---------------------------------------------------------------------------------
def pytest_html_rows(path: Path) -> dict[str, list[dict]]:
    """pytest-html 4's embedded data: its tests by node id."""
    blob = re.search(r'data-jsonblob="([^"]*)"', path.read_text(encoding="utf-8"))
    assert blob, "no data-jsonblob in the pytest-html report"
    return json.loads(html.unescape(blob.group(1)))["tests"]


def test_pytest_html_rows_carry_each_sweeps_figures_and_heatmap(pytester, project, monkeypatch):
    pytest.importorskip("pytest_html", reason="pytest-html is not installed (pip install -r requirements-dev.txt)")
    report = project / "report.html"
    gate_report(pytester, project, monkeypatch, f"--html={report}", "--self-contained-html")
    rows = pytest_html_rows(report)
    france = next(entries for nodeid, entries in rows.items() if nodeid.endswith("test_france"))
    (call,) = [entry for entry in france if entry["testId"].endswith("test_france")]
    (extra,) = [e for e in call["extras"] if e["format_type"] == "html"]
    fragment = extra["content"]
    assert "patchscope: regressed" in fragment and "<svg" in fragment and 'data-side="baseline"' in fragment
    assert fragment.count('class="cell') == 24  # 12 layers, baseline and current
    assert "lost hits at layers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 (decodable nowhere now)" in fragment
    assert "&lt;/script&gt;&lt;b&gt;" in fragment and "</script><b>" not in fragment
    assert '<td class="col-patchscope">regressed</td>' in call["resultsTableRow"]
    grid_row = next(entries for nodeid, entries in rows.items() if nodeid.endswith("test_grid"))[0]
    assert '<td class="col-patchscope">unchanged</td>' in grid_row["resultsTableRow"]
    assert grid_row["extras"][0]["content"].count('class="cell') == 2 * 64
    assert '<th class="patchscope">patchscope</th>' in report.read_text(encoding="utf-8")


def test_without_pytest_html_nothing_breaks(pytester, project):
    result = run(pytester, "-p", "no:html")
    result.assert_outcomes(passed=4)
    result = run(pytester)  # pytest-html loaded (where installed) but no --html: no extras are made
    result.assert_outcomes(passed=4)


# ---- a real browser ---------------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven over the DevTools protocol (a websocket on loopback), no driver binary."""

    FLAGS = (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,1000", "--remote-debugging-port=0",
    )

    def __init__(self, binary: Path) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="patchscope-chromium-")
        self.process = subprocess.Popen(
            [str(binary), *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start: {self.process.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=30)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while self.js("document.readyState") != "complete":
            assert time.monotonic() < deadline, "the page did not finish loading"
            time.sleep(0.05)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> dict:
        """A real mouse click at the element's centre, after checking that it is the element hit there."""
        box = self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.scrollIntoView({{block: 'center'}});"
            "const r = el.getBoundingClientRect(); const x = r.left + r.width / 2, y = r.top + r.height / 2;"
            "return {x, y, width: r.width, height: r.height, hit: document.elementFromPoint(x, y) === el}; })()"
        )
        assert box["hit"] and box["width"] > 0 and box["height"] > 0, f"{selector} is covered or has no size: {box}"
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)
        return box

    def screenshot(self, path: Path, max_height: int | None = None) -> None:
        """The page from its top: all of it, or its first ``max_height`` pixels."""
        size = self.js("({w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})")
        height = size["h"] if max_height is None else min(size["h"], max_height)
        params = {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": size["w"], "height": height, "scale": 1}}
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def errors(self) -> list[str]:
        """Script exceptions, console errors and CSP refusals seen so far."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium (.ci/run installs it as root)")
    pytest.importorskip("websocket", reason="websocket-client is not installed: pip install -r requirements-dev.txt")
    browser = Chromium(CHROMIUM)
    yield browser
    browser.close()


VISIBLE = """(selector) => Array.from(document.querySelectorAll(selector)).map((el) => {
  const r = el.getBoundingClientRect(), s = getComputedStyle(el);
  return {width: r.width, height: r.height, top: r.top + window.scrollY, display: s.display,
          visible: el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})};
})"""


def boxes(browser: Chromium, selector: str) -> list[dict]:
    return browser.js(f"({VISIBLE})({json.dumps(selector)})")


def test_the_page_in_headless_chromium(pytester, project, monkeypatch, chromium):
    report = project / "report.html"
    gate_report(pytester, project, monkeypatch, f"--patchscope-report-html={report}")
    chromium.open(report.as_uri())
    artifacts = Path(os.environ.get("PATCHSCOPE_ARTIFACTS_DIR") or REPO / "artifacts")

    # The heatmaps are laid out and visible: 2 for the regressed probe, 2 for each unchanged one.
    heatmaps = boxes(chromium, "svg.heatmap")
    assert len(heatmaps) == 8 and all(h["visible"] and h["width"] > 50 and h["height"] > 40 and h["display"] != "none" for h in heatmaps)
    kinds = chromium.js("Array.from(document.querySelectorAll('svg.heatmap')).map((s) => s.dataset.kind)")
    assert kinds == ["strip", "strip", "grid", "grid", "heads", "heads", "strip", "strip"]
    cells = boxes(chromium, "section.probe:nth-of-type(1) svg.heatmap rect.cell")
    assert len(cells) == 24 and all(c["visible"] and c["width"] > 5 and c["height"] > 5 for c in cells)

    # The regressed probe is listed first and visible; the prompt's markup is text, not elements.
    sections = chromium.js("Array.from(document.querySelectorAll('section.probe')).map((s) => [s.dataset.status, s.dataset.key])")
    assert [status for status, _ in sections] == ["regressed", "unchanged", "unchanged", "unchanged"]
    assert sections[0][1].startswith("tests/test_facts.py::test_france::probe=")
    regressed, *others = boxes(chromium, "section.probe")
    assert regressed["visible"] and regressed["height"] > 100 and all(regressed["top"] < other["top"] for other in others)
    assert chromium.js("document.querySelectorAll('b').length") == 0 and chromium.js("document.scripts.length") == 2
    assert repr(NASTY) in chromium.js("document.querySelector('section.probe').innerText")
    assert chromium.js("performance.getEntriesByType('resource').length") == 0  # nothing fetched

    # A click on a current cell of the regressed probe shows both sides' texts at that layer.
    chromium.click('section.probe[data-status="regressed"] rect.cell[data-side="current"][data-coord="3"]')
    detail = chromium.js(
        "(() => { const d = document.querySelector('section.probe .detail');"
        "return {sides: Array.from(d.querySelectorAll('.side h3')).map((h) => h.textContent),"
        "patched: Array.from(d.querySelectorAll('pre.patched')).map((p) => p.textContent),"
        "clean: Array.from(d.querySelectorAll('pre.clean')).map((p) => p.textContent),"
        "text: d.innerText, visible: d.checkVisibility()}; })()"
    )
    assert detail["visible"] and detail["sides"] == ["baseline: l=3 l*=3", "current: l=3 l*=3 (clicked)"]
    assert detail["patched"] == [" Paris -> Paris", " the the the the"]
    # The baseline file keeps no clean text; the current side has the sweep's own.
    assert detail["clean"] == ["(empty, or not kept: a baseline file stores no clean text)", "\n\nThe answer is: 1135"]
    assert "yes: the token ' the' repeated 4 times" in detail["text"]  # the degeneration flag
    assert '"Paris" (expected)' in detail["text"] and "-6.0000" in detail["text"] and "-3.0000" in detail["text"]
    assert "margin (nats)" in detail["text"] and "-2.3000" in detail["text"]
    assert len(boxes(chromium, "section.probe rect.cell.selected")) == 2
    # The screenshot of the page as a reader sees it, with the clicked cell's detail open.
    chromium.js("window.scrollTo(0, 0)")
    chromium.screenshot(artifacts / "html_report.png")
    chromium.screenshot(artifacts / "html_report_top.png", max_height=1300)

    # A grid cell opens from the keyboard (focus, Enter), and a head cell by a click.
    chromium.js("document.querySelector('section.probe[data-key*=\"test_grid\"] rect.cell[data-side=\"current\"][data-coord=\"5,2,\"]').focus()")
    for kind in ("keyDown", "keyUp"):
        chromium.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
    assert chromium.js("document.querySelector('section.probe[data-key*=\"test_grid\"] .detail h3').textContent") == "baseline: l=5 l*=2"
    chromium.click('section.probe[data-key*="test_heads"] rect.cell[data-side="current"][data-coord="5,5,2"]')
    head = chromium.js("document.querySelector('section.probe[data-key*=\"test_heads\"] .detail').innerText")
    assert "current: l=5 l*=5 head 2" in head and " Rome" in head

    # The status filter: unticking "unchanged" hides the unchanged probes, and the regressed one stays.
    chromium.click('input.status-filter[data-status="unchanged"]')
    after = boxes(chromium, "section.probe")
    assert after[0]["visible"] and after[0]["height"] > 100
    assert all(not b["visible"] and b["display"] == "none" and b["height"] == 0 for b in after[1:])
    assert chromium.js("document.getElementById('hidden-count').textContent") == "3 probe(s) hidden by this filter"
    chromium.screenshot(artifacts / "html_report_filtered.png")
    chromium.click('input.status-filter[data-status="unchanged"]')
    assert all(b["visible"] for b in boxes(chromium, "section.probe"))
    assert chromium.errors() == []


def test_under_xdist_the_controller_writes_the_same_page_and_rows_keep_their_extras(pytester, project, monkeypatch):
    pytest.importorskip("pytest_html", reason="pytest-html is not installed (pip install -r requirements-dev.txt)")
    inline_page = project / "inline.html"
    gate_report(pytester, project, monkeypatch, f"--patchscope-report-html={inline_page}")
    page, rows = project / "xdist.html", project / "rows.html"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", f"--patchscope-baseline={project / 'baseline.json'}", "--patchscope-compare-checkpoint",
        f"--patchscope-report-html={page}", f"--html={rows}", "--self-contained-html", timeout=300,
    )
    result.assert_outcomes(passed=3, failed=1)
    assert not list(project.glob("tests/*.html")), "only the controller writes"
    inline_data, xdist_data = (json.loads(parsed(p.read_text(encoding="utf-8")).scripts[0]) for p in (inline_page, page))
    assert xdist_data == inline_data and xdist_data["probes"][0]["status"] == "regressed"
    assert re.search(r"on worker gw[01]</p>", page.read_text(encoding="utf-8"))
    france = next(entries for nodeid, entries in pytest_html_rows(rows).items() if nodeid.endswith("test_france"))
    (call,) = [entry for entry in france if entry["testId"].endswith("test_france")]
    assert "patchscope: regressed" in call["extras"][0]["content"] and '<td class="col-patchscope">regressed</td>' in call["resultsTableRow"]
