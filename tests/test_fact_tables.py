"""Fact tables (*.patchscope.yaml): collection, ids, defaults and overrides, errors that name the file,
line and key, one batched job across items (a deselected probe is not run), the gate, xdist
--dist loadfile, and the equivalence with the same facts written as test functions (default model).

Runs through pytester count the engine's jobs with a conftest that logs every `run_probes` call.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_patchscope import Patchscope, Placeholder, Span, Substring, load_model
from pytest_patchscope.fact_tables import TableError, load_table
from pytest_patchscope.model.loading import cache_root

pytest_plugins = ["pytester"]

JOB_LOG_CONFTEST = '''
import json, os
import pytest_patchscope.scope as scope

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs.jsonl")
ORIGINAL = scope.run_probes


def run_probes(engine, probes, **kwargs):
    with open(LOG, "a") as handle:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        handle.write(json.dumps({"worker": worker, "probes": [[p.source, p.layer] for p in probes]}) + "\\n")
    return ORIGINAL(engine, probes, **kwargs)


scope.run_probes = run_probes


def pytest_unconfigure(config):
    scope.run_probes = ORIGINAL
'''

SOURCES = {"France": "The capital of France is", "Italy": "The capital of Italy is", "Spain": "The capital of Spain is"}
TINY_TARGET = "Short x here"


@pytest.fixture(autouse=True)
def rootdir_here(pytester):
    """An ini file in the test directory: the project root, where baseline keys start."""
    pytester.makeini("[pytest]\n")


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """The real model cache, resolved before pytester points HOME at a temporary directory."""
    return cache_root()


@pytest.fixture(scope="session")
def tiny_answers(tiny_llama_dir) -> dict[str, str]:
    """What the tiny model decodes at layer 0 for each source: a word its sweep then hits."""
    scope = Patchscope(load_model(str(tiny_llama_dir)), progress=False)
    answers = {}
    for name, source in SOURCES.items():
        profile = scope.sweep(source, TINY_TARGET, layers=[0, 1, 2, 3], expect="?", max_new_tokens=3, target_position=Placeholder("x"))
        answers[name] = profile.cells[0].text.split()[0]
    return answers


def tiny_table(answers: dict[str, str], *, extra: str = "", wrong: str | None = None) -> str:
    """A table of the SOURCES on the tiny model; `wrong` expects an answer its sweep never decodes."""
    probes = "".join(
        f"  - id: {name}\n    source: {SOURCES[name]}\n    expect: {json.dumps('zzqx' if name == wrong else answer)}\n"
        for name, answer in answers.items()
    )
    return (
        f"target: {TINY_TARGET}\ntarget_position: {{placeholder: x}}\nlayers: [0, 1, 2, 3]\nmax_new_tokens: 3\n"
        f"probes:\n{probes}{extra}"
    )


def jobs(pytester) -> list[dict]:
    log = pytester.path / "jobs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run(pytester, model_dir, *args):
    return pytester.runpytest(f"--patchscope-model={model_dir}", *args)


# ---- the format, without a model ------------------------------------------------------------------
TABLE = """\
target: "The capital city of x is"
target_position: {placeholder: x}
layers: [0, 1, 2]
min_hits: 2
max_new_tokens: 8
probes:
  - id: France
    source: France
    expect: Paris
  - id: France-layer-1
    source: France
    layer: 1
    expect: Paris
  - id: scored
    source: Japan
    layer: 0
    candidates: [Tokyo, Osaka]
    prefers: Osaka
    margin: 0.5
  - id: positions
    source: The capital of France is
    source_position: [{substring: France, token: all}, -1]
    target: "a b c d"
    target_position: [{span: [0, 1]}, 2, {substring: c, occurrence: 0}]
    layers: all
    expect: Paris
    do_sample: true
    temperature: 0.7
    seed: 3
    tolerances: {max_peak_shift: 5}
  - id: identity
    source: Paris
    preset: token_identity
    expect: Paris
    max_new_tokens: 4
