"""The attribute-extraction reproduction (pytest_patchscope/attribute.py, paper §4.2): the TSV
parsing, the data and model filters, the paper's hit rule as a match rule of the project, the
probe baseline and its statistics, the CLI's outputs and bad input; and the default model on the
paper's own data (../shared/data/patchscopes-attribute beside the repository, never copied here),
checked token for token against the independent HF reference (tests/hf_reference.py).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pytest_patchscope import MATCH_RULES, Patchscope, assert_patched_generation_contains
from pytest_patchscope.attribute import (
    PAPER_TABLE2,
    Datapoint,
    TaskResult,
    add_statistics,
    crop_source,
    evaluate_attribute,
    find_tasks,
    known_datapoints,
    load_tasks,
    probe_accuracy,
    read_task,
    select_tasks,
    spread,
)
from pytest_patchscope.engine.results import check_match, contains, match_rule
from pytest_patchscope.engine.runner import run_unpatched
from pytest_patchscope.errors import ProbeConfigError, ReportError
from pytest_patchscope.eval import main
from pytest_patchscope.validation import describe_layers, parse_layers

import hf_reference as ref

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "patchscopes-attribute"
"""The paper's TSVs: ../shared/data/patchscopes-attribute from the repository root (CI has it)."""
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"the paper's attribute TSVs are not at {DATA} (the shared/ folder beside the repository root)"
)

HEADER = ["", "sample_id", "prompt_target", "position_target", "target_baseline", "object", "subject",
          "generations_baseline", "is_correct_baseline", "prompt_source", "position_source", "source_cropped_toks"]


