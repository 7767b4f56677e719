"""The CI gate end to end on the real model: a checkpoint with one fact damaged on purpose.

damage_checkpoint.py applies a ROME-style rank-one edit to the layer-0 MLP so that " France"
reads like "banana". Run against the committed baseline of the clean default model (another
checkpoint, so --patchscope-compare-checkpoint asks for the comparison), the example CI-gate suite
must fail on exactly the France facts, naming the lost layers (and, for the candidate-scored sweep,
the fallen margins), and pass on every untouched fact.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "example_suites" / "ci_gate"


def _damage_module():
    spec = importlib.util.spec_from_file_location("damage_checkpoint", GATE / "damage_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPECTED = [
    "FAILED *test_capitals_gate.py::test_capital_by_attribute_extraction[[]France-Paris[]]*",
    "FAILED *test_capitals_gate.py::test_capital_by_token_identity[[]France-Paris[]]*",
    "FAILED *test_capitals_gate.py::test_capital_by_candidate_scores[[]France[]]*",
    "*margin of 'Paris' over the best other candidate fell by up to * nats at 12 cells (> max_margin_drop=1.0)*",
    "*lost hits at layers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 (decodable nowhere now)*",
    "*lost hits at layers 23, 24, 25, 26, 27, 28, 29 (decodable nowhere now)*",
    "the baseline comes from another checkpoint (SmolLM2-135M-Instruct @ *) than this run (damaged @ *): compared anyway, "
    "as --patchscope-compare-checkpoint asks*",
    "12 probes: 9 unchanged, 3 regressed",
]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint") / "damaged"
    _damage_module().main([str(directory)])
    return directory


def test_damaged_checkpoint_fails_exactly_the_damaged_facts(pytester, tmp_path, damaged, monkeypatch):
    """Options as one word, run from the repository root."""
    baseline = tmp_path / "baseline.json"
    shutil.copy(GATE / "baseline.json", baseline)
    before = baseline.read_bytes()
    monkeypatch.chdir(REPO)
    result = pytester.runpytest(
        "example_suites/ci_gate", f"--patchscope-model={damaged}", f"--patchscope-baseline={baseline}",
        "--patchscope-compare-checkpoint", "-p", "no:cacheprovider", "-rf",
    )
    result.assert_outcomes(failed=3, passed=9)
    result.stdout.fnmatch_lines_random(EXPECTED)
    assert baseline.read_bytes() == before, "a gate run without --patchscope-update-baseline never writes"


def test_the_same_gate_with_two_word_options_from_another_directory(pytester, damaged, monkeypatch):
    """Options as two words (which move pytest's rootdir), run from the suite's own folder, on the
    committed baseline itself: the keys still match, and exactly the damaged facts fail."""
    before = (GATE / "baseline.json").read_bytes()
    monkeypatch.chdir(GATE)
    result = pytester.runpytest(
        ".", "--patchscope-model", str(damaged), "--patchscope-baseline", "baseline.json", "--patchscope-compare-checkpoint",
        "-p", "no:cacheprovider", "-rf",
    )
    result.assert_outcomes(failed=3, passed=9)
    result.stdout.fnmatch_lines_random(EXPECTED)
    assert (GATE / "baseline.json").read_bytes() == before
