"""Session summary, terminal/JSON/Markdown reports, heatmaps and JUnit properties, on hand-built profiles."""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

from pytest_patchscope.baseline.comparator import Tolerances, compare_profiles
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.errors import ReportError
from pytest_patchscope.reports.formats import (
    heatmap_filename,
    junit_properties,
    render_terminal_summary,
    write_heatmaps,
    write_json_report,
    write_markdown_report,
)
from pytest_patchscope.reports.summary import SessionSummary


def profile(hits, n=7, peak=None, grid=False) -> LocalizationProfile:
    """Layers 0..n-1 (x targets 0..n-1 for a grid); hit cells score -0.5 (``peak`` scores -0.1), misses -6."""
    cells = tuple(
        LayerCell(
            l,
            t,
            " Paris" if l in hits else " the",
            l in hits,
            -0.1 if l == peak else -0.5 if l in hits else -6.0 - t,
            0 if l in hits else 9,
        )
        for l in range(n)
        for t in (range(n) if grid else [l])
    )
    return LocalizationProfile(
        {"source": "France", "target": "x"}, cells, " Paris", model="tiny", weights_hash="h", grid=grid
    )


def worker_summaries() -> tuple[SessionSummary, SessionSummary]:
    """Two xdist workers' summaries covering every status."""
    gw0, gw1 = SessionSummary(), SessionSummary()
    gw0.add(
        "t.py::test_a[0]::probe=a",
        compare_profiles(profile([0, 1, 2, 3]), profile([6])),
        "t.py::test_a[0]",
        "gw0",
    )
    gw0.add("t.py::test_b::probe=b", compare_profiles(profile([2]), profile([2])), "t.py::test_b", "gw0")
    gw1.add("t.py::test_c::probe=c", compare_profiles(profile([2]), profile([1, 2])), "t.py::test_c", "gw1")
    gw1.add("t.py::test_d::probe=d", compare_profiles(None, profile([3])), "t.py::test_d", "gw1")
    gw1.add("t.py::test_e::probe=e", profile([4]), "t.py::test_e", "gw1")
    return gw0, gw1


def merged(order) -> SessionSummary:
    controller = SessionSummary()
    for worker in order:
        controller.merge(json.loads(json.dumps(worker.to_dict())))  # what execnet would carry
    return controller


@pytest.fixture
def summary() -> SessionSummary:
    return merged(worker_summaries())


# ---- summary ---------------------------------------------------------------------------------
def test_merge_order_does_not_change_the_output():
    gw0, gw1 = worker_summaries()
    one, other = merged([gw0, gw1]), merged([gw1, gw0])
    assert one.to_dict() == other.to_dict()
    assert render_terminal_summary(one) == render_terminal_summary(other)
    assert [r.key for r in one.records] == sorted(r.key for r in one.records)
    assert {r.worker for r in one.records} == {"gw0", "gw1"}


def test_merged_records_keep_their_comparisons(summary):
    record = summary.records[0]
    assert record.status == "regressed" and record.nodeid == "t.py::test_a[0]"
    assert record.comparison.lost_layers == [0, 1, 2, 3] and record.comparison.baseline.hit_layers == [
        0,
        1,
        2,
        3,
    ]
    assert summary.counts() == {"unchanged": 1, "regressed": 1, "improved": 1, "new": 1, "missing": 0, "recorded": 1}


# ---- terminal ----------------------------------------------------------------------------------
def test_terminal_summary_counts_and_regression_strip(summary):
    lines = render_terminal_summary(summary)
    assert lines[0] == "5 probes: 1 unchanged, 1 regressed, 1 improved, 1 new, 1 recorded"
    start = lines.index("regressed: t.py::test_a[0]::probe=a")
    assert lines[start + 1 : start + 4] == [
        "  layer     0 1 2 3 4 5 6",
        "  baseline  ■ ■ ■ ■ · · ·",
        "  current   · · · · · · ■",
    ]
    assert "  - first hit moved from layer 0 to layer 6 (6 layers deeper > max_first_hit_shift=2)" in lines
    assert "improved: t.py::test_c::probe=c: gained hits at layer 1" in lines


def test_terminal_summary_of_nothing_is_empty():
    assert render_terminal_summary(SessionSummary()) == []


def test_terminal_strip_marks_layers_not_swept_as_blank():
    summary = SessionSummary()
    summary.add("k", compare_profiles(profile([0, 1], n=3), profile([0], n=2)), "t.py::test_k")
    assert render_terminal_summary(summary)[3:5] == ["  baseline  ■ ■ ·", "  current   ■ ·"]


