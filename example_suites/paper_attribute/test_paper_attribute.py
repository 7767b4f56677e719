"""Gate a checkpoint on a slice of the Patchscopes paper's own attribute-extraction data (§4.2).

Each test is one datapoint of the authors' TSVs: the subject's state in its WikiText sentence S
(cut after the subject, i = its last token), patched from source layers LAYERS into the zero-shot
target T ("The capital city of x", ...) at its x, at target layers TARGET_LAYERS; 10 greedy tokens,
scored by the paper's hit rule (`match="paper"`: the object, spaces removed, occurs in the
generation, spaces removed, case-sensitive). The sweep's LocalizationProfile is recorded, so that

    .venv/bin/python -m pytest example_suites/paper_attribute --patchscope-baseline=example_suites/paper_attribute/baseline.json

compares every datapoint with the release's committed profile and fails the ones the checkpoint
lost. All 60 sweeps run as one batched engine job (the module fixture); each test then reports its
own verdict.

The slice: 20 datapoints of each of three tasks, the ones `pytest_patchscope.attribute` keeps with
`max_per_task=20` on SmolLM2-135M-Instruct (facts whose own greedy continuation of
`target_baseline` contains the object; one sentence per fact first). They are fixed here by the
TSVs' row index: a damaged checkpoint must be judged on the same facts, not on those it still knows.

The tolerances allow two lost hit layers and a first hit up to 4 layers deeper: a 135M model's
hit layers are noisy at the edges. A datapoint that was decodable somewhere and is decodable
nowhere always fails.

The data are not part of this repository: they are read from ../shared/data/patchscopes-attribute
beside the checkout (or $PATCHSCOPE_ATTRIBUTE_DATA, e.g. the preprocessed_data folder of your own
clone of PAIR-code/interpretability); without them every test skips and says where it looked.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_patchscope.attribute import MATCH, load_tasks
from pytest_patchscope.progress import progress_label

DATA = Path(os.environ.get("PATCHSCOPE_ATTRIBUTE_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data" / "patchscopes-attribute")
SLICE = {
    "country_capital_city": [10, 12, 13, 25, 26, 27, 50, 51, 52, 55, 56, 57, 60, 61, 70, 71, 75, 76, 80, 81],
    "substance_phase": [5, 10, 15, 20, 25, 40, 45, 50, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105, 110, 115],
    "task_done_by_tool": [5, 6, 10, 32, 34, 44, 45, 60, 61, 85, 86, 135, 136, 140, 141, 145, 146, 150, 151, 152],
}
"""task -> the TSV row indices (the files' unnamed first column) of the gated datapoints."""
LAYERS = range(0, 20, 2)
TARGET_LAYERS = [0, 2]
MAX_NEW_TOKENS = 10

pytestmark = pytest.mark.patchscope_tolerance(allow_lost_layers=2, max_first_hit_shift=4)


@pytest.fixture(scope="module")
def profiles(patchscope):
    """Every datapoint's l x l* profile, from one batched job: {(task, row): LocalizationProfile}."""
    if not DATA.is_dir():
        pytest.skip(f"the paper's attribute TSVs are not at {DATA}: put them there (../shared/data beside the checkout) or set PATCHSCOPE_ATTRIBUTE_DATA")
    points = {}
    for task in load_tasks(DATA, sorted(SLICE)):
        by_row = {d.row: d for d in task.datapoints}
        missing = [r for r in SLICE[task.name] if r not in by_row]
        if missing:
            pytest.fail(f"{task.path}: rows {missing} are gone or filtered out; this slice was chosen on the published TSVs")
        points.update({(task.name, r): by_row[r] for r in SLICE[task.name]})
    scope = patchscope.current
    plans = [
        scope.plan_sweep(
            d.source, d.target, layers=LAYERS, target_layers=TARGET_LAYERS, expect=d.object, match=MATCH,
            target_position=d.target_position, max_new_tokens=MAX_NEW_TOKENS, stop=(), clean=False,
        )
        for d in points.values()
    ]
    with progress_label("paper attribute slice"):
        return dict(zip(points, scope.run_sweeps(plans)))


@pytest.mark.parametrize("task,row", [(task, row) for task, rows in SLICE.items() for row in rows])
def test_datapoint_decodes_as_in_the_release(patchscope, profiles, task, row):
    patchscope.record(profiles[(task, row)])
