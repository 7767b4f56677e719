"""The HTML report: one self-contained page per session, for CI artifacts (``--patchscope-report-html``).

Everything is inline: the CSS, the script, the data (JSON in a ``<script type="application/json">``)
and the heatmaps (SVG drawn here, so they show without the script). A Content-Security-Policy
allows only this page's own style and script (by hash) and no network at all, so a page opened
from a CI artifact fetches nothing. Every text from a probe is HTML-escaped on the page and
JSON-escaped in the data (``<``, ``>`` and ``&`` as ``\\u003c`` ...), and the script writes texts
with ``textContent`` only, so a prompt holding ``</script><b>`` shows as text.

The heatmaps are also what the pytest-html extras show (``html_extras.py``), without the script.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pytest_patchscope.baseline.comparator import best_cells_by_layer
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.errors import ReportError
from pytest_patchscope.reports.summary import ProbeRecord, SessionSummary, counts_line, json_safe, profile_facts, sorted_cells, write_report_file

HTML_REPORT_OPTION = "--patchscope-report-html"
PAGE_ORDER = ("regressed", "missing", "improved", "new", "recorded", "unchanged")
"""The order of probes on the page: what needs a look first."""


def _e(value: object) -> str:
    """HTML-escaped text, quotes included (safe in element content and in attribute values)."""
    return html.escape(str(value), quote=True)


def check_html_report_path(path: Path) -> None:
    """Refuse, before any test runs, an HTML report path that could not be written at the end.

    A folder given as the file, a folder that does not exist, and a folder in which no file can
    be created (tried for real: permission bits say nothing for root or on a read-only mount)
    are a ReportError naming the option and the path.
    """
    where = f"{HTML_REPORT_OPTION}={path}"
    if path.is_dir():
        raise ReportError(f"{where} is a folder, not a file. Name the file to write, e.g. {path / 'patchscope.html'}.")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ReportError(
            f"{where}: its folder {folder} {what}. Create it (mkdir -p {folder}) or point the option at an existing folder."
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".patchscope-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ReportError(
            f"{where}: no file can be created in {folder} ({exc.strerror or exc}). Choose a writable path."
        ) from None


# ---- heatmaps as SVG ---------------------------------------------------------------------------
def _ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5`` (``none`` when empty)."""
    runs: list[list[int]] = []
    for value in sorted(set(values)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


@dataclass(frozen=True)
class HeatmapLayout:
    """Shared axes of a probe's heatmaps (baseline and current line up cell for cell).

    ``grid``: source layer l (rows, l = 0 at the bottom) x target layer l*; ``heads``: l x head, for a
    per-unit profile; ``strip``: one row over source layers, one cell per layer (its best one, as in
    the terminal's hit strip, where a layer has several).
    """

    kind: str
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def of(cls, profiles: Sequence[LocalizationProfile]) -> "HeatmapLayout":
        if any(p.per_unit for p in profiles):
            return cls("heads", _union(p.layers for p in profiles), _union(p.units for p in profiles))
        if any(p.grid for p in profiles):
            return cls("grid", _union(p.layers for p in profiles), _union(p.target_layers for p in profiles))
        return cls("strip", (), _union(p.layers for p in profiles))

    @property
    def x_label(self) -> str:
        return {"grid": "target layer l*", "heads": "head (patched alone)", "strip": "source layer l"}[self.kind]

    def placed(self, profile: LocalizationProfile) -> list[tuple[int, int, int, LayerCell]]:
        """(row, column, index in :func:`sorted_cells`, cell) for each cell this layout draws."""
        cells = sorted_cells(profile)
        index = {id(c): i for i, c in enumerate(cells)}
        if self.kind == "strip":
            best = best_cells_by_layer(profile)
            return [(0, self.cols.index(layer), index[id(c)], c) for layer, c in best.items()]
        out = []
        for i, c in enumerate(cells):
            col = c.unit if self.kind == "heads" else c.target_layer
            if col is None or c.layer not in self.rows or col not in self.cols:
                continue
            out.append((self.rows.index(c.layer), self.cols.index(col), i, c))
        return out

    def coord(self, cell: LayerCell) -> str:
        """The cell's place, the same on both sides: ``l`` for a strip, else ``l,l*,head``."""
        if self.kind == "strip":
            return str(cell.layer)
        return f"{cell.layer},{cell.target_layer},{'' if cell.unit is None else cell.unit}"


def _union(groups: Iterable[Iterable[int]]) -> tuple[int, ...]:
    return tuple(sorted({value for group in groups for value in group}))


VIRIDIS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
DIVERGING = ("#b2182b", "#ef8a62", "#f7f7f7", "#67a9cf", "#2166ac")
NO_SCORE = "#d4d4d4"
MIN_SPAN = 4.0
"""The narrowest colour scale, in nats (a margin scale spans at least -1 to 1)."""


def _mix(stops: Sequence[str], t: float) -> str:
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    k = min(int(t), len(stops) - 2)
    a, b = stops[k], stops[k + 1]
    frac = t - k
    rgb = [round(int(a[i : i + 2], 16) * (1 - frac) + int(b[i : i + 2], 16) * frac) for i in (1, 3, 5)]
    return "#" + "".join(f"{v:02x}" for v in rgb)


@dataclass(frozen=True)
class ColourScale:
    """Colour of a cell: its margin when both sides' cells carry one (diverging around 0, blue = the
    expected answer is preferred), else its expected-token log-probability (viridis, yellow = likely)."""

    metric: str
    low: float
    high: float

    @classmethod
    def of(cls, profiles: Sequence[LocalizationProfile]) -> "ColourScale":
        cells = [c for p in profiles for c in p.cells]
        # Margins only where every side has them: a baseline file recorded before candidates has none.
        if profiles and all(any(c.margin is not None for c in p.cells) for p in profiles):
            values = [abs(c.margin) for c in cells if c.margin is not None and math.isfinite(c.margin)]
            bound = max(values + [MIN_SPAN / 4])
            return cls("margin", -bound, bound)
        values = [c.logprob for c in cells if c.logprob is not None and math.isfinite(c.logprob)]
        low, high = (min(values), max(values)) if values else (-10.0, 0.0)
        # A span of at least MIN_SPAN nats: scores that differ by a few hundredths look alike.
        return cls("logprob", min(low, high - MIN_SPAN), high)

    @property
    def label(self) -> str:
        return "margin (expected - best other, nats)" if self.metric == "margin" else "log p(expected first token)"

    def value(self, cell: LayerCell) -> float | None:
        value = cell.margin if self.metric == "margin" else cell.logprob
        if value is None or math.isnan(value):
            return None
        return value

    def colour(self, cell: LayerCell) -> str:
        value = self.value(cell)
        if value is None:
            return NO_SCORE
        t = 0.0 if value == -math.inf else (value - self.low) / (self.high - self.low)
        return _mix(DIVERGING if self.metric == "margin" else VIRIDIS, t)

    def legend_svg(self) -> str:
        stops = DIVERGING if self.metric == "margin" else VIRIDIS
        swatches = "".join(
            f'<rect x="{50 + 24 * k}" y="4" width="24" height="12" fill="{colour}" stroke="#bbbbbb" stroke-width="0.5"/>'
            for k, colour in enumerate(stops)
        )
        end = 50 + 24 * len(stops)
        marks = (
            f'<circle cx="{end + 52}" cy="10" r="4" fill="#ffffff" stroke="#111111"/>'
            f'<text x="{end + 60}" y="14">hit</text>'
            f'<path d="M {end + 96} 4 L {end + 106} 4 L {end + 106} 14 Z" fill="#f97316"/>'
            f'<text x="{end + 110}" y="14">degenerate text</text>'
            f'<rect x="{end + 210}" y="4" width="12" height="12" fill="{NO_SCORE}"/>'
            f'<text x="{end + 226}" y="14">no score</text>'
        )
        return (
            f'<svg class="legend" width="{end + 300}" height="36" font-family="sans-serif" font-size="11" role="img" aria-label="colour scale">'
            f'<text x="0" y="14">{self.low:.2f}</text>{swatches}<text x="{end + 4}" y="14">{self.high:.2f}</text>'
            f"{marks}<text x=\"0\" y=\"32\">colour: {_e(self.label)}</text></svg>"
        )


def _cell_title(side: str, cell: LayerCell) -> str:
    where = f"l={cell.layer} l*={cell.target_layer}" + ("" if cell.unit is None else f" head {cell.unit}")
    hit = "no expect" if cell.hit is None else "hit" if cell.hit else "miss"
    figures = [hit]
    if cell.logprob is not None:
        figures.append(f"log p {cell.logprob:.3f}")
    if cell.rank is not None:
        figures.append(f"rank {cell.rank}")
    if cell.margin is not None:
        figures.append(f"margin {cell.margin:.3f}")
    if cell.degenerate:
        figures.append(f"degenerate: {cell.degenerate}")
    text = cell.text if len(cell.text) <= 80 else cell.text[:79] + "…"
    return f"{side}: {where}: {', '.join(figures)}: {text!r}"


def heatmap_svg(
    profile: LocalizationProfile, layout: HeatmapLayout, scale: ColourScale, side: str, *, interactive: bool = True
) -> str:
    """One side's heatmap as inline SVG; each drawn cell is a ``rect.cell`` with a tooltip.

    ``interactive`` cells carry ``data-side``/``data-index`` (into the side's cells in the page's
    data) and ``data-coord`` (the same place on the other side) and can be focused, for the page's script.
    """
    n_rows, n_cols = max(1, len(layout.rows)), max(1, len(layout.cols))
    if layout.kind == "strip":
        size = max(10, min(26, 520 // n_cols))
    else:
        size = max(8, min(26, 390 // max(n_rows, n_cols)))
    left, top, bottom = (8 if layout.kind == "strip" else 46), 22, 36
    width, height = left + size * n_cols + 10, top + size * n_rows + bottom
    parts = [
        f'<svg class="heatmap" data-side="{side}" data-kind="{layout.kind}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="group" aria-label="{_e(side)} heatmap">',
        f'<text class="title" x="{left}" y="14" font-size="13" font-weight="600">{_e(side)}</text>',
        f'<rect class="frame" x="{left}" y="{top}" width="{size * n_cols}" height="{size * n_rows}" fill="#f6f6f6" stroke="#bbbbbb"/>',
    ]
    x_step, y_step = math.ceil(18 / size), math.ceil(13 / size)
    for k, col in enumerate(layout.cols):
        if k % x_step == 0:
            parts.append(f'<text class="tick" x="{left + size * k + size / 2:.1f}" y="{top + size * n_rows + 12}" text-anchor="middle">{col}</text>')
    parts.append(f'<text class="axis" x="{left + size * n_cols / 2:.1f}" y="{height - 4}" text-anchor="middle">{_e(layout.x_label)}</text>')
    if layout.kind != "strip":
        for k, row in enumerate(layout.rows):
            if k % y_step == 0:
                y = top + size * (n_rows - 1 - k) + size / 2 + 4
                parts.append(f'<text class="tick" x="{left - 4}" y="{y:.1f}" text-anchor="end">{row}</text>')
        mid = top + size * n_rows / 2
        parts.append(f'<text class="axis" x="12" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 12 {mid:.1f})">source layer l</text>')
    for row, col, index, cell in layout.placed(profile):
        x, y = left + size * col, top + size * (n_rows - 1 - row)
        hit_class = " hit" if cell.hit else " miss" if cell.hit is False else ""
        attrs = (
            f' data-side="{side}" data-index="{index}" data-coord="{layout.coord(cell)}" tabindex="0" role="button"'
            if interactive
            else ""
        )
        parts.append(
            f'<rect class="cell{hit_class}" x="{x}" y="{y}" width="{size}" height="{size}" fill="{scale.colour(cell)}" '
            f'stroke="#ffffff" stroke-width="0.5"{attrs}><title>{_e(_cell_title(side, cell))}</title></rect>'
        )
        if cell.hit:
            parts.append(
                f'<circle class="mark hit-mark" cx="{x + size / 2:.1f}" cy="{y + size / 2:.1f}" r="{max(2.0, size * 0.18):.1f}" '
                'fill="#ffffff" stroke="#111111" stroke-width="1" pointer-events="none"/>'
            )
        if cell.degenerate:
            s = max(4.0, size * 0.4)
            parts.append(
                f'<path class="mark degenerate-mark" d="M {x + size - s:.1f} {y} L {x + size} {y} L {x + size} {y + s:.1f} Z" '
                'fill="#f97316" pointer-events="none"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _layers_text(profile: LocalizationProfile, layout: HeatmapLayout) -> tuple[str, str]:
    """What l and l* were: ``0-11`` and ``= l`` / ``0-11 (every l x l*)`` / a list."""
    layers = _ranges(profile.layers)
    if layout.kind == "grid" or profile.grid:
        return layers, f"{_ranges(profile.target_layers)} (every l × l*)"
    if all(c.target_layer == c.layer for c in profile.cells):
        return layers, "= l"
    return layers, _ranges(profile.target_layers)


def identity_table(profile: LocalizationProfile, layout: HeatmapLayout) -> str:
    """(S, i, l) -> (T, i*, l*, site, units) as a small table, then f, strength and the rest."""
    p = profile.probe
    layers, targets = _layers_text(profile, layout)
    target_text = repr(p.get("target"))
    if p.get("preset"):
        target_text = f"preset {p['preset']}: {target_text}"
    units = p.get("units")
    units_text = "all" if units is None else "each head alone" if units == "each" else _shown(units)
    rows = [
        [("S", repr(p.get("source"))), ("i", p.get("source_position")), ("l", layers)],
        [("T", target_text), ("i*", p.get("target_position")), ("l*", targets)],
        [("site", p.get("site", "resid_post")), ("units", units_text), ("f", _shown(p.get("mapping", "identity")))],
    ]
    known = {"source", "source_position", "target", "target_position", "preset", "site", "units", "mapping"}
    extra = [(name, _shown(value)) for name, value in sorted(p.items()) if name not in known]
    extra.append(("expect", repr(profile.expect)))
    out = ['<table class="identity">']
    for row in rows:
        out.append("<tr>" + "".join(f'<th scope="row">{_e(k)}</th><td><code>{_e(v)}</code></td>' for k, v in row) + "</tr>")
    out.append("</table>")
    out.append('<p class="more">' + "; ".join(f"{_e(k)} = <code>{_e(v)}</code>" for k, v in extra) + "</p>")
    return "".join(out)


def _checkpoint(profile: LocalizationProfile) -> str:
    facts = [fact for fact in (profile.dtype, "" if profile.path == "packed" else f"{profile.path} path") if fact]
    return f"{profile.model or '?'} @ {profile.weights_hash[:12] or '?'}" + (f" ({', '.join(facts)})" if facts else "")


def figures_table(record: ProbeRecord) -> str:
    """Both sides' summary figures in columns (the current one alone without a baseline)."""
    comparison = record.comparison
    sides = [("current", record.profile)]
    if comparison is not None and comparison.baseline is not None:
        sides.insert(0, ("baseline", comparison.baseline))

    def peak(p: LocalizationProfile) -> str:
        cell = p.peak_cell
        if cell is None:
            return "—"
        where = f"l={cell.layer}" + ("" if cell.target_layer == cell.layer else f" l*={cell.target_layer}")
        where += "" if cell.unit is None else f" head {cell.unit}"
        return f"{where}: {cell.logprob:.4f}" if cell.logprob is not None else where

    rows = [
        ("checkpoint", _checkpoint),
        ("hit layers", lambda p: _ranges(p.hit_layers)),
        ("first hit", lambda p: "—" if p.first_hit is None else str(p.first_hit)),
        ("peak (log p)", peak),
        ("clean text", lambda p: "(not generated)" if p.clean_text is None else repr(p.clean_text)),
    ]
    baseline_clean = "'' (empty, or not kept: a baseline file stores no clean text)"
    out = ['<table class="figures"><tr><th></th>' + "".join(f"<th>{label}</th>" for label, _ in sides) + "</tr>"]
    for name, get in rows:
        values = [baseline_clean if name == "clean text" and side == "baseline" and p.clean_text == "" else get(p) for side, p in sides]
        out.append(f"<tr><th scope=\"row\">{_e(name)}</th>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    if comparison is not None and comparison.baseline is not None:
        drop = "—" if comparison.score_drop is None else f"{comparison.score_drop:.4f}".replace("-0.0000", "0.0000")
        changes = f"lost {_ranges(comparison.lost_layers)}; gained {_ranges(comparison.gained_layers)}; peak score drop {drop} nats"
        out.append(f'<tr><th scope="row">change</th><td colspan="{len(sides)}">{_e(changes)}</td></tr>')
    out.append("</table>")
    return "".join(out)


def heatmaps_html(record: ProbeRecord, *, interactive: bool = True) -> str:
    """Baseline and current heatmaps side by side (current alone without a baseline), and the legend."""
    comparison = record.comparison
    profiles = {"current": record.profile}
    if comparison is not None and comparison.baseline is not None:
        profiles = {"baseline": comparison.baseline, "current": record.profile}
    layout = HeatmapLayout.of(list(profiles.values()))
    scale = ColourScale.of(list(profiles.values()))
    figures = "".join(
        f'<figure class="heatmap-figure">{heatmap_svg(p, layout, scale, side, interactive=interactive)}</figure>'
        for side, p in profiles.items()
    )
    # Another page (pytest-html's) lacks this page's CSS: lay the two sides out inline there.
    style = "" if interactive else ' style="display:flex;flex-wrap:wrap;gap:24px"'
    return f'<div class="heatmaps"{style}>{figures}</div>{scale.legend_svg()}'


def _list(css: str, items: Sequence[str], label: str) -> str:
    if not items:
        return ""
    return f'<div class="{css}"><strong>{_e(label)}</strong><ul>' + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul></div>"


def _probe_section(index: int, record: ProbeRecord) -> str:
    comparison = record.comparison
    profiles = [record.profile] + ([comparison.baseline] if comparison is not None and comparison.baseline is not None else [])
    layout = HeatmapLayout.of(profiles)
    status = record.status
    return "".join(
        [
            f'<section class="probe" id="probe-{index}" data-index="{index}" data-status="{_e(status)}" data-key="{_e(record.key)}">',
            f'<h2><span class="badge status-{_e(status)}">{_e(status)}</span> <code class="key">{_e(record.key)}</code></h2>',
            f'<p class="test">test <code>{_e(record.nodeid)}</code>' + (f" on worker {_e(record.worker)}" if record.worker else "") + "</p>",
            identity_table(record.profile, layout),
            f'<p class="describe"><code>{_e(record.profile.describe())}</code></p>',
            _list("reasons", comparison.reasons if comparison else [], "why " + status),
            _list("notes", comparison.notes if comparison else [], "notes"),
            figures_table(record),
            heatmaps_html(record),
            '<div class="detail" aria-live="polite"><p class="hint">Click a heatmap cell to see its patched and clean '
            "texts, its figures and its candidate scores.</p></div>",
            "</section>",
        ]
    )


def _counts_html(summary: SessionSummary) -> str:
    counts = summary.counts()
    items = [
        f'<li class="{"zero" if counts[status] == 0 else ""}"><span class="badge status-{status}">{status}</span> '
        f'<span class="count" data-status="{status}">{counts[status]}</span></li>'
        for status in PAGE_ORDER
    ]
    unused = len(summary.unused)
    items.append(
        f'<li class="{"zero" if unused == 0 else ""}">unused baseline entries <span class="count" data-status="unused">{unused}</span></li>'
    )
    out = '<ul id="counts">' + "".join(items) + "</ul>"
    if summary.unused:
        out += (
            f"<details id=\"unused\"><summary>{unused} baseline entr{'y' if unused == 1 else 'ies'} that no probe of this "
            "session matched</summary><ul>" + "".join(f"<li><code>{_e(key)}</code></li>" for key in summary.unused) + "</ul></details>"
        )
    return out


def _filter_html(summary: SessionSummary) -> str:
    counts = summary.counts()
    boxes = "".join(
        f'<label><input type="checkbox" class="status-filter" data-status="{status}" checked> '
        f'<span class="badge status-{status}">{status}</span> ({counts[status]})</label>'
        for status in PAGE_ORDER
        if counts[status]
    )
    return (
        f'<fieldset id="filter"><legend>show probes that are</legend>{boxes}'
        '<button type="button" id="only-problems">only regressed and missing</button>'
        '<button type="button" id="show-all">all</button> <span id="hidden-count"></span></fieldset>'
    )


def page_data(records: Sequence[ProbeRecord]) -> dict[str, Any]:
    """What the page's script reads: per probe (in page order) both sides' facts and cells (as in the JSON report)."""
    probes = []
    for record in records:
        comparison = record.comparison
        profiles = [record.profile] + ([comparison.baseline] if comparison is not None and comparison.baseline is not None else [])
        probes.append(
            {
                "key": record.key,
                "nodeid": record.nodeid,
                "status": record.status,
                "probe": record.profile.probe,
                "describe": record.profile.describe(),
                "expect": record.profile.expect,
                "metric": ColourScale.of(profiles).metric,
                "sides": {
                    "baseline": profile_facts(comparison.baseline if comparison else None),
                    "current": profile_facts(record.profile),
                },
            }
        )
    return {"probes": probes}


def script_json(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` appear literally."""
    # Not-finite numbers become null and anything not JSON-able its str(), so no probe can stop the write.
    text = json.dumps(json_safe(data), ensure_ascii=False, allow_nan=False, sort_keys=True, default=str)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def ordered_records(summary: SessionSummary) -> list[ProbeRecord]:
    """The page's order: regressions first (see PAGE_ORDER), then by key."""
    rank = {status: k for k, status in enumerate(PAGE_ORDER)}
    return sorted(summary.records, key=lambda r: rank[r.status])


def render_html_report(summary: SessionSummary, context: Sequence[str] = ()) -> str:
    """The whole page as text; ``context`` lines (what the run compared with) go under the title."""
    records = ordered_records(summary)
    title = f"pytest-patchscope: {counts_line(summary)}"
    body = [
        f"<header><h1>{_e(title)}</h1>",
        ('<ul id="context">' + "".join(f"<li>{_e(line)}</li>" for line in context) + "</ul>") if context else "",
        _counts_html(summary),
        _filter_html(summary) if records else "",
        "</header><main>",
    ]
    body += [_probe_section(k, r) for k, r in enumerate(records)] or ['<p class="empty">No probe was recorded in this session.</p>']
    body.append("</main>")
    csp = f"default-src 'none'; style-src {_csp_hash(CSS)}; script-src {_csp_hash(SCRIPT)}; img-src data:; base-uri 'none'; form-action 'none'"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{CSS}</style></head><body>",
            *body,
            f'<script type="application/json" id="patchscope-data">{script_json(page_data(records))}</script>',
            f"<script>{SCRIPT}</script>",
            "</body></html>",
            "",
        ]
    )


def write_html_report(path: str | os.PathLike[str], summary: SessionSummary, context: Sequence[str] = ()) -> Path:
    """Write the self-contained page (atomically, through the reports' one write path)."""
    return write_report_file(path, render_html_report(summary, context))


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 1.5em 3em;color:#1f2328}
h1{font-size:1.3em;margin:.8em 0 .4em}h2{font-size:1.05em;margin:0 0 .3em;word-break:break-all}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.92em;white-space:pre-wrap;word-break:break-word}
[hidden]{display:none!important}
.badge{display:inline-block;padding:0 .5em;border-radius:.8em;font-size:.85em;font-weight:600;color:#fff;background:#6e7781}
.status-regressed,.status-missing{background:#cf222e}.status-improved{background:#1a7f37}.status-new{background:#0969da}
.status-unchanged{background:#6e7781}.status-recorded{background:#8250df}
#context{margin:.2em 0 .6em;padding-left:1.2em;color:#57606a}
#counts{list-style:none;display:flex;flex-wrap:wrap;gap:.4em 1.4em;margin:.4em 0;padding:0}
#counts .count{font-weight:700}#counts .zero{color:#8c959f}#counts .zero .badge{opacity:.45}
#filter{border:1px solid #d0d7de;border-radius:6px;margin:.6em 0 1em;padding:.4em .8em}
#filter label{margin-right:1em;cursor:pointer}#filter button{margin-left:.4em}
section.probe{display:block;border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em;margin:0 0 1em}
section.probe[data-status=regressed],section.probe[data-status=missing]{border-left:5px solid #cf222e}
.test,.describe,.more{margin:.2em 0;color:#57606a}
table.identity,table.figures{border-collapse:collapse;margin:.4em 0}
table.identity th,table.figures th{text-align:left;padding:.15em .5em;background:#f6f8fa;font-weight:600;vertical-align:top}
table.identity td,table.figures td{padding:.15em .8em .15em .4em;border-bottom:1px solid #eaeef2;vertical-align:top}
.reasons li{color:#a40e26}.notes li{color:#57606a}.reasons ul,.notes ul{margin:.2em 0 .4em;padding-left:1.4em}
.heatmaps{display:flex;flex-wrap:wrap;gap:1.5em;margin:.6em 0 .2em}
figure.heatmap-figure{margin:0}
svg.heatmap rect.cell{cursor:pointer}svg.heatmap rect.cell:hover,svg.heatmap rect.cell:focus{stroke:#111;stroke-width:2;outline:none}
svg.heatmap rect.cell.selected{stroke:#111;stroke-width:3}
.detail{display:flex;flex-wrap:wrap;gap:1.5em;margin-top:.6em;padding:.6em .8em;background:#f6f8fa;border-radius:6px}
.detail .hint{margin:0;color:#57606a}.detail .side{flex:1 1 380px;min-width:280px}
.detail h3{font-size:1em;margin:0 0 .3em}.detail .clicked{font-weight:400;color:#57606a}
.detail table{border-collapse:collapse;margin:.2em 0 .5em}.detail th{text-align:left;padding:.1em .6em .1em 0;font-weight:600}
.detail td{padding:.1em .6em .1em 0}.detail .expect td{font-weight:700}
pre.text{margin:.1em 0 .5em;padding:.4em .6em;background:#fff;border:1px solid #d0d7de;border-radius:4px;white-space:pre-wrap}
pre.text{word-break:break-word;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
pre.text.empty{color:#8c959f;font-style:italic}
.degenerate-flag{color:#9a3412;font-weight:600}
"""

SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("patchscope-data").textContent);
  const SIDES = ["baseline", "current"];
  const BASELINE_NO_CLEAN = "(empty, or not kept: a baseline file stores no clean text)";

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function num(value, digits) {
    return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
  }
  function row(table, name, value, cls) {
    const tr = el("tr", null, cls);
    tr.appendChild(el("th", name));
    tr.appendChild(el("td", value));
    table.appendChild(tr);
    return tr;
  }
  function textBlock(parent, label, text, cls, emptyNote) {
    parent.appendChild(el("div", label));
    const empty = text === null || text === undefined || text === "";
    const shown = text === null || text === undefined ? "(not generated: the sweep ran with clean=False)" : text === "" ? emptyNote : text;
    parent.appendChild(el("pre", shown, "text " + cls + (empty ? " empty" : "")));
  }
  function candidates(parent, probe, facts, cell) {
    const names = facts.candidates && facts.candidates.length ? facts.candidates
      : Object.keys(cell.candidate_logprobs || facts.clean_candidate_logprobs || {});
    if (!names.length) return;
    parent.appendChild(el("div", "candidate scores (summed log p)"));
    const table = el("table", null, "candidates");
    const head = el("tr");
    ["candidate", "patched", "clean"].forEach(function (h) { head.appendChild(el("th", h)); });
    table.appendChild(head);
    names.forEach(function (name) {
      const tr = el("tr", null, name === probe.expect ? "expect" : "");
      tr.appendChild(el("td", JSON.stringify(name) + (name === probe.expect ? " (expected)" : "")));
      tr.appendChild(el("td", num((cell.candidate_logprobs || {})[name], 4)));
      tr.appendChild(el("td", num((facts.clean_candidate_logprobs || {})[name], 4)));
      table.appendChild(tr);
    });
    parent.appendChild(table);
  }
  function sideDetail(probe, side, cell, clicked) {
    const facts = probe.sides[side];
    const box = el("div", null, "side side-" + side);
    const h = el("h3", side + ": l=" + cell.layer + " l*=" + cell.target_layer + (cell.unit === null ? "" : " head " + cell.unit));
    if (clicked) h.appendChild(el("span", " (clicked)", "clicked"));
    box.appendChild(h);
    const table = el("table", null, "cell-figures");
    row(table, "hit", cell.hit === null ? "— (no expect)" : cell.hit ? "yes" : "no");
    const scored = cell.margin !== null && cell.margin !== undefined;
    row(table, scored ? "log p(expected candidate)" : "log p(expected first token)", num(cell.logprob, 4));
    row(table, scored ? "rank (its first token)" : "rank", cell.rank === null ? "—" : cell.rank);
    if (cell.margin !== null && cell.margin !== undefined) row(table, "margin (nats)", num(cell.margin, 4));
    row(table, "degenerate", cell.degenerate ? "yes: " + cell.degenerate : "no", cell.degenerate ? "degenerate-flag" : "");
    box.appendChild(table);
    textBlock(box, "patched text", cell.text, "patched", "(empty)");
    textBlock(box, "clean text (unpatched target)", facts.clean_text, "clean", side === "baseline" ? BASELINE_NO_CLEAN : "(empty)");
    candidates(box, probe, facts, cell);
    return box;
  }
  function showCell(rect) {
    const section = rect.closest("section.probe");
    const probe = DATA.probes[Number(section.dataset.index)];
    const detail = section.querySelector(".detail");
    section.querySelectorAll("rect.cell.selected").forEach(function (r) { r.classList.remove("selected"); });
    detail.replaceChildren();
    SIDES.forEach(function (side) {
      const same = section.querySelector('rect.cell[data-side="' + side + '"][data-coord="' + rect.dataset.coord + '"]');
      if (!same || !probe.sides[side]) return;
      same.classList.add("selected");
      const cell = probe.sides[side].cells[Number(same.dataset.index)];
      detail.appendChild(sideDetail(probe, side, cell, same === rect));
    });
  }
  document.addEventListener("click", function (event) {
    const rect = event.target.closest && event.target.closest("rect.cell[data-index]");
    if (rect) showCell(rect);
  });
  document.addEventListener("keydown", function (event) {
    const rect = event.target.closest && event.target.closest("rect.cell[data-index]");
    if (rect && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); showCell(rect); }
  });

  const boxes = Array.from(document.querySelectorAll("input.status-filter"));
  function applyFilter() {
    const shown = new Set(boxes.filter(function (b) { return b.checked; }).map(function (b) { return b.dataset.status; }));
    let hidden = 0;
    document.querySelectorAll("section.probe").forEach(function (section) {
      section.hidden = !shown.has(section.dataset.status);
      if (section.hidden) hidden += 1;
    });
    const note = document.getElementById("hidden-count");
    if (note) note.textContent = hidden ? hidden + " probe(s) hidden by this filter" : "";
  }
  boxes.forEach(function (b) { b.addEventListener("change", applyFilter); });
  function setAll(test) { boxes.forEach(function (b) { b.checked = test(b.dataset.status); }); applyFilter(); }
  const problems = document.getElementById("only-problems");
  if (problems) problems.addEventListener("click", function () { setAll(function (s) { return s === "regressed" || s === "missing"; }); });
  const all = document.getElementById("show-all");
  if (all) all.addEventListener("click", function () { setAll(function () { return true; }); });
  applyFilter();
})();
"""


def probe_fragment(record: ProbeRecord) -> str:
    """A recorded sweep for another page (the pytest-html extras): status, figures, reasons and
    the heatmaps, with tooltips per cell and no script."""
    comparison = record.comparison
    return "".join(
        [
            f'<div class="patchscope-extra" data-key="{_e(record.key)}">',
            f'<p><strong>patchscope: {_e(record.status)}</strong> <code>{_e(record.key)}</code></p>',
            f"<p><code>{_e(record.profile.describe())}</code></p>",
            _list("reasons", comparison.reasons if comparison else [], "why " + record.status),
            _list("notes", comparison.notes if comparison else [], "notes"),
            figures_table(record),
            heatmaps_html(record, interactive=False),
            "</div>",
        ]
    )
