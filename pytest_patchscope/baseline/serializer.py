"""The baseline file's format: a BaselineFile <-> its JSON text, every field checked on the way in.

Version 2 holds one checkpoint: the header names the model, its weights hash and its shape
(n_layers, d_model, vocab_size); each entry holds one probe's identity, the test that recorded it,
the expected answer and one line per layer cell. Anything malformed (a truncated file, a hand-edited
cell of the wrong type, an unknown version, NaN or a 100k-deep nesting in a probe, a number too long
to parse) is a BaselineError that names the path and a way out that works; the reader accepts only
what the writer can write back.

Re-recording does not churn: log-probabilities and margins are stored to ``LOGPROB_DECIMALS``
decimals, and an update keeps a stored number whose new value lies within ``NOISE_TOLERANCE``
(0.001 nats) of it (:func:`settle`). The same computation run with another number of torch threads,
under xdist (one thread per worker) or in another batch differs by about 1e-5 nats in float32 (at
most 1.3e-5 over 108 scores of the default model, 1 against 2 threads), which flips the 4th decimal
now and then; 0.001 nats is 500 times below the gate's smallest default tolerance
(``peak_tie_margin`` 0.5). So a repeat update, ``-n 0`` or ``-n 2``, rewrites the file byte
for byte, while a number that moved by more than 0.001 nats, and every text, hit, rank or
degeneration flag that changed, is written. A first record has nothing to keep, so two first records
may still differ in a 4th decimal.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.errors import BaselineError

FORMAT = "pytest-patchscope-baseline"
VERSION = 2
LOGPROB_DECIMALS = 4
NOISE_TOLERANCE = 1e-3
"""Nats: an update keeps a stored log-probability, margin or candidate score whose new value lies
within this of it (float noise of thread counts and batching is about 1e-5; see the module docstring)."""
UPDATE_OPTION = "--patchscope-update-baseline"
REWRITE_OPTION = "--patchscope-rewrite-baseline"
COMPARE_CHECKPOINT_OPTION = "--patchscope-compare-checkpoint"
KEY_ANCHOR = (
    "test files relative to the project root: the nearest folder above the test with .git or .hg, "
    "else with pyproject.toml, setup.py or setup.cfg, else with pytest.ini, .pytest.ini or tox.ini; "
    "with none of these, relative to this file's folder"
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


def same_checkpoint(model: str, weights_hash: str, other_model: str, other_hash: str) -> bool:
    """Whether two (model name, weights hash) pairs name one checkpoint: the same weights hash when
    both are known (a renamed or moved folder is the same checkpoint), else the same name and hash."""
    if weights_hash and other_hash:
        return weights_hash == other_hash
    return (model, weights_hash) == (other_model, other_hash)


def describe_architecture(architecture: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {architecture.get(name, '?')}" for name in ARCHITECTURE_FIELDS)


def round_logprob(value: float | None) -> float | None:
    """A log-probability as files and reports store it: rounded, and None when not finite (strict JSON)."""
    return None if value is None or not math.isfinite(value) else round(value, LOGPROB_DECIMALS)


def _settled(new: float, stored: float | None) -> float:
    """The stored value when ``new`` lies within NOISE_TOLERANCE of it, else ``new``."""
    return stored if stored is not None and math.isfinite(new) and abs(new - stored) <= NOISE_TOLERANCE else new


def settle(new: LocalizationProfile, stored: LocalizationProfile) -> LocalizationProfile:
    """``new`` with each number that lies within NOISE_TOLERANCE of ``stored``'s (cell by cell:
    same layer, target layer and unit) replaced by the stored value, so that an update writes only
    what changed beyond float noise. Texts, hits, ranks and flags are ``new``'s: they are discrete.
    """
    before = {(c.layer, c.target_layer, c.unit): c for c in stored.cells}
    cells = []
    for cell in new.cells:
        old = before.get((cell.layer, cell.target_layer, cell.unit))
        if old is not None:
            scores = cell.candidate_logprobs
            if scores is not None and old.candidate_logprobs is not None:
                scores = {name: _settled(value, old.candidate_logprobs.get(name)) for name, value in scores.items()}
            cell = replace(
                cell,
                logprob=None if cell.logprob is None else _settled(cell.logprob, old.logprob),
                margin=None if cell.margin is None else _settled(cell.margin, old.margin),
                candidate_logprobs=scores,
            )
        cells.append(cell)
    return replace(new, cells=tuple(cells))


def serialize_entry(entry: Entry) -> dict[str, Any]:
    """One entry as plain JSON data (checkpoint facts live in the file's header, not here)."""
    profile = entry.profile
    return {
        "probe": profile.probe,
        "test": entry.test,
        "expect": profile.expect,
        "grid": profile.grid,
        **({"candidates": list(profile.candidates)} if profile.candidates else {}),
        **({"path": profile.path} if profile.path != "packed" else {}),  # absent: packed (files before the general path)
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
    problem = _unwritable(probe, "probe", MAX_PROBE_DEPTH)
    if problem is not None:
        _check(where, *problem[:2], False, problem[2])
    _check(where, "cells", cells, isinstance(cells, list), "a JSON list of cells")
    _check(where, "test", test, isinstance(test, str) and "::" in test, "the recording test, 'file::name'")
    _check(where, "expect", expect, expect is None or isinstance(expect, str), "a string or null")
    _check(where, "grid", grid, isinstance(grid, bool), "true or false")
    candidates: Any = data.get("candidates", [])
    _check(where, "candidates", candidates, isinstance(candidates, list) and all(isinstance(c, str) for c in candidates),
           "a list of strings or absent")
    path: Any = data.get("path", "packed")
    _check(where, "path", path, path in ("packed", "general"), "'packed', 'general' or absent (packed)")
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
        path=path,
    )
    return Entry(profile, test)


MAX_PROBE_DEPTH = 16
"""How deep a probe's identity may nest (the plugin's own nest 3 deep): deeper is a hand-made file."""


def _writable_text(text: str) -> str:
    """``text`` as it may be shown and written: a lone surrogate as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unwritable(value: Any, name: str, max_depth: int | None) -> tuple[str, Any, str] | None:
    """The first place in JSON data the writer could not write back, as (path, value, what is
    allowed), or None: a NaN or infinite number, a string with a lone surrogate, or (with
    ``max_depth``) nesting deeper than that. Iterative, so any depth that parsed is walked."""
    stack: list[tuple[str, Any, int]] = [(name, value, 0)]
    while stack:
        where, item, depth = stack.pop()
        if max_depth is not None and depth > max_depth:
            return where, "[...]" if isinstance(item, list) else item, f"JSON data nested at most {max_depth} deep"
        if isinstance(item, float) and not math.isfinite(item):
            return where, item, "a finite number (a baseline is strict JSON)"
        if isinstance(item, str) and _writable_text(item) != item:
            return where, item, "a string without lone surrogates (\\ud800-\\udfff)"
        if isinstance(item, dict):
            for key, child in item.items():
                if _writable_text(key) != key:
                    return where, key, "an object whose keys have no lone surrogates (\\ud800-\\udfff)"
                stack.append((f"{where}.{key}", child, depth + 1))
        elif isinstance(item, list):
            stack.extend((f"{where}[{k}]", child, depth + 1) for k, child in enumerate(item))
    return None


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
    try:
        return _dumps(document) + "\n"
    except (ValueError, RecursionError) as exc:  # NaN or infinity (strict JSON), nesting too deep
        problem = _unwritable(document, "baseline", None)
        where = "" if problem is None else f" ({problem[0]}={problem[1]!r} is not valid: {problem[2]})"
        raise BaselineError(
            f"baseline {baseline.path} not written: its data cannot be written as strict JSON{where}: "
            f"{_writable_text(str(exc))}. The previous file, if any, is unchanged."
        ) from exc


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A \\uD800-\\uDFFF escape in a file's text: only then can a parsed string hold a lone surrogate."""

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
    except ValueError as exc:  # an integer past Python's digit limit (4300)
        raise BaselineError(
            f"baseline {path} cannot be read: it holds a number too long to parse ({exc}). No file this "
            f"plugin writes holds one; it was hand-edited or damaged. {WAY_OUT}"
        ) from exc
    except RecursionError as exc:
        raise BaselineError(
            f"baseline {path} cannot be read: its JSON nests too deep to parse. No file this plugin writes "
            f"nests that deep; it was hand-edited or damaged. {WAY_OUT}"
        ) from exc
    if _ESCAPED_SURROGATE.search(text):
        problem = _unwritable(data, "baseline", None)
        if problem is not None:
            raise BaselineError(
                f"baseline {path}: {problem[0]}={problem[1]!r} is not valid: {problem[2]}. {WAY_OUT}"
            )
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
