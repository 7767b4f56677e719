"""Baseline serialization, keys, atomic storage and comparison, on hand-built profiles (no model)."""

from __future__ import annotations

import json
import os

import pytest

from pytest_patchscope.baseline.comparator import Comparison, Tolerances, compare_profiles
from pytest_patchscope.baseline.keys import anchored_test_id, profile_key, project_root
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.baseline.render import render_comparison
from pytest_patchscope.baseline.serializer import FORMAT, REWRITE_OPTION, UPDATE_OPTION, VERSION, Entry, from_json, to_json
from pytest_patchscope.baseline.storage import read_baseline, update_baseline
from pytest_patchscope.errors import BaselineError, ProbeConfigError

PROBE = {"source": "The capital of France is", "source_position": -1, "target": "x", "target_position": -1}
ARCH = {"n_layers": 8, "d_model": 16, "vocab_size": 100}


def sweep(hits, n=8, scores=None, expect=" Paris", weights_hash="h1", probe=PROBE) -> LocalizationProfile:
    """A plain sweep over layers 0..n-1: hit layers score -0.5, the rest -6.0, unless ``scores`` says otherwise."""
    scores = scores or {}
    cells = tuple(
        LayerCell(
            layer,
            layer,
            " Paris" if layer in hits else " the",
            layer in hits,
            scores.get(layer, -0.5 if layer in hits else -6.0),
            0 if layer in hits else 40,
        )
        for layer in range(n)
    )
    return LocalizationProfile(dict(probe), cells, expect, model="tiny", weights_hash=weights_hash, architecture=ARCH)


def grid(hit_cells, n=4) -> LocalizationProfile:
    """An n x n source x target grid where ``hit_cells`` are (layer, target) pairs that hit."""
    cells = tuple(
        LayerCell(
            l,
            t,
            " Paris" if (l, t) in hit_cells else " the",
            (l, t) in hit_cells,
            -0.5 if (l, t) in hit_cells else -6.0 - t,
            None,
        )
        for l in range(n)
        for t in range(n)
    )
    return LocalizationProfile(dict(PROBE), cells, " Paris", model="tiny", weights_hash="h1", grid=True, architecture=ARCH)


def entries(**profiles: LocalizationProfile) -> dict[str, Entry]:
    return {key: Entry(profile, f"tests/test_x.py::{key}") for key, profile in profiles.items()}


def write(path, **profiles):
    return update_baseline(path, entries(**profiles)).baseline


# ---- serialization ------------------------------------------------------------------------
def test_serialize_round_trip_rounds_logprobs_and_keeps_identity(tmp_path):
    profile = sweep([1, 2], scores={1: -0.123456789})
    baseline = write(tmp_path / "b.json", k=profile)
    back = from_json(to_json(baseline), tmp_path / "b.json").profile("k")
    assert back.cell(1).logprob == -0.1235
    assert back.probe == PROBE and back.expect == " Paris"
    assert (back.model, back.weights_hash, back.grid, back.architecture) == ("tiny", "h1", False, ARCH)
    assert [(c.layer, c.text, c.hit, c.rank) for c in back.cells] == [
        (c.layer, c.text, c.hit, c.rank) for c in profile.cells
    ]
    assert to_json(from_json(to_json(baseline), tmp_path)) == to_json(baseline)  # rereading does not churn


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("logprob", "high", "a finite number"),
        ("logprob", True, "a finite number"),
        ("hit", "no", "true, false or null"),
        ("hit", 1, "true, false or null"),
        ("rank", -1, "an integer >= 0"),
        ("rank", 2.5, "an integer >= 0"),
        ("layer", "3", "an integer >= 0"),
        ("text", None, "a string"),
    ],
)
def test_a_hand_edited_cell_of_the_wrong_type_is_named(tmp_path, field, value, allowed):
    path = tmp_path / "baseline.json"
    write(path, **{"tests/t.py::test_a::probe=abc": sweep([0])})
    data = json.loads(path.read_text(encoding="utf-8"))
    data["entries"]["tests/t.py::test_a::probe=abc"]["cells"][3][field] = value
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    message = str(info.value)
    assert f"entry 'tests/t.py::test_a::probe=abc', cells[3]: {field}={value!r} is not valid: {allowed}" in message
    assert str(path) in message and REWRITE_OPTION in message


