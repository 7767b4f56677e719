"""The CI gate end to end on the real model: a checkpoint with one fact damaged on purpose.

damage_checkpoint.py applies a ROME-style rank-one edit to the layer-0 MLP so that " France"
reads like "banana". Run against the committed baseline of the clean default model, the
example CI-gate suite must fail on exactly the France facts, naming the lost layers, and pass
on every untouched fact.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import transformer_lens.model_bridge  # noqa: F401  (see test_plugin.py: import outside pytester runs)

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "example_suites" / "ci_gate"


def _damage_module():
    spec = importlib.util.spec_from_file_location("damage_checkpoint", GATE / "damage_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_damaged_checkpoint_fails_exactly_the_damaged_facts(pytester, tmp_path):
    damaged = tmp_path / "damaged"
    _damage_module().main([str(damaged)])
    baseline = tmp_path / "baseline.json"
    shutil.copy(GATE / "baseline.json", baseline)
    before = baseline.read_bytes()
    result = pytester.runpytest(
        str(GATE), f"--rootdir={REPO}", f"--patchscope-model={damaged}", f"--patchscope-baseline={baseline}",
        "-p", "no:cacheprovider", "-rf",
    )
    result.assert_outcomes(failed=2, passed=8)
    result.stdout.fnmatch_lines_random(
        [
            "FAILED *test_capitals_gate.py::test_capital_by_attribute_extraction[[]France-Paris[]]*",
            "FAILED *test_capitals_gate.py::test_capital_by_token_identity[[]France-Paris[]]*",
            "*lost hits at layers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 (decodable nowhere now)*",
            "*lost hits at layers 23, 24, 25, 26, 27, 28, 29 (decodable nowhere now)*",
            "10 probes: 8 unchanged, 2 regressed",
        ]
    )
    assert baseline.read_bytes() == before, "a gate run without --patchscope-update-baseline never writes"