def write_tsv(path: Path, rows: list[list[object]], header: list[str] = HEADER) -> Path:
    """A TSV as pandas.to_csv(sep="\\t") writes them: cells with newlines or tabs double-quoted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def row(index, sample, subject, obj, source, cropped, target="The capital city of x", generations="[' Paris']"):
    return [index, sample, target, -1, target.replace("x", subject), obj, subject, generations, "True", source, len(cropped) - 1, repr(cropped)]


# ---- the hit rule: one of the project's match rules ------------------------------------------
def test_the_papers_hit_rule_is_space_insensitive_and_case_sensitive():
    assert contains(" Washington, D. C. is", "Washington D.C.", "paper") is False  # the comma stays
    assert contains(" Washington D. C., the", "Washington D.C.", "paper") is True
    assert contains(" New  York City", "New York", "paper") and contains("NewYork", "New York", "paper")
    assert contains(" paris", "Paris", "paper") is False and contains(" paris", "Paris") is True
    assert contains(" Paris", "paris", "case_sensitive") is False and contains(" Paris", "Paris", "case_sensitive")
    assert set(MATCH_RULES) == {"ignore_case", "case_sensitive", "paper"}


def test_match_is_checked_and_named_in_errors():
    with pytest.raises(ProbeConfigError, match=r"match='Paper' is not valid: one of the match rules .*'paper'"):
        check_match("Paper")
    with pytest.raises(ProbeConfigError, match="match='ignore_case' is not valid: a case-sensitive rule with case_sensitive=True"):
        match_rule(True, "ignore_case")
    with pytest.raises(ProbeConfigError, match="case_sensitive='yes'"):
        match_rule("yes", None)
    assert match_rule(False, None) == "ignore_case" and match_rule(True, None) == "case_sensitive" and match_rule(False, "paper") == "paper"


def test_sweeps_and_assertions_take_the_paper_rule(tiny_llama):
    scope = Patchscope(tiny_llama, progress=False)
    result = scope.generate("France", "The capital city of x", layer=1, target_position=-1, max_new_tokens=4)
    word = max(result.text.split(), key=len)
    assert len(word) >= 2, result.text
    spaced, upper = " ".join(word), word.upper()  # "abc" -> "a b c": a hit only once spaces are removed
    assert result.hit_rate(spaced, match="paper") == 1.0 and result.hit_rate(spaced) == 0.0
    assert_patched_generation_contains(result, spaced, match="paper")
    if upper != word:
        assert result.hit_rate(upper) == 1.0 and result.hit_rate(upper, match="paper") == 0.0
        with pytest.raises(AssertionError, match=r"match='paper'"):
            assert_patched_generation_contains(result, upper, match="paper")
    profile = scope.sweep("France", "The capital city of x", layers=[1], target_position=-1, expect=spaced, max_new_tokens=4, match="paper")
    assert profile.cells[0].hit is True and profile.probe["match"] == "paper" and "match=paper" in profile.describe()
    default = scope.sweep("France", "The capital city of x", layers=[1], target_position=-1, expect=spaced, max_new_tokens=4)
    assert default.cells[0].hit is False and "match" not in default.probe  # the default keeps the keys baselines have
    with pytest.raises(ProbeConfigError, match="match='exact'"):
        scope.sweep("France", "The capital city of x", layers=[1], target_position=-1, expect="Paris", match="exact")
    with pytest.raises(ProbeConfigError, match="in a sweep with candidates"):
        scope.sweep("France", "The capital city of x", layers=[1], target_position=-1, candidates=["Paris", "Rome"], match="paper")


# ---- the TSVs: CSV with quoted newlines, the data filters, the crop ---------------------------
def test_read_task_parses_quoted_newlines_and_applies_the_papers_data_filters(tmp_path):
    rows = [
        row(0, 0, "Canada", "Ottawa", " flights to Canada and back", [" flights", " to", " Canada"]),
        row(1, 0, "Canada", "Ottawa", "", ["Can", "ada"]),  # empty source
        row(2, 0, "Canada", "Ottawa", " a trip to Canada\n", [" a", " trip", " to", " Canada"]),  # cut at a newline
        row(3, 1, "Chile", "Santiago", " service in Chile was", [" service", " in", " Chile"]),  # the notebook's hand-picked drop
        row(4, 1, "Chile", "Santiago", " Chile, or Chile again", [" Chile", ",", " or", " Chile"], generations="[' a\\n', ' b']"),
        row(5, 2, "Peru", "Lima", " the coast of Spain", [" the", " coast"]),  # subject absent
    ]
    rows[4][7] = "first line\nsecond line\tafter a tab"  # a quoted cell with a newline and a tab in another column
    path = write_tsv(tmp_path / "factual" / "star_constellation.tsv", rows)
    assert path.read_text(encoding="utf-8").count("\n") > len(rows) + 1  # wc -l over-counts, as the data README says
    task = read_task(path)
    assert task.name == "star_constellation"
    assert task.counts == {
        "rows": 6, "empty_source": 1, "multiline_source": 1, "paper_exclusion": 1, "subject_not_in_source": 1,
        "kept_by_data_filters": 2, "facts": 2,
    }
    canada, chile = task.datapoints
    assert canada == Datapoint(
        task="star_constellation", row=0, sample_id="0", subject="Canada", object="Ottawa", source=" flights to Canada",
        target="The capital city of x", target_baseline="The capital city of Canada", target_position=-1,
    )
    assert chile.row == 4 and chile.source == " Chile, or Chile"  # the occurrence where the cropped tokens end


def test_crop_source_follows_the_cropped_tokens_where_byte_tokens_split_a_character():
    # GPT-J's byte-level tokens of "Dvořák" join to 'Dvo\ufffd\ufffdák': the crop still ends after the subject.
    tokens = repr([" by", " Anton", "ín", " Dvo", "\ufffd\ufffd", "ák"])
    assert crop_source(" by Antonín Dvořák between August", "Antonín Dvořák", tokens) == " by Antonín Dvořák"
    assert crop_source(" A and A and A", "A", repr([" A", " and", " A"])) == " A and A"
    assert crop_source(" A and A and A", "A") == " A"  # no cropped tokens: the first occurrence
    assert crop_source(" nothing here", "A", repr([" x"])) is None
    assert crop_source(" A then A", "A", "not a list") == " A"


def test_spread_takes_one_sentence_per_fact_first_and_keeps_file_order():
    def point(r, fact):
        return Datapoint("t", r, str(fact), "s", "o", "S", "T", f"T{fact}")

    groups = [[point(0, 0), point(1, 0), point(2, 0)], [point(5, 1)], [point(7, 2), point(8, 2)]]
    assert [d.row for d in spread(groups, 4)] == [0, 1, 5, 7]
    assert [d.row for d in spread(groups, 2)] == [0, 5]
    assert [d.row for d in spread(groups, None)] == [0, 1, 2, 5, 7, 8]
    assert [d.row for d in spread(groups, 100)] == [0, 1, 2, 5, 7, 8]


def test_layer_choices_take_a_step():
    assert parse_layers("0-29:2", 30) == list(range(0, 30, 2))
    assert describe_layers(range(0, 30, 2)) == "0-28:2" and describe_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert describe_layers([3, 5]) == "3,5" and parse_layers(describe_layers([4, 8, 12]), 30) == [4, 8, 12]
    assert parse_layers("0-3,10-20:5", 30) == [0, 1, 2, 3, 10, 15, 20]
    for bad in ("0-30", "5-2", "0-9:0", "0-9:x"):
        with pytest.raises(ProbeConfigError, match="target_layers="):
            parse_layers(bad, 30, "target_layers")


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_data_is_refused_naming_the_folder_file_task_or_field(tmp_path):
    with pytest.raises(ProbeConfigError, match=r"data='.*nowhere' is not valid: a folder holding the Patchscopes attribute TSVs.*It does not exist"):
        find_tasks(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeConfigError, match="It has no .tsv file"):
        find_tasks(tmp_path / "empty")
    bad = write_tsv(tmp_path / "data" / "broken.tsv", [[0, "x"]], header=["", "prompt_target"])
    lacks = "it lacks sample_id, target_baseline, object, subject, prompt_source, source_cropped_toks"
    with pytest.raises(ProbeConfigError, match=rf"broken.tsv columns=.* {lacks}"):
        read_task(bad)
    good = write_tsv(tmp_path / "data" / "country_capital_city.tsv", [row(0, 0, "Canada", "Ottawa", " to Canada", [" to", " Canada"])])
    with pytest.raises(ProbeConfigError, match=r"tasks='country_capital' is not valid: one of the 2 tasks .* Did you mean 'country_capital_city'\?"):
        load_tasks(tmp_path / "data", "country_capital")
    assert select_tasks(find_tasks(tmp_path / "data"), None) == ["broken", "country_capital_city"]
    assert [t.name for t in load_tasks(tmp_path / "data", "country_capital_city")] == ["country_capital_city"]
    write_tsv(good, [])
    with pytest.raises(ProbeConfigError, match="at least one row under its header .task 'country_capital_city'"):
        read_task(good)
    write_tsv(good, [row(0, 0, "Canada", "", " to Canada", [" to", " Canada"])])
    with pytest.raises(ProbeConfigError, match=r"country_capital_city.tsv row 2 object='' is not valid: a non-empty cell"):
        read_task(good)
    (tmp_path / "data" / "latin1.tsv").write_bytes("\t".join(HEADER).encode() + b"\n\xe9\n")
    with pytest.raises(ProbeConfigError, match="latin1.tsv' is not valid: a UTF-8 tab-separated file"):
        read_task(tmp_path / "data" / "latin1.tsv")


def test_cli_reports_bad_data_before_loading_any_model(tmp_path, capsys):
    nowhere = tmp_path / "nope"
    assert main(["attribute", "--data", str(nowhere), "--model", str(nowhere), "--out", str(tmp_path)]) == 2
    assert "patchscope-eval: error: data=" in capsys.readouterr().err
    write_tsv(tmp_path / "d" / "x.tsv", [[0]], header=["", "sample_id"])
    assert main(["attribute", "--data", str(tmp_path / "d"), "--model", str(nowhere), "--out", str(tmp_path)]) == 2
    assert "x.tsv columns=" in capsys.readouterr().err
    assert main(["attribute", "--data", str(tmp_path / "d"), "--tasks", "y", "--model", str(nowhere), "--out", str(tmp_path)]) == 2
    assert "tasks='y' is not valid" in capsys.readouterr().err


# ---- the probe baseline and the statistics ------------------------------------------------------
def test_probe_accuracy_is_out_of_fold():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = [f"c{k % 3}" for k in range(60)]
    centres = {f"c{k}": rng.normal(size=8) * 5 for k in range(3)}
    separable = np.stack([centres[y] + rng.normal(size=8) * 0.1 for y in labels])
    assert probe_accuracy(separable, labels) == 1.0
    noise = rng.normal(size=(60, 8))
    assert probe_accuracy(noise, labels) < 0.6  # chance is 1/3: no fold is scored on its own training data
    unique = [f"o{k}" for k in range(30)]  # every object once (like company CEOs): never seen in training
    assert probe_accuracy(rng.normal(size=(30, 8)), unique) == 0.0
    with pytest.raises(ProbeConfigError, match="at least 3 datapoints"):
        probe_accuracy(noise[:2], labels[:2])


def test_a_probe_held_out_by_fact_cannot_just_recognise_the_subject():
    """Five sentences per fact, each fact its own object (like capitals): a probe whose folds mix a
    fact's sentences learns which subject it sees; held out by fact it has never seen the object."""
    import numpy as np

    rng = np.random.default_rng(1)
    facts = [f"f{k}" for k in range(12) for _ in range(5)]
    subject = {f: rng.normal(size=16) * 4 for f in set(facts)}
    features = np.stack([subject[f] + rng.normal(size=16) * 0.2 for f in facts])
    objects = [f"capital of {f}" for f in facts]
    assert probe_accuracy(features, objects) > 0.9
    assert probe_accuracy(features, objects, facts) == 0.0
    with pytest.raises(ProbeConfigError, match="groups=2 is not valid: at least 3 facts"):
        probe_accuracy(features[:10], objects[:10], facts[:10])


