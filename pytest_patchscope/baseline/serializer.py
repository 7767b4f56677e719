"""The baseline file's format: a BaselineFile <-> its JSON text, every field checked on the way in.

Version 2 holds one checkpoint: the header names the model, its weights hash and its shape
(n_layers, d_model, vocab_size); each entry holds one probe's identity, the test that recorded it,
the expected answer and one line per layer cell. Logprobs are rounded so that reruns do not churn
diffs. Anything malformed (a truncated file, a hand-edited cell of the wrong type, an unknown
version) is a BaselineError that names the path and a way out that works.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import BaselineError
from ..profile import LayerCell, LocalizationProfile

FORMAT = "pytest-patchscope-baseline"
VERSION = 2
LOGPROB_DECIMALS = 4
UPDATE_OPTION = "--patchscope-update-baseline"
REWRITE_OPTION = "--patchscope-rewrite-baseline"
KEY_ANCHOR = (
    "test files relative to the project root: the nearest folder above the test with .git or .hg, "
    "else with pyproject.toml, setup.py or setup.cfg, else with pytest.ini, .pytest.ini or tox.ini"
)
ARCHITECTURE_FIELDS = ("n_layers", "d_model", "vocab_size")


@dataclass(frozen=True)
class Entry:
    """One baseline entry: a probe's profile and the test (``file::name``) that recorded it."""

    profile: LocalizationProfile
    test: str


@dataclass
class BaselineFile:
    """One baseline file: entries by key, all from one checkpoint (model, weights hash, shape)."""

    path: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    model: str = ""
    weights_hash: str = ""
    architecture: dict[str, int] = field(default_factory=dict)
    dtype: str = ""
    """The dtype its entries were recorded in ("" in files written before dtypes were recorded)."""

    @property
    def checkpoint(self) -> str:
        return describe_checkpoint(self.model, self.weights_hash)

    def profile(self, key: str) -> LocalizationProfile | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.profile


RECORDED_DTYPES = ("", "float32", "bfloat16", "float16")
"""A header's dtype: one of the loadable dtypes, or "" for a file written before dtypes were recorded."""


def describe_checkpoint(model: str, weights_hash: str, dtype: str = "") -> str:
    return f"{model or '?'} @ {weights_hash[:12] or '?'}" + (f" in {dtype}" if dtype else "")


def describe_architecture(architecture: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {architecture.get(name, '?')}" for name in ARCHITECTURE_FIELDS)


def round_logprob(value: float | None) -> float | None:
    """A log-probability as files and reports store it: rounded, and None when not finite (strict JSON)."""
    return None if value is None or not math.isfinite(value) else round(value, LOGPROB_DECIMALS)


def serialize_entry(entry: Entry) -> dict[str, Any]:
    """One entry as plain JSON data (checkpoint facts live in the file's header, not here)."""
    profile = entry.profile
    return {
        "probe": profile.probe,
        "test": entry.test,
        "expect": profile.expect,
        "grid": profile.grid,
        **({"candidates": list(profile.candidates)} if profile.candidates else {}),
        "cells": [
            {
                "layer": c.layer,
                "target_layer": c.target_layer,
                **({} if c.unit is None else {"unit": c.unit}),
                "text": c.text,
                "hit": c.hit,
                "logprob": round_logprob(c.logprob),
                "rank": c.rank,
                **({} if c.margin is None else {"margin": round_logprob(c.margin)}),
                **({} if c.candidate_logprobs is None else {"candidate_logprobs": {
                    k: round_logprob(v) for k, v in c.candidate_logprobs.items()
                }}),
                **({} if c.degenerate is None else {"degenerate": c.degenerate}),
            }
            for c in sorted(profile.cells, key=lambda c: (c.layer, c.target_layer, -1 if c.unit is None else c.unit))
        ],
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(where: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise BaselineError(f"{where}: {name}={value!r} is not valid: {allowed}")


def deserialize_cell(where: str, cell: Any) -> LayerCell:
    """A cell with every field's type checked: ``"logprob": "high"`` or ``"hit": "no"`` is an error."""
    if not isinstance(cell, Mapping):
        raise BaselineError(f"{where} is a {type(cell).__name__}, expected a JSON object")
    missing = [name for name in ("layer", "target_layer", "text") if name not in cell]
    if missing:
        raise BaselineError(f"{where} lacks {', '.join(missing)}")
    layer, target, text = cell["layer"], cell["target_layer"], cell["text"]
    hit, logprob, rank = cell.get("hit"), cell.get("logprob"), cell.get("rank")
    _check(where, "layer", layer, _is_int(layer) and layer >= 0, "an integer >= 0")
    _check(where, "target_layer", target, _is_int(target) and target >= 0, "an integer >= 0")
    _check(where, "text", text, isinstance(text, str), "a string")
    _check(where, "hit", hit, hit is None or isinstance(hit, bool), "true, false or null")
    _check(where, "logprob", logprob,
           logprob is None or _is_finite_number(logprob),
           "a finite number (a log-probability) or null")
    _check(where, "rank", rank, rank is None or (_is_int(rank) and rank >= 0), "an integer >= 0 or null")
    unit = cell.get("unit")
    _check(where, "unit", unit, unit is None or (_is_int(unit) and unit >= 0), "an integer >= 0 (a head) or absent")
    margin, scores, degenerate = cell.get("margin"), cell.get("candidate_logprobs"), cell.get("degenerate")
    _check(where, "margin", margin, margin is None or _is_finite_number(margin), "a finite number (nats) or absent")
    _check(where, "candidate_logprobs", scores,
           scores is None or (isinstance(scores, Mapping) and all(isinstance(k, str) and _is_finite_number(v) for k, v in scores.items())),
           "an object of candidate -> finite log-probability, or absent")
    _check(where, "degenerate", degenerate, degenerate is None or isinstance(degenerate, str), "a string or absent")
    return LayerCell(
        layer, target, text, hit, None if logprob is None else float(logprob), rank, unit,
        margin=None if margin is None else float(margin),
        candidate_logprobs=None if scores is None else {k: float(v) for k, v in scores.items()},
        degenerate=degenerate,
    )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def deserialize_entry(where: str, data: Any, header: BaselineFile) -> Entry:
    if not isinstance(data, Mapping):
        raise BaselineError(f"{where} is a {type(data).__name__}, expected a JSON object")
    probe: Any = data.get("probe")
    cells: Any = data.get("cells")
    test: Any = data.get("test")
    expect, grid = data.get("expect"), data.get("grid", False)
    _check(where, "probe", probe, isinstance(probe, dict), "a JSON object (the probe's identity)")
    _check(where, "cells", cells, isinstance(cells, list), "a JSON list of cells")
    _check(where, "test", test, isinstance(test, str) and "::" in test, "the recording test, 'file::name'")
    _check(where, "expect", expect, expect is None or isinstance(expect, str), "a string or null")
    _check(where, "grid", grid, isinstance(grid, bool), "true or false")
    candidates: Any = data.get("candidates", [])
    _check(where, "candidates", candidates, isinstance(candidates, list) and all(isinstance(c, str) for c in candidates),
           "a list of strings or absent")
    profile = LocalizationProfile(
        probe=dict(probe),
        cells=tuple(deserialize_cell(f"{where}, cells[{k}]", cell) for k, cell in enumerate(cells)),
        expect=expect,
        model=header.model,
        weights_hash=header.weights_hash,
        grid=grid,
        architecture=dict(header.architecture),
        dtype=header.dtype,
        candidates=tuple(candidates),
    )
    return Entry(profile, test)


def _dumps(value: Any, level: int = 0) -> str:
    """JSON with sorted keys where every container of scalars (a cell, a flat probe) stays on one line.

    One line per cell keeps a baseline diff to the cells that changed.
    """
    compact = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not any(isinstance(v, (dict, list)) and v for v in items):
        return compact
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict):
        body = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, level + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(body) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(v, level + 1)}" for v in value) + f"\n{pad}]"


