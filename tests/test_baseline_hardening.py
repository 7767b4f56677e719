"""Baselines that do not churn, refuse what they cannot write back, and name another checkpoint
(issue 22: points 1 and 2, D4, D11), on hand-built profiles (no model, no pytest run).

The pytest-level checks are in test_gate_trust.py; the real-model re-record under other thread
counts and xdist is in test_baseline_noise.py.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_patchscope import LayerCell, LocalizationProfile
from pytest_patchscope.baseline.comparator import checkpoint_mismatch
from pytest_patchscope.baseline.keys import anchored_test_id, project_root, unmarked_anchor
from pytest_patchscope.baseline.serializer import (
    COMPARE_CHECKPOINT_OPTION,
    LOGPROB_DECIMALS,
    NOISE_TOLERANCE,
    BaselineFile,
    Entry,
    same_checkpoint,
    settle,
    to_json,
)
from pytest_patchscope.baseline.storage import read_baseline, update_baseline
from pytest_patchscope.errors import BaselineError

PROBE = {"source": "Country: Japan", "target": "The capital city of x is", "strength": 1.0, "stop": ["\n"]}
ARCH = {"n_layers": 6, "d_model": 16, "vocab_size": 100}
CANDIDATES = ("Tokyo", "Seoul", "Paris")


def profile(shift: float = 0.0, *, text: str = " Tokyo", weights_hash: str = "h1", model: str = "tiny") -> LocalizationProfile:
    """A candidate-scored sweep over 6 layers whose every number is moved by ``shift`` nats."""
    cells = []
    for layer in range(6):
        scores = {name: -1.23456 - 0.5 * k - 0.1 * layer + shift for k, name in enumerate(CANDIDATES)}
        cells.append(LayerCell(
            layer, layer, text, text == " Tokyo", scores["Tokyo"], layer, None,
            margin=0.5 + 0.01 * layer + shift, candidate_logprobs=scores,
        ))
    return LocalizationProfile(dict(PROBE), tuple(cells), "Tokyo", model=model, weights_hash=weights_hash,
                               architecture=ARCH, dtype="float32", candidates=CANDIDATES)


def record(path: Path, rewrite: bool = False, **profiles: LocalizationProfile) -> bytes:
    update_baseline(path, {key: Entry(p, f"tests/test_x.py::{key}") for key, p in profiles.items()}, rewrite=rewrite)
    return path.read_bytes()


# ---- point 1: an update rewrites only what changed beyond noise ---------------------------------
# Noise that flips the 4th decimal: the first record stores -1.2346 (from -1.23456); a rerun at
# -1.23444 would round to -1.2344 without settling, and one at -1.23466 to -1.2347.
@pytest.mark.parametrize("noise", [1.2e-4, -1e-4, 0.9 * NOISE_TOLERANCE, -0.9 * NOISE_TOLERANCE])
def test_a_rerecord_within_noise_rewrites_the_file_byte_for_byte(tmp_path, noise):
    path = tmp_path / "b.json"
    first = record(path, a=profile(), b=profile(0.3))
    assert round(-1.23456 + noise, LOGPROB_DECIMALS) != -1.2346, "the noise alone would change the file"
    assert record(path, a=profile(noise), b=profile(0.3 + noise)) == first
    assert record(path, rewrite=True, a=profile(noise), b=profile(0.3 - noise)) == first, "a rewrite settles too"


def test_a_change_beyond_the_tolerance_is_written(tmp_path):
    path = tmp_path / "b.json"
    record(path, a=profile(), b=profile())
    record(path, a=profile(2 * NOISE_TOLERANCE), b=profile(0.5 * NOISE_TOLERANCE))
    moved, kept = read_baseline(path).profile("a"), read_baseline(path).profile("b")
    assert moved.cells[0].logprob == round(-1.23456 + 2 * NOISE_TOLERANCE, LOGPROB_DECIMALS) == -1.2326
    assert moved.cells[0].margin == 0.502 and moved.cells[0].candidate_logprobs["Paris"] == round(-2.23456 + 0.002, 4)
    assert kept.cells[0].logprob == -1.2346 and kept.cells[0].margin == 0.5, "within tolerance: the stored value stays"


def test_a_changed_text_is_written_next_to_settled_numbers(tmp_path):
    path = tmp_path / "b.json"
    record(path, a=profile())
    record(path, a=profile(1e-4, text=" Seoul"))
    cell = read_baseline(path).profile("a").cells[2]
    assert (cell.text, cell.hit, cell.logprob) == (" Seoul", False, -1.4346)


def test_settle_matches_cells_by_layer_target_and_unit_and_leaves_new_cells_alone():
    stored = profile()
    new = replace(profile(5e-4), cells=profile(5e-4).cells[1:] + (replace(profile(5e-4).cells[0], layer=9, target_layer=9),))
    settled = settle(new, stored)
    by_layer = {c.layer: c for c in settled.cells}
    assert by_layer[1].logprob == stored.cells[1].logprob and by_layer[1].candidate_logprobs == stored.cells[1].candidate_logprobs
    assert by_layer[9].logprob == new.cells[-1].logprob, "a cell the baseline did not have keeps its new value"


# ---- D4: files the reader or the writer used to crash on ---------------------------------------
def _recorded(tmp_path: Path) -> Path:
    path = tmp_path / "b.json"
    record(path, **{"tests/test_x.py::test_a::probe=abc": profile()})
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda text: text.replace('"layer": 0', '"layer": ' + "9" * 5000, 1), "a number too long to parse"),
    (lambda text: text.replace('"layer": 0', '"layer": ' + "[" * 100_000 + "]" * 100_000, 1), "nests too deep to parse"),
    (lambda text: text.replace('"strength": 1.0', '"strength": NaN', 1), "probe.strength=nan is not valid: a finite number"),
    (lambda text: text.replace('"strength": 1.0', '"strength": -Infinity', 1), "probe.strength=-inf is not valid: a finite number"),
    (lambda text: text.replace('"strength": 1.0', '"strength": 1e400', 1), "probe.strength=inf is not valid: a finite number"),
    (lambda text: text.replace('"strength": 1.0', '"strength": ' + "[" * 40 + "]" * 40, 1), "nested at most 16 deep"),
    (lambda text: text.replace('"source": "Country: Japan"', '"source": "\\ud800"', 1), "probe.source='\\ud800' is not valid: a string without lone"),
    (lambda text: text.replace('"text": " Tokyo"', '"text": "\\udfff"', 1), "text='\\udfff' is not valid: a string without lone"),
])
def test_a_file_the_writer_could_not_write_back_is_a_baseline_error_naming_it(tmp_path, damage, message):
    path = _recorded(tmp_path)
    damaged = damage(path.read_text())
    path.write_text(damaged)
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "--patchscope-rewrite-baseline" in str(info.value)
    str(info.value).encode("utf-8")  # the message itself can be printed
    with pytest.raises(BaselineError):
        record(path, **{"tests/test_x.py::test_b::probe=def": profile()})
    assert path.read_text() == damaged, "an update over it writes nothing"
    record(path, rewrite=True, **{"tests/test_x.py::test_a::probe=abc": profile()})
    assert list(read_baseline(path).entries) == ["tests/test_x.py::test_a::probe=abc"]


def test_an_escaped_surrogate_pair_is_an_ordinary_character(tmp_path):
    path = _recorded(tmp_path)
    path.write_text(path.read_text().replace('"source": "Country: Japan"', '"source": "\\ud83d\\ude00"', 1))
    assert read_baseline(path).profile("tests/test_x.py::test_a::probe=abc").probe["source"] == "\U0001F600"


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_the_writer_refuses_a_non_finite_probe_with_a_baseline_error(tmp_path, value, shown):
    path = tmp_path / "b.json"
    record(path, a=profile())
    before = path.read_bytes()
    bad = replace(profile(), probe={**PROBE, "strength": value})
    with pytest.raises(BaselineError, match=rf"baseline {path} not written.*probe.strength={shown} is not valid: a finite number"):
        record(path, a=bad)
    with pytest.raises(BaselineError, match="not written"):
        to_json(BaselineFile(path, {"a": Entry(bad, "tests/test_x.py::a")}, "tiny", "h1", ARCH, "float32"))
    assert path.read_bytes() == before


def test_the_writer_refuses_a_lone_surrogate_with_a_baseline_error(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(BaselineError, match=r"not written: a recorded text holds a lone surrogate \('\\ud800'\)"):
        record(path, a=replace(profile(), probe={**PROBE, "stop": ["\ud800"]}))
    assert not path.exists()


# ---- D11: another checkpoint -----------------------------------------------------------------
def test_another_checkpoint_is_named_with_both_sides_and_the_option():
    reason = checkpoint_mismatch(profile(weights_hash="aaaa" * 16, model="release"), profile(weights_hash="bbbb" * 16, model="damaged"))
    assert reason is not None
    assert "another checkpoint (release @ aaaaaaaaaaaa) than this run's (damaged @ bbbbbbbbbbbb)" in reason
    assert COMPARE_CHECKPOINT_OPTION in reason and "patchscope_compare_checkpoint" in reason


def test_the_same_weights_under_another_name_are_the_same_checkpoint():
    assert checkpoint_mismatch(profile(model="a"), profile(model="moved/a")) is None
    assert same_checkpoint("a", "h", "b", "h") and not same_checkpoint("a", "h", "a", "h2")
    assert not same_checkpoint("a", "", "b", ""), "without hashes the names decide"
    assert not same_checkpoint("a", "", "a", "h"), "one hash unknown: not known to be the same"


# ---- point 2: the anchor without a project marker ------------------------------------------------
def test_without_a_marker_test_paths_start_at_the_baseline_folder(tmp_path):
    if project_root(tmp_path) is not None:
        pytest.skip(f"a project marker lies above {tmp_path} ({project_root(tmp_path)})")
    suite, elsewhere = tmp_path / "suite", tmp_path / "baselines"
    anchor = unmarked_anchor(os.path.relpath(suite / "b.json"), Path("/somewhere/else"))
    assert anchor == suite
    assert anchored_test_id(suite / "sub" / "test_x.py", "sub/test_x.py::test_a[1]", anchor) == "sub/test_x.py::test_a[1]"
    outside = unmarked_anchor(elsewhere / "b.json", suite)
    assert anchored_test_id(suite / "test_x.py", "test_x.py::test_a", outside) == "../suite/test_x.py::test_a"
    assert unmarked_anchor(None, suite) == suite, "no baseline file: pytest's rootdir (keys only label reports)"