def test_a_missing_cell_field_is_named(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, k=sweep([0]))
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["entries"]["k"]["cells"][3]["layer"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BaselineError, match=r"cells\[3\] lacks layer"):
        read_baseline(path)


# ---- keys ------------------------------------------------------------------------------------
def test_key_is_stable_and_built_from_pieces():
    key = profile_key("tests/test_x.py::test_capital[France]", PROBE)
    reordered = dict(reversed(list(PROBE.items())))
    assert key == profile_key("tests/test_x.py::test_capital[France]", reordered)
    assert key == profile_key("tests\\test_x.py::test_capital[France]", PROBE)
    assert key.startswith("tests/test_x.py::test_capital[France]::probe=")
    assert len(key.rsplit("=", 1)[1]) == 12


def test_key_distinguishes_params_probes_and_extra():
    keys = {
        profile_key("tests/test_x.py::test_capital[France]", PROBE),
        profile_key("tests/test_x.py::test_capital[Japan]", PROBE),
        profile_key("tests/test_x.py::TestOther::test_capital[France]", PROBE),
        profile_key("tests/test_x.py::test_capital[France]", {**PROBE, "source_position": -2}),
        profile_key("tests/test_x.py::test_capital[France]", PROBE, extra=" Lyon"),
    }
    assert len(keys) == 5


def test_key_rejects_absolute_paths_and_unserializable_probes():
    with pytest.raises(ProbeConfigError, match="test='/home"):
        profile_key("/home/me/tests/test_x.py::test_x", PROBE)
    with pytest.raises(ProbeConfigError, match="JSON-serializable"):
        profile_key("tests/test_x.py::test_x", {"mapping": object()})


@pytest.mark.parametrize(
    "markers, root",
    [
        ([".git", "sub/pyproject.toml", "sub/tests/pytest.ini"], ""),
        (["sub/pyproject.toml", "sub/tests/pytest.ini"], "sub"),
        (["sub/tests/tox.ini"], "sub/tests"),
    ],
)
def test_the_project_root_prefers_a_repository_then_a_project_file_then_an_ini_file(tmp_path, markers, root):
    project = tmp_path / "checkout"
    for marker in markers:
        target = project / marker
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir() if marker.endswith(".git") else target.write_text("")
    test_file = project / "sub" / "tests" / "test_x.py"
    project_root.cache_clear()
    assert project_root(test_file.parent) == (project / root if root else project)
    expected = f"{test_file.relative_to(project / root if root else project).as_posix()}::test_a[1]"
    assert anchored_test_id(test_file, "whatever/rootdir/relative/test_x.py::test_a[1]", tmp_path) == expected


# ---- file format and storing ---------------------------------------------------------------
def test_file_format_is_sorted_json_with_one_line_per_cell(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, b=sweep([0]), a=sweep([1]))
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["format"] == FORMAT and data["version"] == VERSION == 2
    assert (data["model"], data["weights_hash"], data["architecture"]) == ("tiny", "h1", ARCH)
    assert list(data["entries"]) == ["a", "b"] and text.endswith("}\n")
    assert data["entries"]["a"]["test"] == "tests/test_x.py::a" and "project root" in data["keys"]
    cell_lines = [line for line in text.splitlines() if '"target_layer"' in line]
    assert len(cell_lines) == 16 and all(line.strip().startswith("{") for line in cell_lines)
    assert to_json(read_baseline(path)) == text  # deterministic rewrite


def test_missing_file_reads_as_none(tmp_path):
    assert read_baseline(tmp_path / "none.json") is None


def test_unrecorded_entries_are_kept_unless_removal_is_allowed(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, ran=sweep([0]), skipped=sweep([5]), gone=sweep([6]))
    result = update_baseline(path, entries(ran=sweep([2]), new=sweep([3])), may_remove=lambda key, entry: key == "gone")
    assert (result.removed, result.kept_unused) == (["gone"], ["skipped"])
    stored = read_baseline(path)
    assert sorted(stored.entries) == ["new", "ran", "skipped"]
    assert stored.profile("ran").hit_layers == [2] and stored.profile("skipped").hit_layers == [5]