def test_statistics_mark_the_better_side_after_bonferroni():
    def result(name, patchscope, probe):
        return TaskResult(name, "T", {}, 20, 4, list(range(len(patchscope))), [0], patchscope, [[0.0]] * len(patchscope), probe=probe)

    better = result("a", [0.9, 0.92, 0.91, 0.93, 0.9, 0.94, 0.92, 0.91], [0.1, 0.11, 0.1, 0.12, 0.1, 0.1, 0.11, 0.1])
    tied = result("b", [0.5, 0.6, 0.5, 0.6], [0.55, 0.55, 0.55, 0.55])
    constant = result("c", [0.5, 0.5], [0.5, 0.5])
    few = result("d", [0.2], None)
    add_statistics([better, tied, constant, few])
    assert better.t_statistic > 0 and better.p_bonferroni == pytest.approx(min(1.0, 3 * better.p_value))
    assert better.significance == "** Patchscope" and better.p_bonferroni < 1e-5
    assert tied.significance == "" and tied.p_value > 0.05
    assert constant.p_value is None and constant.significance == ""
    assert few.p_value is None and few.excluded
    assert PAPER_TABLE2["substance_phase"] == (73.8, 3.7, 91.9, 1.7, "** Patchscope")


# ---- the tiny model: the model filter, the batched runs, the CLI's outputs -----------------------
SUBJECTS = ["France", "Japan", "Italy", "Spain", "Kenya", "Peru", "Chile", "Egypt"]
CAPITAL = "The capital city of x"