# ---- JSON and Markdown -------------------------------------------------------------------------
def test_json_report_has_counts_statuses_reasons_and_hit_layers(tmp_path, summary):
    path = write_json_report(tmp_path / "out" / "patchscope.json", summary)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "pytest-patchscope-report" and data["total"] == 5
    assert data["counts"]["regressed"] == 1 and data["counts"]["new"] == 1
    probes = {p["key"]: p for p in data["probes"]}
    regressed = probes["t.py::test_a[0]::probe=a"]
    assert regressed["status"] == "regressed" and regressed["nodeid"] == "t.py::test_a[0]"
    assert regressed["baseline"]["hit_layers"] == [0, 1, 2, 3] and regressed["current"]["hit_layers"] == [6]
    assert regressed["lost_layers"] == [0, 1, 2, 3]
    assert any(r.startswith("first hit moved from layer 0 to layer 6") for r in regressed["reasons"])
    assert (
        probes["t.py::test_e::probe=e"]["status"] == "recorded"
        and probes["t.py::test_e::probe=e"]["baseline"] is None
    )


def test_json_report_is_strict_json_even_with_infinite_logprobs(tmp_path):
    dead = LocalizationProfile({"source": "x"}, (LayerCell(0, 0, "?", False, float("-inf")),), " Paris")
    summary = SessionSummary()
    summary.add("k", compare_profiles(profile([0], n=1), dead), "t.py::test_k")
    text = write_json_report(tmp_path / "r.json", summary).read_text(encoding="utf-8")
    assert "Infinity" not in text
    probe = json.loads(text)["probes"][0]
    assert probe["score_drop"] is None and probe["current"]["peak_logprob"] is None
    assert probe["current"]["cells"][0]["logprob"] is None and probe["baseline"]["cells"][0]["logprob"] == -0.5


def heads_profile() -> LocalizationProfile:
    """A (layer x head) profile with candidate scores, margins, a degenerate cell and markup in its texts."""
    cells = tuple(
        LayerCell(
            l, l, f" <b>{l}.{u}</b> & \"q\"\n", (l + u) % 2 == 0, -0.25 * u - l, u, unit=u, margin=0.5 - u,
            candidate_logprobs={"Paris": -0.25 * u, "Rome": -1.0}, degenerate="the token ' x' repeated 4 times" if u == 2 else None,
        )
        for l in range(3)
        for u in range(4)
    )
    return LocalizationProfile(
        {"source": "S", "target": "T", "site": "heads", "units": "each"}, cells, "Paris", clean_text="\n clean <&>",
        candidates=("Paris", "Rome"), clean_candidate_logprobs={"Paris": -2.0, "Rome": -0.5},
    )


def test_json_report_lets_a_dashboard_redraw_every_heatmap(tmp_path):
    grid_base, grid_cur, heads = profile([1, 2], n=4, grid=True), profile([2], n=4, grid=True), heads_profile()
    summary = SessionSummary()
    summary.add("grid", compare_profiles(grid_base, grid_cur), "t.py::test_grid")
    summary.add("heads", heads, "t.py::test_heads")
    data = json.loads(write_json_report(tmp_path / "r.json", summary).read_text(encoding="utf-8"))
    assert data["version"] == 2  # cells and texts are added keys: version-2 readers keep working
    probes = {p["key"]: p for p in data["probes"]}

    def redraw(side):
        """What a dashboard does with the JSON alone: (row, column) -> (colour value, hit mark)."""
        column = "unit" if side["per_unit"] else "target_layer"
        value = "margin" if any(c["margin"] is not None for c in side["cells"]) else "logprob"
        return {(c["layer"], c[column]): (c[value], c["hit"]) for c in side["cells"]}

    def drawn(p: LocalizationProfile):
        margin = any(c.margin is not None for c in p.cells)
        return {(c.layer, c.unit if p.per_unit else c.target_layer): (c.margin if margin else c.logprob, c.hit) for c in p.cells}

    grid = probes["grid"]
    assert grid["current"]["grid"] and not grid["current"]["per_unit"] and len(grid["current"]["cells"]) == 16
    assert redraw(grid["baseline"]) == drawn(grid_base) and redraw(grid["current"]) == drawn(grid_cur)
    side = probes["heads"]["current"]
    assert side["per_unit"] and probes["heads"]["baseline"] is None
    assert redraw(side) == drawn(heads) and len(redraw(side)) == 12
    assert tuple(LayerCell(**cell) for cell in side["cells"]) == heads.cells  # every field of every cell
    assert side["cells"][2]["degenerate"] == "the token ' x' repeated 4 times" and side["cells"][1]["candidate_logprobs"] == {"Paris": -0.25, "Rome": -1.0}
    assert side["clean_text"] == "\n clean <&>" and side["candidates"] == ["Paris", "Rome"]
    assert side["clean_candidate_logprobs"] == {"Paris": -2.0, "Rome": -0.5} and side["expect"] == "Paris"