"""


def test_file_defaults_apply_and_each_probe_overrides_them():
    model, facts = load_table(TABLE)
    by_id = {fact.id: fact for fact in facts}
    assert model is None and list(by_id) == ["France", "France-layer-1", "scored", "positions", "identity"]

    france = by_id["France"]
    assert france.sweep and france.min_hits == 2 and france.expect is None  # a sweep's expect goes to the sweep
    assert france.call == {
        "target_position": Placeholder("x"), "layers": [0, 1, 2], "max_new_tokens": 8, "expect": "Paris",
        "decoding": france.call["decoding"],
    }
    assert france.call["decoding"].changed() == {}

    one = by_id["France-layer-1"]  # layer replaces the file's layers; min_hits (sweeps only) does not apply
    assert not one.sweep and one.expect == "Paris" and "layers" not in one.call and one.call["layer"] == 1

    scored = by_id["scored"]  # candidates without expect: score only, like Patchscope.score
    assert scored.candidates == ("Tokyo", "Osaka") and scored.prefers == "Osaka" and scored.margin == 0.5
    assert scored.call["max_new_tokens"] == 8 and scored.call["candidates"] == ["Tokyo", "Osaka"]

    positions = by_id["positions"]
    assert positions.call["source_position"] == [Substring("France", "all"), -1]
    assert positions.call["target_position"] == [Span(0, 1), 2, Substring("c", "last", 0)]
    assert positions.call["layers"] is None and positions.target == "a b c d"  # "all": every layer
    assert positions.call["decoding"].changed() == {"do_sample": True, "temperature": 0.7, "seed": 3}
    assert positions.tolerances == {"max_peak_shift": 5}

    identity = by_id["identity"]  # preset replaces the file's target
    assert identity.preset == "token_identity" and identity.target == "" and identity.call["max_new_tokens"] == 4
    assert by_id["France"].lines["layers"] == 3 and by_id["France"].line == 7


def test_a_single_probe_with_candidates_and_no_budget_scores_only():
    _, facts = load_table("target: T x\nlayer: 0\nprobes:\n  - id: a\n    source: S\n    candidates: [A, B]\n")
    assert facts[0].call["max_new_tokens"] == 0 and facts[0].prefers == "A"


def test_yaml_merge_keys_work_and_the_merged_values_can_be_overridden():
    _, facts = load_table("target: T x\nlayers: [0]\nprobes:\n  - &base {id: a, source: S, expect: E}\n  - <<: *base\n    id: b\n    expect: F\n")
    assert [(f.id, f.call["expect"]) for f in facts] == [("a", "E"), ("b", "F")]


BAD = [
    ("    layres: [0]\n", 8, "layres=[0] is not valid: a key of a fact-table probe. Did you mean layers?"),
    ("    expect_: x\n", 8, "Did you mean expect?"),
    ("    min_hits: 0\n", 8, "min_hits=0 is not valid: an int >= 1"),
    ("    layers: [0, -1]\n", 8, "layers[1]=-1 is not valid: an int >= 0"),
    ("    target_position: {placeholder: x, ocurrence: 1}\n", 8, "target_position.ocurrence=1 is not valid: a key of a placeholder position. Did you mean occ"),
    ("    target_position:\n      substring: x\n      token: middle\n", 10, "target_position.token='middle' is not valid: last, first or all"),
    ("    temperature: 0.5\n", 8, "probe 'France': temperature=0.5 is not valid: 1.0 with greedy decoding"),
    ("    decoding: {do_sample: true, temprature: 0.5}\n", 8, "decoding.temprature=0.5 is not valid: a key of decoding settings. Did you mean temperature?"),
    ("    tolerances:\n      max_peak_shift: 1\n      max_peak_shif: 2\n", 10, "Did you mean max_peak_shift?"),
    ("    tolerances: {max_peak_shift: -2}\n", 8, "max_peak_shift=-2 is not valid"),
    ("    site: resid\n", 8, "site='resid' is not valid: one of 'resid_post'"),
    ("    preset: token_identiy\n", 8, "Did you mean token_identity?"),
    ("    units: 3\n", 8, "units=3 is not valid"),
    ("    candidates: [Paris, Lyon]\n    prefers: Nice\n", 9, "prefers='Nice' is not one of the candidates ['Paris', 'Lyon']"),
    ("    target_layer: 3\n", 8, "probe 'France': target_layer does not apply to a sweep (layers: ...)"),
    ("    layer: 3\n    layers: [1]\n", 9, "probe 'France': give layers (a sweep) or layer (one probe), not both"),
    ("    source: Again\n", 8, "the key 'source' appears twice in this mapping (first on line 6)"),
    ("    model: other\n", 8, "model is a key of the file, not of a probe"),
    ("  - id: France\n    source: X\n    expect: Y\n", 8, "the id 'France' is used twice (first on line 5)"),
    ("  - id: NO\n    source: Norway\n    expect: Oslo\n", 8, "id=False is not valid: a non-empty string. Quote it"),
    ("  - source: X\n    expect: Y\n", 8, "this probe has no id"),
    ("  - id: quiet\n    source: X\n", 8, "probe 'quiet': it asserts nothing"),
    ("  - id: one\n    source: X\n    layer: 2\n    min_hits: 2\n    expect: Y\n", 11, "min_hits does not apply to one probe (layer: ...)"),
]
GOOD = 'target: "The capital city of x is"\ntarget_position: {placeholder: x}\nlayers: [0, 1]\nprobes:\n  - id: France\n    source: France\n    expect: Paris\n'


@pytest.mark.parametrize(("addition", "line", "message"), BAD, ids=[message[:40] for _, _, message in BAD])
def test_a_wrong_key_type_or_value_names_its_line_and_key(addition, line, message):
    with pytest.raises(TableError) as caught:
        load_table(GOOD + addition)
    assert caught.value.line == line and message in caught.value.message


def test_collection_errors_name_the_file_and_line_and_leave_other_files_collectable(pytester):
    pytester.makefile(".patchscope.yaml", good=GOOD)
    (pytester.path / "typo.patchscope.yaml").write_text(GOOD + "    layres: [0]\n")
    (pytester.path / "broken.patchscope.yaml").write_text(GOOD + "  - id: [France\n")
    result = pytester.runpytest("--collect-only", "-q", "--continue-on-collection-errors")
    result.stdout.fnmatch_lines([
        "good.patchscope.yaml::France",
        "*ERROR collecting broken.patchscope.yaml*",
        "broken.patchscope.yaml:9: not valid YAML: expected ',' or ']'*",
        "*ERROR collecting typo.patchscope.yaml*",
        "typo.patchscope.yaml:8: layres=[0] is not valid: a key of a fact-table probe. Did you mean layers?",
    ])
    assert "Traceback" not in result.stdout.str()
    assert pytester.runpytest("--collect-only", "-q").ret == pytest.ExitCode.INTERRUPTED  # pytest's rule for collection errors


def test_each_probe_is_one_item_named_by_its_id_and_selectable(pytester):
    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "capitals.patchscope.yaml").write_text(TABLE)
    (pytester.path / "notes.yaml").write_text("not: a table\n")  # only *.patchscope.yaml files are tables
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines([
        "sub/capitals.patchscope.yaml::France", "sub/capitals.patchscope.yaml::France-layer-1",
        "sub/capitals.patchscope.yaml::scored", "sub/capitals.patchscope.yaml::positions",
        "sub/capitals.patchscope.yaml::identity", "5 tests collected*",
    ])
    pytester.runpytest("--collect-only", "-q", "-k", "France and not layer").stdout.fnmatch_lines(["*1/5 tests collected (4 deselected)*"])


# ---- running on the tiny model --------------------------------------------------------------------
def test_all_selected_probes_run_as_one_job_and_each_item_reports_its_own_verdict(pytester, tiny_llama_dir, tiny_answers):
    pytester.makeconftest(JOB_LOG_CONFTEST)
    single = f"  - id: one\n    source: {SOURCES['Spain']}\n    layer: 0\n    expect: {json.dumps(tiny_answers['Spain'])}\n"
    pytester.makefile(".patchscope.yaml", first=tiny_table(tiny_answers, wrong="Italy", extra=single))
    pytester.makefile(".patchscope.yaml", second=tiny_table(tiny_answers))
    result = run(pytester, tiny_llama_dir, "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["FAILED first.patchscope.yaml::Italy - 'zzqx' decoded at 0 of layers*"])
    # The failure text is assert_localized's: the expectation, the hit layers and the sweep's table.
    result.stdout.fnmatch_lines(["'zzqx' decoded at 0 of layers ?0, 1, 2, 3? (hits at ??), expected at least 1",
                                 "  all hit layers: [], peak layer: *", "*l  l* hit  logprob   rank  text*"])
    (job,) = jobs(pytester)  # both files (one model) in one job: 3 sweeps x 4 layers each, and the single probe
    assert len(job["probes"]) == 2 * 3 * 4 + 1


def test_a_deselected_probe_is_not_run(pytester, tiny_llama_dir, tiny_answers):
    pytester.makeconftest(JOB_LOG_CONFTEST)
    pytester.makefile(".patchscope.yaml", facts=tiny_table(tiny_answers, wrong="Italy"))
    run(pytester, tiny_llama_dir, "-k", "France").assert_outcomes(passed=1)
    run(pytester, tiny_llama_dir, "--deselect", "facts.patchscope.yaml::Spain").assert_outcomes(passed=1, failed=1)
    run(pytester, tiny_llama_dir, "--lf").assert_outcomes(failed=1)  # the last run's failure only
    sources = [sorted({source for source, _ in job["probes"]}) for job in jobs(pytester)]
    assert sources == [[SOURCES["France"]], [SOURCES["France"], SOURCES["Italy"]], [SOURCES["Italy"]]]
    assert [len(job["probes"]) for job in jobs(pytester)] == [4, 8, 4]


def test_a_probe_invalid_for_the_model_fails_its_own_item_and_the_others_still_run(pytester, tiny_llama_dir, tiny_answers):
    pytester.makeconftest(JOB_LOG_CONFTEST)
    extra = (
        "  - id: deep\n    source: S\n    layers: [0, 99]\n    expect: a\n"
        "  - id: no-placeholder\n    source: S\n    target: No placeholder here\n    expect: a\n"
    )
    pytester.makefile(".patchscope.yaml", facts=tiny_table(tiny_answers, extra=extra))
    result = run(pytester, tiny_llama_dir, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines([
        "facts.patchscope.yaml:17: probe 'deep': layers=?0, 99? is not valid: an int, a range or a list of ints from 0 to 3 "
        "(the model has 4 layers); 99 is not.*",
        "facts.patchscope.yaml:2: probe 'no-placeholder': target_position='x' is not valid: a placeholder that is a whole token*",
    ])
    assert "Traceback" not in result.stdout.str()
    (job,) = jobs(pytester)
    assert len(job["probes"]) == 3 * 4


def test_table_sweeps_are_recorded_in_the_gate_under_stable_keys(pytester, tiny_llama_dir, tiny_answers):
    (pytester.path / "tables").mkdir()
    (pytester.path / "tables" / "facts.patchscope.yaml").write_text(tiny_table(tiny_answers))
    baseline = pytester.path / "loc.json"
    first = run(pytester, tiny_llama_dir, "-p", "no:cacheprovider", f"--patchscope-baseline={baseline}", "--patchscope-update-baseline")
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines(["3 probes: 3 new", f"baseline written: {baseline} (3 probes)"])
    entries = json.loads(baseline.read_text())["entries"]
    assert sorted(key.split("::probe=")[0] for key in entries) == [f"tables/facts.patchscope.yaml::{name}" for name in sorted(SOURCES)]
    assert {entry["test"] for entry in entries.values()} == {f"tables/facts.patchscope.yaml::{name}" for name in SOURCES}
    # The same keys from another working directory, through a path argument: the gate compares, unchanged.
    second = pytester.runpytest(f"--patchscope-model={tiny_llama_dir}", "-p", "no:cacheprovider",
                                f"--patchscope-baseline={baseline}", str(pytester.path / "tables"))
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(["3 probes: 3 unchanged"])


def test_with_a_reference_model_each_table_sweep_is_compared_with_its_run_there(pytester, tiny_llama_dir, damaged_dir, tiny_answers):
    pytester.makeconftest(JOB_LOG_CONFTEST)
    pytester.makefile(".patchscope.yaml", facts=tiny_table(tiny_answers))
    same = run(pytester, tiny_llama_dir, "-p", "no:cacheprovider", f"--patchscope-compare-model={tiny_llama_dir}")
    same.assert_outcomes(passed=3)
    same.stdout.fnmatch_lines([f"reference model: {tiny_llama_dir}", "3 probes: 3 unchanged"])
    assert [len(job["probes"]) for job in jobs(pytester)] == [3 * 4, 3 * 4]  # one job on each model
    other = run(pytester, damaged_dir, "-p", "no:cacheprovider", f"--patchscope-compare-model={tiny_llama_dir}")
    other.stdout.fnmatch_lines([f"reference model: {tiny_llama_dir}", "3 probes: *regressed*"])


def test_xdist_loadfile_runs_each_file_as_one_job_on_one_worker(pytester, tiny_llama_dir, tiny_answers, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makeconftest(JOB_LOG_CONFTEST)
    pytester.makefile(".patchscope.yaml", first=tiny_table(tiny_answers), second=tiny_table(tiny_answers, wrong="Spain"))
    result = pytester.runpytest_subprocess(
        f"--patchscope-model={tiny_llama_dir}", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile", timeout=300
    )
    result.assert_outcomes(passed=5, failed=1)
    ran = jobs(pytester)
    assert len(ran) == 2 and all(len(job["probes"]) == 3 * 4 for job in ran)  # each file once, no probe twice
    assert {job["worker"] for job in ran} <= {"gw0", "gw1"}


# ---- the same facts as test functions and as a table (default model) -------------------------------
FACTS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome")]
SETTINGS = 'layers=[0, 1, 2, 3, 4, 5], max_new_tokens=8, target_position=Placeholder("x")'
FUNCTIONS = '''
from pytest_patchscope import Placeholder, assert_localized, assert_patched_generation_contains, assert_patched_prefers

TARGET = "The capital city of x is"
''' + "".join(f'''

def test_{country}(patchscope):
    profile = patchscope.sweep("{country}", TARGET, expect="{capital}", {SETTINGS})
    patchscope.record(profile)
    assert_localized(profile, min_hits=1)
''' for country, capital in FACTS) + '''

def test_Spain_at_0(patchscope):
    result = patchscope.generate("Spain", TARGET, layer=0, max_new_tokens=8, target_position=Placeholder("x"))
    assert_patched_generation_contains(result, "Madrid")


def test_Japan_scored(patchscope):
    result = patchscope.score("Japan", TARGET, ["Tokyo", "Osaka"], layer=0, target_position=Placeholder("x"))
    assert_patched_prefers(result, "Tokyo", margin=0.5)
'''
EQUIVALENT_TABLE = (
    'target: "The capital city of x is"\ntarget_position: {placeholder: x}\nlayers: [0, 1, 2, 3, 4, 5]\nmin_hits: 1\n'
    "max_new_tokens: 8\nprobes:\n"
    + "".join(f"  - id: {country}\n    source: {country}\n    expect: {capital}\n" for country, capital in FACTS)
    + "  - id: Spain_at_0\n    source: Spain\n    layer: 0\n    expect: Madrid\n"
    + "  - id: Japan_scored\n    source: Japan\n    layer: 0\n    candidates: [Tokyo, Osaka]\n    margin: 0.5\n    max_new_tokens: 0\n"
)
NUMBER = re.compile(r"-?\d+\.\d+")


def _entries_without_tests(baseline: Path) -> dict[str, str]:
    """Each entry's JSON text without its test (the one field that must differ), by probe hash."""
    entries = json.loads(baseline.read_text())["entries"]
    out = {}
    for key, entry in entries.items():
        entry.pop("test")
        out[key.rsplit("::probe=", 1)[1]] = json.dumps(entry, sort_keys=True, ensure_ascii=False)
    return out