def test_an_update_that_would_mix_two_checkpoints_is_refused(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, a=sweep([0]), b=sweep([1]))
    before = path.read_bytes()
    with pytest.raises(BaselineError, match=r"would mix two checkpoints.*tiny @ h2.*1 entries.*tiny @ h1.*" + REWRITE_OPTION):
        update_baseline(path, entries(a=sweep([3], weights_hash="h2")))
    assert path.read_bytes() == before
    replaced = update_baseline(path, entries(a=sweep([3], weights_hash="h2"), b=sweep([3], weights_hash="h2")))
    assert replaced.baseline.weights_hash == "h2" and sorted(replaced.baseline.entries) == ["a", "b"]
    rewritten = update_baseline(path, entries(c=sweep([1], weights_hash="h3")), rewrite=True)
    assert list(rewritten.baseline.entries) == ["c"] and rewritten.removed == ["a", "b"]


def test_one_run_of_two_checkpoints_is_refused(tmp_path):
    with pytest.raises(BaselineError, match="probes of 2 checkpoints"):
        update_baseline(tmp_path / "b.json", entries(a=sweep([0]), b=sweep([0], weights_hash="h2")))
    assert not (tmp_path / "b.json").exists()


def test_another_architecture_is_refused_while_its_entries_would_stay(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, a=sweep([0]), b=sweep([0]))
    small = LocalizationProfile(dict(PROBE), sweep([0], n=4).cells, " Paris", model="tiny", weights_hash="h1",
                                architecture={**ARCH, "n_layers": 4})
    with pytest.raises(BaselineError, match="another architecture.*n_layers 8.*n_layers 4"):
        update_baseline(path, entries(a=small))


def test_write_needs_probes(tmp_path):
    with pytest.raises(BaselineError, match="recorded no probe"):
        update_baseline(tmp_path / "b.json", {})


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_crash_mid_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "baseline.json"
    write(path, k=sweep([0]))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail_at, crash)
    with pytest.raises(BaselineError, match="No space left.*previous file, if any, is unchanged"):
        write(path, k=sweep([4]), other=sweep([1]))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]


def test_interrupt_mid_write_propagates_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "baseline.json"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(path, k=sweep([0]))
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "baseline.json"
    dead = tmp_path / ".baseline.json.999999999.0123abcd.tmp"
    dead.write_text("half a baseline")
    other = tmp_path / ".other.json.999999999.0123abcd.tmp"
    other.write_text("not ours")
    result = update_baseline(path, entries(k=sweep([0])))
    assert result.stale_temps == [dead] and not dead.exists() and other.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "pytest-patchscope-baseline", "entr', "not valid JSON"),
        ("\xff\xfe garbage", "cannot read baseline"),
        ('{"name": "some other tool"}', "not a pytest-patchscope baseline"),
        ("[1, 2]", "not a pytest-patchscope baseline"),
        ('{"format": "pytest-patchscope-baseline", "version": "one", "entries": {}}', "version='one'"),
        ('{"format": "pytest-patchscope-baseline", "version": 2, "entries": []}', "'entries' is list"),
    ],
)
def test_corrupt_or_foreign_file_is_an_error_and_never_overwritten(tmp_path, content, message):
    path = tmp_path / "baseline.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(BaselineError, match=message) as info:
        read_baseline(path)
    assert str(path) in str(info.value)
    with pytest.raises(BaselineError):
        write(path, k=sweep([0]))
    assert path.read_bytes() == content.encode("latin-1")
    update_baseline(path, entries(k=sweep([0])), rewrite=True)
    assert list(read_baseline(path).entries) == ["k"]


def test_corrupt_file_message_names_ways_out_that_work(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(BaselineError, match=f"delete it, or pass {REWRITE_OPTION}"):
        read_baseline(path)


def test_newer_version_asks_to_upgrade(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 99, "entries": {}}), encoding="utf-8")
    with pytest.raises(BaselineError, match="version=99.*pip install -U pytest-patchscope"):
        read_baseline(path)


def test_a_version_1_file_gets_the_one_command_that_migrates_it(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "model": "M", "weights_hash": "abc", "entries": {}}))
    with pytest.raises(BaselineError) as info:
        read_baseline(path)
    assert "format version 1" in str(info.value) and "(M @ abc)" in str(info.value)
    assert f"--patchscope-baseline={path} {REWRITE_OPTION}" in str(info.value)