def to_json(baseline: BaselineFile) -> str:
    """The file's text: deterministic, sorted, one cell per line, trailing newline."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "keys": KEY_ANCHOR,
        "model": baseline.model,
        "weights_hash": baseline.weights_hash,
        "dtype": baseline.dtype,
        "architecture": {name: baseline.architecture[name] for name in ARCHITECTURE_FIELDS if name in baseline.architecture},
        "entries": {key: serialize_entry(entry) for key, entry in sorted(baseline.entries.items())},
    }
    return _dumps(document) + "\n"


WAY_OUT = f"Restore it from version control, delete it, or pass {REWRITE_OPTION} to record it anew (it replaces the file)."
"""What to do about an unreadable baseline: every way named here works."""


def from_json(text: str, path: Path) -> BaselineFile:
    """Parse a baseline file's text; any problem is a BaselineError naming ``path`` and a way out."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(
            f"baseline {path} is not valid JSON ({exc}); it may be truncated or hand-edited. {WAY_OUT}"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        marker = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise BaselineError(
            f"{path} is not a pytest-patchscope baseline (format={marker!r}, expected {FORMAT!r}). "
            "Point the baseline option at another path, or delete the file."
        )
    version: Any = data.get("version")
    if not _is_int(version) or version < 1:
        raise BaselineError(
            f"baseline {path} has version={version!r}, expected an integer from 1 to {VERSION}. {WAY_OUT}"
        )
    if version > VERSION:
        raise BaselineError(
            f"baseline {path} has version={version}, newer than this pytest-patchscope reads "
            f"(up to {VERSION}). Upgrade: pip install -U pytest-patchscope."
        )
    if version < VERSION:
        raise BaselineError(
            f"baseline {path} has format version {version}, written by an older pytest-patchscope whose keys "
            "left out stop strings and mapping weights, so its entries cannot be matched without rerunning "
            f"the probes. Migrate it with one run on the checkpoint it was recorded from "
            f"({describe_checkpoint(str(data.get('model', '')), str(data.get('weights_hash', '')))}): "
            f"pytest <your suite> --patchscope-model=<that checkpoint> --patchscope-baseline={path} {REWRITE_OPTION}"
        )
    header = BaselineFile(path)
    for name in ("model", "weights_hash"):
        value = data.get(name, "")
        _check(f"baseline {path}", name, value, isinstance(value, str), "a string")
        setattr(header, name, value)
    dtype = data.get("dtype", "")
    _check(f"baseline {path}", "dtype", dtype, dtype in RECORDED_DTYPES, f"one of {', '.join(map(repr, RECORDED_DTYPES))}")
    header.dtype = dtype
    architecture = data.get("architecture", {})
    _check(f"baseline {path}", "architecture", architecture,
           isinstance(architecture, dict) and all(_is_int(v) for v in architecture.values()),
           f"a JSON object of integers ({', '.join(ARCHITECTURE_FIELDS)})")
    header.architecture = dict(architecture)
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict):
        raise BaselineError(
            f"baseline {path}: 'entries' is {type(raw_entries).__name__}, expected a JSON object. {WAY_OUT}"
        )
    try:
        header.entries = {key: deserialize_entry(f"entry {key!r}", entry, header) for key, entry in raw_entries.items()}
    except BaselineError as exc:
        raise BaselineError(f"baseline {path}, {exc}. Fix or delete that entry. {WAY_OUT}") from exc
    return header
