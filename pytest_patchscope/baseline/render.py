"""Rendering comparisons for people: one-character hit marks, the side-by-side table, failure text."""
from __future__ import annotations

from pytest_patchscope.baseline.comparator import Comparison, best_cells_by_layer
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile

HIT_MARK, MISS_MARK, NO_MARK = "■", "·", " "


def hit_mark(hit: bool | None) -> str:
    """One character for a cell: hit, miss, or unknown (no expect / not swept)."""
    return NO_MARK if hit is None else HIT_MARK if hit else MISS_MARK


def _side(cell: LayerCell | None, grid: bool, text_width: int) -> str:
    if cell is None:
        return "(not swept)"
    lp = "" if cell.logprob is None else f"{cell.logprob:.4f}"
    text = repr(cell.text)
    if len(text) > text_width:
        text = text[: text_width - 1] + "…"
    where = f"l*={cell.target_layer:<3} " if grid else ""
    margin = "" if cell.margin is None else f"margin {cell.margin:+.2f} "
    flag = " (degenerate)" if cell.degenerate else ""
    return f"{hit_mark(cell.hit)} {lp:>9} {where}{margin}{text}{flag}"


def side_by_side(
    baseline: LocalizationProfile | None, current: LocalizationProfile, text_width: int = 28
) -> str:
    """``layer | baseline | current`` table, one row per source layer (a grid shows each layer's best cell)."""
    base = best_cells_by_layer(baseline) if baseline is not None else {}
    cur = best_cells_by_layer(current)
    grid = current.grid or (baseline is not None and baseline.grid)
    left = {
        layer: "(no baseline)" if baseline is None else _side(base.get(layer), grid, text_width)
        for layer in sorted({*base, *cur})
    }
    width = max([len("baseline"), *map(len, left.values())])
    rows = [f"{'layer':>5} | {'baseline':<{width}} | current"]
    rows += [
        f"{layer:>5} | {left[layer]:<{width}} | {_side(cur.get(layer), grid, text_width)}" for layer in left
    ]
    return "\n".join(rows)


def render_comparison(comparison: Comparison) -> str:
    """A failure message: what moved from where to where, then both profiles side by side."""
    lines = [f"patchscope {comparison.status}: {comparison.current.describe()}"]
    lines += [f"  - {r}" for r in comparison.reasons]
    lines += [f"  note: {n}" for n in comparison.notes]
    lines.append(side_by_side(comparison.baseline, comparison.current))
    return "\n".join(lines)