def test_bad_entry_error_names_the_key(tmp_path):
    path = tmp_path / "baseline.json"
    write(path, **{"tests/t.py::test_a::probe=abc": sweep([0])})
    data = json.loads(path.read_text(encoding="utf-8"))
    data["entries"]["tests/t.py::test_a::probe=abc"]["cells"] = "oops"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BaselineError, match=r"entry 'tests/t.py::test_a::probe=abc': cells='oops'"):
        read_baseline(path)


# ---- tolerances --------------------------------------------------------------------------------
def test_tolerances_merged_overrides_and_validates():
    base = Tolerances()
    loose = base.merged(max_peak_shift=6, max_score_drop=4)
    assert (loose.max_peak_shift, loose.max_score_drop, base.max_peak_shift) == (6, 4, 3)
    with pytest.raises(ProbeConfigError, match="max_peak_shfit=6 is not valid.*max_peak_shift"):
        base.merged(max_peak_shfit=6)
    with pytest.raises(ProbeConfigError, match="Tolerances.allow_lost_layers=-1"):
        base.merged(allow_lost_layers=-1)
    with pytest.raises(ProbeConfigError, match="Tolerances.max_first_hit_shift=1.5.*integer"):
        Tolerances(max_first_hit_shift=1.5)


# ---- comparing ---------------------------------------------------------------------------------
def test_identical_profiles_are_unchanged_even_after_rounding_through_a_file(tmp_path):
    current = sweep([0, 1, 2, 3], scores={1: -0.123456789})
    write(tmp_path / "b.json", k=current)
    baseline = read_baseline(tmp_path / "b.json").profile("k")
    result = compare_profiles(baseline, current, Tolerances())
    assert result.status == "unchanged" and not result.regressed
    assert result.reasons == [] and result.lost_layers == [] and result.gained_layers == []


def test_fact_decodable_nowhere_now_regresses():
    result = compare_profiles(sweep([0, 1, 2, 3]), sweep([]), Tolerances(allow_lost_layers=10))
    assert result.status == "regressed"
    assert result.lost_layers == [0, 1, 2, 3]
    assert "lost hits at layers 0, 1, 2, 3 (decodable nowhere now)" in result.reasons
    assert result.first_hit == (0, None)


def test_first_hit_moved_deeper_regresses():
    result = compare_profiles(sweep([0, 1, 2]), sweep([6, 7]), Tolerances(allow_lost_layers=3))
    assert result.regressed
    assert any(r.startswith("first hit moved from layer 0 to layer 6") for r in result.reasons)
    assert result.first_hit == (0, 6)


def test_first_hit_within_tolerance_is_a_note_not_a_regression():
    result = compare_profiles(sweep([2, 3, 4]), sweep([3, 4]), Tolerances(allow_lost_layers=1))
    assert result.status == "unchanged"
    assert any("first hit moved from layer 2 to layer 3" in n for n in result.notes)
    assert any("within allow_lost_layers=1" in n for n in result.notes)


def test_lost_layers_beyond_allowance_regress():
    result = compare_profiles(sweep([1, 2, 3, 4, 5]), sweep([1, 2, 3]), Tolerances())
    assert result.regressed and result.lost_layers == [4, 5]
    assert "lost hits at layers 4, 5 (2 > allow_lost_layers=0)" in result.reasons


def test_peak_shift_regresses_but_near_ties_do_not():
    baseline = sweep([1, 2, 3, 4, 5, 6, 7], scores={1: -0.1})
    moved = sweep([1, 2, 3, 4, 5, 6, 7], scores={7: -0.1, 1: -1.5})
    result = compare_profiles(baseline, moved, Tolerances())
    assert result.regressed and result.peak == (1, 7)
    assert any(
        r.startswith("peak moved from layer 1 to layer 7 (6 layers > max_peak_shift=3")
        for r in result.reasons
    )

    near_tie = sweep([1, 2, 3, 4, 5, 6, 7], scores={7: -0.1, 1: -0.2})
    tie = compare_profiles(baseline, near_tie, Tolerances())
    assert tie.status == "unchanged" and tie.peak == (1, 7)
    assert any("near-tie" in n for n in tie.notes)


