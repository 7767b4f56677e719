"""Reporting: the session's probe outcomes as terminal lines, JSON, Markdown, heatmaps, JUnit properties.

Consumes the SessionSummary (``summary.py``) and never compares.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pytest_patchscope.baseline.comparator import Comparison, best_cells_by_layer
from pytest_patchscope.baseline.profile import LocalizationProfile
from pytest_patchscope.baseline.render import hit_mark, side_by_side
from pytest_patchscope.baseline.serializer import round_logprob
from pytest_patchscope.errors import ReportError
from pytest_patchscope.reports.summary import RECORDED, ProbeRecord, SessionSummary, counts_line, profile_facts, write_report_file

REPORT_FORMAT = "pytest-patchscope-report"
REPORT_VERSION = 2


def hit_strip(record: ProbeRecord) -> list[str]:
    """Rows ``layer``/``baseline``/``current`` with one column per source layer: hit, miss, not swept."""
    sides = [("current", best_cells_by_layer(record.profile))]
    baseline = record.comparison.baseline if record.comparison else None
    if baseline is not None:
        sides.insert(0, ("baseline", best_cells_by_layer(baseline)))
    layers = sorted({layer for _, cells in sides for layer in cells})
    width = max(len(str(layer)) for layer in layers) + 1 if layers else 2
    rows = ["layer    " + "".join(f"{layer:>{width}}" for layer in layers)]
    for label, cells in sides:
        marks = (hit_mark(cells[layer].hit if layer in cells else None) for layer in layers)
        rows.append((f"{label:<9}" + "".join(f"{mark:>{width}}" for mark in marks)).rstrip())
    return rows


def _with_status(summary: SessionSummary, status: str) -> list[tuple[ProbeRecord, Comparison]]:
    return [(r, r.comparison) for r in summary.records if r.comparison and r.comparison.status == status]


def _unused_count(summary: SessionSummary) -> str:
    n = len(summary.unused)
    return f"{n} baseline entr{'y' if n == 1 else 'ies'} unused"


def unused_line(summary: SessionSummary) -> str | None:
    """``2 baseline entries unused: a, b`` (None when every entry matched a probe)."""
    return f"{_unused_count(summary)}: " + ", ".join(summary.unused) if summary.unused else None


def render_terminal_summary(summary: SessionSummary) -> list[str]:
    """Lines for ``pytest_terminal_summary``: counts, each regression's hit strip and reasons,
    probes missing from the baseline, and entries that nothing matched."""
    lines = [counts_line(summary)] if summary.records else []
    for record, comparison in _with_status(summary, "regressed"):
        lines.append(f"regressed: {record.key}")
        lines += ["  " + row for row in hit_strip(record)]
        lines += [f"  - {reason}" for reason in comparison.reasons]
    for record, _ in _with_status(summary, "missing"):
        lines.append(f"missing from the baseline: {record.key}")
    for record, comparison in _with_status(summary, "improved"):
        lines.append(f"improved: {record.key}: " + "; ".join(comparison.reasons))
    unused = unused_line(summary)
    if unused:
        lines.append(unused)
    return lines


def write_json_report(path: str | os.PathLike[str], summary: SessionSummary) -> Path:
    """Machine-readable report for CI: counts, then per probe its status, reasons, hit layers, and each
    side's cells, so that a dashboard can redraw any heatmap from this file alone (see
    :func:`profile_facts`). Version 2 readers keep working: the cells and texts are added keys."""
    probes = []
    for r in summary.records:
        c = r.comparison
        probes.append(
            {
                "key": r.key,
                "nodeid": r.nodeid,
                "status": r.status,
                "probe": r.profile.describe(),
                "site": r.profile.probe.get("site", "resid_post"),
                "units": r.profile.probe.get("units"),
                "expect": r.profile.expect,
                "grid": r.profile.grid,
                "reasons": c.reasons if c else [],
                "notes": c.notes if c else [],
                "lost_layers": c.lost_layers if c else [],
                "gained_layers": c.gained_layers if c else [],
                "score_drop": round_logprob(c.score_drop) if c else None,
                "baseline": profile_facts(c.baseline if c else None),
                "current": profile_facts(r.profile),
            }
        )
    document = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "total": len(probes),
        "counts": summary.counts(),
        "probes": probes,
        "unused_baseline_entries": list(summary.unused),
    }
    return write_report_file(
        path, json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    )


def _code(text: str, block: bool = False) -> str:
    """Markdown code span/block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    if block:
        fence = "`" * max(3, longest + 1)
        return f"{fence}text\n{text}\n{fence}"
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}" if longest else f"`{text}`"


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def write_markdown_report(path: str | os.PathLike[str], summary: SessionSummary) -> Path:
    """GitHub-job-summary Markdown: a counts table, then each regression with reasons and both profiles."""
    counts = summary.counts()
    lines = [f"## pytest-patchscope: {counts_line(summary)}", "", "| status | probes |", "| --- | ---: |"]
    lines += [f"| {status} | {n} |" for status, n in counts.items()]
    regressed = _with_status(summary, "regressed")
    if regressed:
        lines += ["", "### Regressions"]
    for r, comparison in regressed:
        lines += ["", f"#### {_code(r.key)}", "", f"Test: {_code(r.nodeid)}", ""]
        lines += [f"- {_md_escape(reason)}" for reason in comparison.reasons]
        lines += [f"- note: {_md_escape(note)}" for note in comparison.notes]
        table = side_by_side(comparison.baseline, comparison.current)
        lines += [
            "",
            "<details><summary>both profiles, per layer</summary>",
            "",
            _code(table, block=True),
            "",
            "</details>",
        ]
    missing = _with_status(summary, "missing")
    if missing:
        lines += ["", "### Missing from the baseline", ""]
        lines += [f"- {_code(r.key)} (test {_code(r.nodeid)})" for r, _ in missing]
    improved = _with_status(summary, "improved")
    if improved:
        lines += ["", "### Improvements", ""]
        lines += [f"- {_code(r.key)}: " + _md_escape("; ".join(c.reasons)) for r, c in improved]
    if summary.unused:
        lines += ["", f"### {_unused_count(summary)}", ""]
        lines += [f"- {_code(key)}" for key in summary.unused]
    return write_report_file(path, "\n".join(lines) + "\n")