@pytest.fixture
def tiny_data(tmp_path, tiny_llama):
    """A task whose objects the tiny model 'knows': each object is a word of the model's own
    continuation of target_baseline (two facts get an object it does not say). 16 datapoints."""
    scope = Patchscope(tiny_llama, progress=False)
    texts = run_unpatched(scope.engine, [tiny_llama.tokenize(CAPITAL.replace("x", s)) for s in SUBJECTS], max_new_tokens=20)
    rows, index = [], 0
    for k, (subject, text) in enumerate(zip(SUBJECTS, texts)):
        obj = text.split()[0] if k < 6 else "Xyzzy"
        for source in (f" we flew to {subject}", f" the history of {subject} is long", f" In {subject}\n"):
            cropped = source[: source.index(subject) + len(subject)]
            rows.append(row(index, k, subject, obj, source, [cropped]))
            index += 1
    write_tsv(tmp_path / "data" / "factual" / "country_capital_city.tsv", rows)
    return tmp_path / "data", texts


def test_model_filter_keeps_the_facts_the_model_knows(tiny_llama, tiny_data):
    data, texts = tiny_data
    scope = Patchscope(tiny_llama, progress=False)
    (task,) = load_tasks(data)
    assert task.counts["multiline_source"] == 8 and len(task.datapoints) == 16
    filtered = known_datapoints(scope, task)
    assert (filtered.judged, filtered.known) == (8, 6)
    assert [d.subject for d in filtered.datapoints] == [s for s in SUBJECTS[:6] for _ in range(2)]
    assert filtered.generations[CAPITAL.replace("x", "France")] == texts[0]
    limited = known_datapoints(scope, task, limit=3)
    assert [d.subject for d in limited.datapoints] == SUBJECTS[:3] and limited.judged == 8  # one chunk judged all 8
    assert [d.subject for d in known_datapoints(scope, task, limit=3, chunk=2).datapoints] == SUBJECTS[:3]
    assert known_datapoints(scope, task, limit=3, chunk=2).judged == 4  # stopped once 3 facts were known