def test_score_drop_beyond_tolerance_regresses():
    baseline = sweep([2, 3], scores={2: -0.2})
    current = sweep([2, 3], scores={2: -3.0, 3: -3.5})
    result = compare_profiles(baseline, current, Tolerances())
    assert result.regressed and result.score_drop == pytest.approx(2.8)
    assert any(
        "peak log-probability dropped by 2.80 nats, from -0.2000 to -3.0000" in r for r in result.reasons
    )
    assert compare_profiles(baseline, current, Tolerances().merged(max_score_drop=3.0)).status == "unchanged"


def test_gains_without_losses_are_improved():
    result = compare_profiles(sweep([3, 4], scores={3: -2.0, 4: -2.0}), sweep([2, 3, 4], scores={3: -0.2}))
    assert result.status == "improved" and not result.regressed
    assert result.gained_layers == [2]
    assert "gained hits at layer 2" in result.reasons
    assert any(r.startswith("peak log-probability rose by 1.80 nats") for r in result.reasons)


def test_gains_next_to_a_regression_are_notes():
    result = compare_profiles(sweep([0, 1]), sweep([5]))
    assert result.regressed and "gained hits at layer 5" in result.notes


def test_missing_baseline_is_new():
    result = compare_profiles(None, sweep([0]))
    assert result.status == "new" and result.baseline is None and not result.regressed
    assert result.first_hit == (None, 0)
    assert "(no baseline)" in render_comparison(result)


def test_per_test_tolerance_override_turns_a_regression_into_unchanged():
    baseline, current = sweep([0, 1, 2]), sweep([4, 5, 1, 2])
    assert compare_profiles(baseline, current, Tolerances()).regressed
    loose = Tolerances().merged(allow_lost_layers=1, max_first_hit_shift=1)
    assert compare_profiles(baseline, current, loose).status == "improved"  # gained 4, 5; lost 0 allowed


def test_changed_expect_regresses_and_says_how_to_rerecord():
    result = compare_profiles(sweep([0]), sweep([0], expect=" Lyon"))
    assert result.regressed
    assert any("expect changed from ' Paris' to ' Lyon'" in r and UPDATE_OPTION in r for r in result.reasons)


def test_changed_weights_are_noted_not_judged():
    result = compare_profiles(sweep([0]), sweep([0], weights_hash="h2"))
    assert result.status == "unchanged" and any("tiny @ h1" in n and "tiny @ h2" in n for n in result.notes)


def test_grid_hits_are_source_layers():
    baseline = grid({(0, 1), (1, 2), (2, 2)})
    same_rows = grid({(0, 3), (1, 1), (2, 0)})  # other targets, same source layers
    assert compare_profiles(baseline, same_rows).lost_layers == []
    lost = compare_profiles(baseline, grid({(2, 2)}))
    assert lost.regressed and lost.lost_layers == [0, 1]
    assert "lost hits at layers 0, 1 (2 > allow_lost_layers=0)" in lost.reasons
    assert (
        compare_profiles(baseline, grid(set())).reasons[0]
        == "lost hits at layers 0, 1, 2 (decodable nowhere now)"
    )


def test_render_shows_what_moved_and_both_profiles_side_by_side():
    text = render_comparison(compare_profiles(sweep([0, 1, 2, 3]), sweep([6], n=7)))
    lines = text.splitlines()
    assert lines[0].startswith("patchscope regressed: S='The capital of France is'")
    assert (
        "first hit moved from layer 0 to layer 6" in text
        and "layer 7 swept in the baseline but not now" in text
    )
    header = next(i for i, line in enumerate(lines) if line.startswith("layer |"))
    assert "baseline" in lines[header] and "current" in lines[header]
    assert lines[header + 1].split("|")[1].strip() == "■   -0.5000 ' Paris'"
    assert lines[header + 1].split("|")[2].strip() == "·   -6.0000 ' the'"
    assert lines[header + 7].split("|")[2].strip() == "■   -0.5000 ' Paris'"
    assert lines[header + 8].split("|")[2].strip() == "(not swept)"


def test_render_of_a_grid_names_the_target_layer():
    text = render_comparison(compare_profiles(grid({(1, 2)}), grid({(3, 0)})))
    assert "l*=2" in text and "l*=0" in text


def test_comparison_round_trips_through_json():
    result = compare_profiles(sweep([0, 1]), sweep([5]), Tolerances(max_peak_shift=1))
    back = Comparison.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