def test_markdown_report_has_counts_table_and_regression_details(tmp_path, summary):
    text = write_markdown_report(tmp_path / "summary.md", summary).read_text(encoding="utf-8")
    assert text.startswith("## pytest-patchscope: 5 probes: 1 unchanged, 1 regressed")
    assert "| regressed | 1 |" in text and "| unchanged | 1 |" in text
    assert "### Regressions" in text and "#### `t.py::test_a[0]::probe=a`" in text
    assert "- lost hits at layers 0, 1, 2, 3 (4 \\> allow\\_lost\\_layers=0)" in text
    assert "```text\nlayer | baseline" in text and "<details>" in text and "</details>" in text
    assert "### Improvements" in text and "- `t.py::test_c::probe=c`: gained hits at layer 1" in text


def test_markdown_fences_survive_backticks_in_keys(tmp_path):
    summary = SessionSummary()
    summary.add(
        "t.py::test_x[`a`]::probe=1", compare_profiles(profile([0]), profile([])), "t.py::test_x[`a`]"
    )
    text = write_markdown_report(tmp_path / "s.md", summary).read_text(encoding="utf-8")
    assert "#### `` t.py::test_x[`a`]::probe=1 ``" in text


def test_report_write_failure_is_a_report_error_and_leaves_no_temp_file(tmp_path, monkeypatch, summary):
    path = tmp_path / "r.json"
    path.write_text("old\n", encoding="utf-8")

    def crash(*args):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(ReportError, match=f"cannot write report {path}.*Permission denied"):
        write_json_report(path, summary)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---- heatmaps -----------------------------------------------------------------------------------
def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_heatmaps_one_png_per_sweep_with_regressions_side_by_side(tmp_path, summary):
    pytest.importorskip("matplotlib")
    written = write_heatmaps(tmp_path / "heatmaps", summary)
    assert sorted(p.name for p in (tmp_path / "heatmaps").iterdir()) == sorted(p.name for p in written)
    assert len(written) == 5
    by_key = {r.key: path for r, path in zip(summary.records, written)}
    regressed_width = png_size(by_key["t.py::test_a[0]::probe=a"])[0]
    single_width = png_size(by_key["t.py::test_b::probe=b"])[0]
    assert regressed_width > 1.5 * single_width


def test_heatmap_of_a_grid_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    summary = SessionSummary()
    summary.add(
        "grid", compare_profiles(profile([1, 2], n=5, grid=True), profile([2], n=5, grid=True)), "t.py::g"
    )
    (path,) = write_heatmaps(tmp_path, summary)
    width, height = png_size(path)
    assert path.name == heatmap_filename("grid") and width > 2 * 300 and height > 300


def test_heatmaps_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch, summary):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install 'pytest-patchscope\[plot\]'"):
        write_heatmaps(tmp_path, summary)
    assert list(tmp_path.iterdir()) == []


def test_heatmap_filenames_are_safe_and_distinct():
    a, b = heatmap_filename("tests/t.py::test_x[a/b]::probe=1"), heatmap_filename(
        "tests/t.py::test_x[a_b]::probe=1"
    )
    assert a != b and a.startswith("tests_t.py_test_x_a_b_probe_1-") and a.endswith(".png")
    assert all(ch.isalnum() or ch in "._-" for ch in a)


# ---- JUnit ---------------------------------------------------------------------------------------
def test_junit_properties_of_a_comparison():
    props = dict(junit_properties(compare_profiles(profile([0, 1, 2, 3]), profile([6]), Tolerances())))
    assert props["patchscope.status"] == "regressed"
    assert props["patchscope.hit_layers"] == "6" and props["patchscope.first_hit"] == "6"
    assert (
        props["patchscope.baseline_hit_layers"] == "0,1,2,3" and props["patchscope.baseline_first_hit"] == "0"
    )
    assert props["patchscope.peak_layer"] == "6" and props["patchscope.peak_logprob"] == "-0.5000"
    assert "first hit moved from layer 0 to layer 6" in props["patchscope.reasons"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())


def test_junit_properties_of_a_bare_profile():
    assert junit_properties(profile([0, 1, 2, 3], peak=1)) == [
        ("patchscope.status", "recorded"),
        ("patchscope.hit_layers", "0,1,2,3"),
        ("patchscope.first_hit", "0"),
        ("patchscope.peak_layer", "1"),
        ("patchscope.peak_logprob", "-0.1000"),
    ]
    assert dict(junit_properties(profile([])))["patchscope.first_hit"] == ""