def test_cli_writes_samples_tables_and_figures(tiny_llama, tiny_llama_dir, tiny_data, tmp_path, capsys):
    data, texts = tiny_data
    out = tmp_path / "out"
    argv = ["attribute", "--data", str(data), "--model", str(tiny_llama_dir), "--layers", "0-3", "--target-layers", "0,2",
            "--chunk", "5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "country_capital_city" in printed and "wrote:" in printed
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 12 * 4 * 2  # 6 known facts x 2 single-line sentences, x 4 source x 2 target layers
    fields = {"task", "sample_id", "source_prompt", "source_position", "target_prompt", "target_position", "object", "layer",
              "target_layer", "max_new_tokens", "generation", "hit"}
    assert fields <= set(samples[0])
    assert all(s["hit"] == contains(s["generation"], s["object"], "paper") for s in samples)
    assert {s["target_position"] for s in samples} == {4} and {s["max_new_tokens"] for s in samples} == {10}
    report = json.loads((out / "attribute.json").read_text(encoding="utf-8"))
    (task,) = report["tasks"]
    assert task["datapoints"] == 12 and task["classes"] == len({t.split()[0] for t in texts[:6]}) and task["counts"]["known_facts"] == 6
    by_layer = {}
    for s in samples:
        by_layer.setdefault(s["layer"], {}).setdefault(s["row"], []).append(s["hit"])
    assert task["patchscope"] == [sum(any(h) for h in by_layer[layer].values()) / 12 for layer in range(4)]
    assert task["probe"] is None and task["excluded"] is True  # 12 datapoints < 15
    assert task["hit_rate"][0] == [sum(s["hit"] for s in samples if (s["layer"], s["target_layer"]) == (0, t)) / 12 for t in (0, 2)]
    markdown = (out / "attribute.md").read_text(encoding="utf-8")
    # No task reaches 15 datapoints: no empty comparison table, a sentence that says so.
    assert "| Task | Probe |" not in markdown and "No task has 15 datapoints the model knows" in markdown
    assert "Fewer than 15 datapoints" in markdown and "country_capital_city (12;" in markdown  # 12 < 15: no probe
    for png in ("attribute_layers.png", "attribute_heatmaps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The batched jobs (chunks of 5 datapoints) give each probe's own generation.
    scope = Patchscope(tiny_llama, progress=False)
    for s in samples[::37]:
        single = scope.generate(s["source_prompt"], s["target_prompt"], layer=s["layer"], target_layer=s["target_layer"],
                                target_position=-1, max_new_tokens=10, stop=())
        assert single.text == s["generation"]


def test_probe_and_statistics_run_at_15_datapoints(tiny_llama, tiny_data, tmp_path):
    data, _ = tiny_data
    for path in data.rglob("*.tsv"):  # make every sentence single-line: 18 datapoints of the 6 known facts
        path.write_text(path.read_text(encoding="utf-8").replace('\n"', '"'), encoding="utf-8")
    scope = Patchscope(tiny_llama, progress=False)
    report = evaluate_attribute(scope, data, layers=[0, 1, 3], target_layers=[0], probe=True, plot=False, out=tmp_path)
    (task,) = report.tasks
    assert task.datapoints == 18 and not task.excluded and len(task.probe) == len(task.probe_by_sentence) == 3
    assert report.compared == [task] and (task.p_value is None or 0 <= task.p_value <= 1)
    assert "| country_capital_city |" in report.to_markdown()


def test_an_empty_filter_result_names_the_tasks(tiny_llama, tmp_path):
    write_tsv(tmp_path / "d" / "company_ceo.tsv", [row(0, 0, "Acme", "Qwxz", " shares of Acme", [" shares", " of", " Acme"],
                                                   target="The name of the CEO of x")])
    scope = Patchscope(tiny_llama, progress=False)
    with pytest.raises(ReportError, match=r"no datapoint passes the model filter .*company_ceo: 0 of 1 facts known"):
        evaluate_attribute(scope, tmp_path / "d", probe=False, out=tmp_path / "out")
    with pytest.raises(ProbeConfigError, match="max_per_task=0"):
        evaluate_attribute(scope, tmp_path / "d", max_per_task=0)
    with pytest.raises(ProbeConfigError, match="layers='0-9'"):
        evaluate_attribute(scope, tmp_path / "d", layers="0-9")


# ---- the default model on the paper's own data ------------------------------------------------
@needs_data
def test_the_default_model_on_the_papers_data(default_scope, plain_hf, tmp_path):
    """Two tasks x a few facts of the released TSVs: the filter, the batched grid and the scores,
    with generations checked token for token against the plain-HF reference."""
    report = evaluate_attribute(
        default_scope, DATA, tasks="country_capital_city,substance_phase", layers=[0, 4, 8], target_layers=[0, 2],
        max_per_task=4, probe=False, out=tmp_path, plot=False,
    )
    capital, phase = report.tasks
    assert capital.counts["rows"] == 120 and capital.counts["kept_by_data_filters"] == 108  # 9 multi-line, 3 empty sources
    assert capital.datapoints == 4 and phase.datapoints == 4
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 2 * 4 * 3 * 2
    model = default_scope.model
    eos = min(model.eos_token_ids)
    for s in samples[::5]:
        source_ids = model.tokenize(s["source_prompt"])
        target_ids = model.tokenize(s["target_prompt"])
        vector = ref.source_state(plain_hf, source_ids, s["source_position"], s["layer"])
        expected = ref.patched_generate(plain_hf, target_ids, s["target_position"], s["target_layer"], vector, 10, eos=eos)
        assert s["generation"] == model.decode(expected), s
    # Measured (this configuration, SmolLM2-135M-Instruct): the model knows 8 of the 24 capitals and 39 of
    # the 50 phases; Patchscope accuracy 0.5 at every layer for the capitals (2 of 4 datapoints), 0.75 / 1.0
    # / 1.0 for the phases. The bounds leave one datapoint of slack.
    assert (capital.counts["known_facts"], phase.counts["known_facts"]) == (8, 39)
    assert min(capital.patchscope) >= 0.25 and min(phase.patchscope[1:]) >= 0.75
    assert capital.clean_hits == 0 and phase.clean_hits == 0  # the unpatched target says none of the objects


@needs_data
def test_the_example_gate_passes_on_the_release_model(pytester, tmp_path, monkeypatch):
    """example_suites/paper_attribute against its committed baseline, on the model that recorded it:
    every datapoint is compared (none new, none missing) and none regressed."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    baseline = tmp_path / "baseline.json"
    shutil.copy(repo / "example_suites" / "paper_attribute" / "baseline.json", baseline)
    monkeypatch.chdir(repo)
    result = pytester.runpytest("example_suites/paper_attribute", f"--patchscope-baseline={baseline}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=60)
    result.stdout.fnmatch_lines(["*60 probes: 60 unchanged*"])