def test_the_same_facts_as_functions_and_as_a_table_give_the_same_verdicts_and_baseline_entries(pytester, user_cache, monkeypatch):
    """On the default model. The entries agree byte for byte except their log-probabilities: CPU matmuls
    round differently for another batch shape (a table runs one job, each function its own), by about
    1e-5 nats, which can move the 4th decimal the baseline keeps. Those agree within 1e-3."""
    monkeypatch.setenv("PATCHSCOPE_CACHE_DIR", str(user_cache))
    (pytester.path / "functions").mkdir()
    (pytester.path / "table").mkdir()
    (pytester.path / "functions" / "test_facts.py").write_text(FUNCTIONS)
    (pytester.path / "table" / "facts.patchscope.yaml").write_text(EQUIVALENT_TABLE)
    outcomes, failures, baselines = {}, {}, {}
    for kind in ("functions", "table"):
        baseline = pytester.path / f"{kind}.json"
        reprec = pytester.inline_run("-p", "no:cacheprovider", f"--patchscope-baseline={baseline}", "--patchscope-update-baseline", kind)
        for report in reprec.getreports("pytest_runtest_logreport"):
            if report.when == "call":
                name = report.nodeid.rsplit("::", 1)[1].removeprefix("test_")
                outcomes.setdefault(kind, {})[name] = report.outcome
                if report.failed:
                    text = report.longrepr.reprcrash.message if kind == "functions" else str(report.longrepr)
                    failures.setdefault(kind, {})[name] = text.removeprefix("AssertionError: ")
        baselines[kind] = _entries_without_tests(baseline)
    assert outcomes["functions"] == outcomes["table"]
    assert outcomes["table"] == {"France": "passed", "Germany": "passed", "Italy": "failed", "Spain_at_0": "passed", "Japan_scored": "passed"}
    assert failures["functions"].keys() == failures["table"].keys() == {"Italy"}
    assert NUMBER.sub("#", failures["functions"]["Italy"]) == NUMBER.sub("#", failures["table"]["Italy"])
    assert baselines["functions"].keys() == baselines["table"].keys() and len(baselines["table"]) == 3
    for probe, text in baselines["functions"].items():
        table_text = baselines["table"][probe]
        assert NUMBER.sub("#", text) == NUMBER.sub("#", table_text)
        for ours, theirs in zip(NUMBER.findall(text), NUMBER.findall(table_text)):
            assert abs(float(ours) - float(theirs)) <= 1e-3