# ---- heatmaps ----------------------------------------------------------------------------
def _matplotlib() -> tuple[Any, Any]:
    """Figure and the Agg canvas, imported only when heatmaps are asked for (``plot`` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(
            "writing heatmaps needs matplotlib, which is not installed. "
            "Install it with: pip install 'pytest-patchscope[plot]' (or drop the heatmap option)."
        ) from exc
    return Figure, FigureCanvasAgg


def heatmap_filename(key: str) -> str:
    """A file name safe on every OS, unique per key even where two keys slug the same."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:100]
    return f"{slug}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:8]}.png"


def _score(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.nan


def _draw_sweep(axes: Any, profile: LocalizationProfile, title: str, vmin: float, vmax: float) -> Any:
    """Two 1-row images over source layers: hit (top) and expected-token log-probability (bottom)."""
    cells = best_cells_by_layer(profile)
    layers = list(cells)
    hit_ax, lp_ax = axes
    hits = [[math.nan if cells[layer].hit is None else float(bool(cells[layer].hit)) for layer in layers]]
    hit_ax.imshow(hits, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    hit_ax.set_title(title)
    hit_ax.set_yticks([0], ["hit"])
    image = lp_ax.imshow(
        [[_score(cells[layer].logprob) for layer in layers]],
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
    )
    lp_ax.set_yticks([0], ["logprob"])
    for ax in axes:
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    lp_ax.set_xlabel("source layer l")
    return image


def _draw_grid(ax: Any, profile: LocalizationProfile, title: str, vmin: float, vmax: float) -> Any:
    """Source layer x target layer (or x head) log-probability image; hit cells outlined in white."""
    layers, per_unit = profile.layers, profile.per_unit
    targets = profile.units if per_unit else profile.target_layers
    grid = [[math.nan] * len(targets) for _ in layers]
    hits_x, hits_y = [], []
    for c in profile.cells:
        row, col = layers.index(c.layer), targets.index(c.unit if per_unit and c.unit is not None else c.target_layer)
        grid[row][col] = _score(c.logprob)
        if c.hit:
            hits_x.append(col)
            hits_y.append(row)
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    ax.scatter(hits_x, hits_y, marker="s", facecolors="none", edgecolors="white", s=30)
    ax.set_xticks(range(len(targets)), [str(target) for target in targets])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head (patched alone)" if per_unit else "target layer l*")
    ax.set_ylabel("source layer l")
    ax.set_title(title)
    return image


def write_heatmaps(directory: str | os.PathLike[str], summary: SessionSummary) -> list[Path]:
    """One PNG per sweep (see :func:`heatmap_filename`); a regression shows baseline | current side by side.

    Needs the ``plot`` extra; uses matplotlib's Agg canvas directly, so no global backend is changed.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    written = []
    for record in summary.records:
        baseline = record.comparison.baseline if record.comparison else None
        sides = [("current", record.profile)]
        if record.status == "regressed" and baseline is not None:
            sides.insert(0, ("baseline", baseline))
        scores = [_score(c.logprob) for _, p in sides for c in p.cells if math.isfinite(_score(c.logprob))]
        vmin, vmax = (min(scores), max(scores)) if scores else (-10.0, 0.0)
        grid = any(p.grid or p.per_unit for _, p in sides)
        width = max(4.0, 0.35 * max(len(p.layers) for _, p in sides))
        fig = Figure(figsize=(width * len(sides), width if grid else 2.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1 if grid else 2, len(sides), squeeze=False)
        for column, (label, profile) in enumerate(sides):
            title = f"{label}: {record.status}" if label == "current" else label
            if grid:
                image = _draw_grid(axes[0][column], profile, title, vmin, vmax)
            else:
                image = _draw_sweep((axes[0][column], axes[1][column]), profile, title, vmin, vmax)
        fig.colorbar(image, ax=axes.ravel().tolist(), label="log p(expected)")
        fig.suptitle(record.key, fontsize="small")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        written.append(write_report_file(Path(directory) / heatmap_filename(record.key), buffer.getvalue()))
    return written


# ---- JUnit -------------------------------------------------------------------------------------
def _layer_list(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def _opt(value: object) -> str:
    return "" if value is None else str(value)


def junit_properties(outcome: Comparison | LocalizationProfile) -> list[tuple[str, str]]:
    """``record_property`` pairs for JUnit XML: status and the localization facts of both sides."""
    comparison = outcome if isinstance(outcome, Comparison) else None
    profile = outcome.current if isinstance(outcome, Comparison) else outcome
    peak = profile.peak_cell
    props = [
        ("patchscope.status", RECORDED if comparison is None else comparison.status),
        ("patchscope.hit_layers", _layer_list(profile.hit_layers)),
        ("patchscope.first_hit", _opt(profile.first_hit)),
        ("patchscope.peak_layer", _opt(profile.peak_layer)),
        ("patchscope.peak_logprob", "" if peak is None or peak.logprob is None else f"{peak.logprob:.4f}"),
    ]
    if comparison is not None and comparison.baseline is not None:
        base = comparison.baseline
        props += [
            ("patchscope.baseline_hit_layers", _layer_list(base.hit_layers)),
            ("patchscope.baseline_first_hit", _opt(base.first_hit)),
            ("patchscope.baseline_peak_layer", _opt(base.peak_layer)),
        ]
    if comparison is not None and comparison.reasons:
        props.append(("patchscope.reasons", "; ".join(comparison.reasons)))
    return props
