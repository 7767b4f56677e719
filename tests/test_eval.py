"""The next-token evaluation (pytest_patchscope/eval.py, paper §4.1): sampling, the three methods
against direct computations, the last layer's pre-norm state, the affine maps as mappings, the CLI.

The reference side uses an unbridged HF model and plain forward hooks (tests/hf_reference.py); it
shares no code with the engine or with eval.py.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from pytest_patchscope import LOGIT_LENS, TOKEN_IDENTITY, AffineMapping, Patchscope
from pytest_patchscope.engine.runner import Engine
from pytest_patchscope.errors import ProbeConfigError, ReportError
from pytest_patchscope.eval import (
    NextTokenReport,
    capture_states,
    default_corpus,
    evaluate_nexttoken,
    main,
    parse_layers,
    plot_nexttoken,
    prose_paragraphs,
    read_corpus,
    sample_windows,
    split_documents,
    write_outputs,
)

import hf_reference as ref

PARAGRAPHS = [
    "The river runs through the old town, past the market and the church, and then it turns east toward the hills "
    "where the farmers keep their sheep during the long summer months.",
    "Every morning the baker opens his shop before sunrise. He sells bread, small cakes and coffee to the workers "
    "who walk by on their way to the station at the edge of the town.",
    "In the evening the square fills with people. Children play near the fountain while their parents sit at the "
    "tables outside the cafe and talk about the weather, the harvest and the news from the city.",
    "The library on the hill has more than ten thousand books. Most of them are about the history of the region, "
    "but there is also a small room with novels, poems and maps of the mountains.",
    "When the winter comes the roads are often closed by snow, and the town is cut off for days. People stay at "
    "home, read by the fire and wait for the first warm wind of spring to arrive.",
    "The school teacher came to the town twenty years ago. She teaches reading, writing and arithmetic, and on "
    "Fridays she takes the children to the river to study the plants and the birds.",
    "A small train stops at the station twice a day. It carries letters, newspapers and visitors from the capital, "
    "and in the autumn it takes the apples and the wine to the markets in the south.",
    "The old bridge was built of stone three hundred years ago. It has survived floods, wars and earthquakes, and "
    "it is still the only way to cross the river without a boat.",
]


# ---- corpus and sampling (no model forward) -----------------------------------------------------
def test_prose_paragraphs_strip_markup_grammar_and_code():
    text = (
        "Assignment statements\n*********************\n\n"
        "Assignment statements are used to (re)bind names to *values* and to\nmodify attributes of mutable objects [1]:\n\n"
        "   assignment_stmt ::= (target_list \"=\")+ (starred_expression)\n\n"
        "   >>> x = [1, 2, 3]\n   >>> x[0] = {'a': (1, 2)}\n\n"
        "* If the target list is a single target with no trailing comma,\n  the object is assigned to that target.\n\n"
        "Too short to keep.\n"
    )
    assert prose_paragraphs(text) == [
        "Assignment statements are used to (re)bind names to values and to modify attributes of mutable objects:",
        "If the target list is a single target with no trailing comma, the object is assigned to that target.",
    ]


def test_default_corpus_is_prose_from_pydoc_topics():
    docs = default_corpus()
    assert len(docs) > 500 and sum(map(len, docs)) > 100_000
    assert not any("::=" in d or d.startswith(">>>") or "*****" in d for d in docs)


def test_read_corpus_splits_files_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first  line\ncontinues\n\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("third\n")
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.txt"]) == ["first line continues", "second paragraph", "third"]
    with pytest.raises(ProbeConfigError, match="text="):
        read_corpus([tmp_path / "missing.txt"])


def test_windows_are_deterministic_prefix_stable_and_from_disjoint_halves(tiny_llama):
    evaluation, training = split_documents(PARAGRAPHS, seed=0)
    assert set(evaluation).isdisjoint(training) and sorted(evaluation + training) == list(range(len(PARAGRAPHS)))
    ten = sample_windows(tiny_llama, PARAGRAPHS, 10, seed=0, pool=evaluation)
    assert ten == sample_windows(tiny_llama, PARAGRAPHS, 10, seed=0, pool=evaluation)
    assert ten[:4] == sample_windows(tiny_llama, PARAGRAPHS, 4, seed=0, pool=evaluation)
    assert ten != sample_windows(tiny_llama, PARAGRAPHS, 10, seed=1, pool=evaluation)
    assert len({s.text for s in ten}) == 10
    for s in ten:
        assert s.document in evaluation and s.text in PARAGRAPHS[s.document]
        assert s.ids == tuple(tiny_llama.tokenize(s.text))
        assert 7 <= len(s.ids) <= 25  # 8-24 document tokens; re-tokenizing the cut may differ by one
    with pytest.raises(ProbeConfigError, match="n=100000 is not valid"):
        sample_windows(tiny_llama, PARAGRAPHS, 100_000, pool=evaluation)


def test_parse_layers():
    assert parse_layers(None, 30) == parse_layers("all", 30) == list(range(30))
    assert parse_layers("10,12,20-22", 30) == [10, 12, 20, 21, 22]
    assert parse_layers(range(3), 30) == [0, 1, 2] and parse_layers(5, 30) == [5]
    for bad in ("30", "a-b", "5-", [], [-1], [True]):
        with pytest.raises(ProbeConfigError, match="layers="):
            parse_layers(bad, 30)


# ---- tiny model: the batched capture, the affine maps as mappings ----------------------------
def test_batched_capture_equals_engine_capture(tiny_llama):
    prompts = [tiny_llama.tokenize(t) for t in ("The river runs", "The baker opens", "A small train stops at the")]
    states, predictions = capture_states(tiny_llama, prompts, [0, 3])
    for k, ids in enumerate(prompts):
        single = Engine(tiny_llama).capture(ids, len(ids) - 1, [0, 3])
        assert torch.allclose(states[0][k], single[0], atol=1e-5) and torch.allclose(states[3][k], single[3], atol=1e-5)
        with torch.no_grad():
            logits = tiny_llama.hf(torch.tensor([ids])).logits[0, -1]
        assert int(predictions[k, 0]) == int(logits.argmax())
        assert float(predictions[k, 1]) == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-4)
    all_positions, _ = capture_states(tiny_llama, prompts, [2], first_position=1)
    assert [tuple(s.shape) for s in all_positions[2]] == [(len(ids) - 1, tiny_llama.d_model) for ids in prompts]


def test_affine_maps_save_load_and_work_as_a_probe_mapping(tmp_path, tiny_llama):
    scope = Patchscope(tiny_llama)
    report = evaluate_nexttoken(scope, PARAGRAPHS, n=4, n_train=20, layers=[1, 2, 3], out=tmp_path, plot=False)
    assert report.n_train_pairs > tiny_llama.d_model and not report.notes
    last = tiny_llama.n_layers - 1
    for layer in (1, 2, 3):
        path = tmp_path / "affine" / f"layer_{layer:02d}.safetensors"
        mapping = AffineMapping.load(path)
        assert mapping.name == f"tiny-llama:affine_l{layer}_to_l{last}"
        assert tuple(mapping.weight.shape) == (tiny_llama.d_model, tiny_llama.d_model)
        # The affine lens as a Patchscope: LOGIT_LENS (T = S, l* = L-1) with the loaded map as f.
        probes = [scope.probe(s.text, LOGIT_LENS, layer=layer, mapping=mapping, max_new_tokens=1) for s in report.prompts]
        firsts = [r.tokens[0] if r.tokens else -1 for r in scope.run(probes)]
        assert firsts == report.tops["affine"][layer]
    # The map from the last layer to itself is the identity.
    identity = AffineMapping.load(tmp_path / "affine" / f"layer_{last:02d}.safetensors")
    assert torch.allclose(identity.weight, torch.eye(tiny_llama.d_model), atol=1e-3)
    assert report.row(last).affine == report.row(last).logit_lens == report.row(last).token_identity == 1.0


def test_plot_needs_matplotlib_and_says_how_to_get_it(tmp_path, monkeypatch, tiny_llama):
    report = evaluate_nexttoken(Patchscope(tiny_llama), PARAGRAPHS, n=2, n_train=0, layers=[0, 3])
    if importlib.util.find_spec("matplotlib") is not None:
        path = plot_nexttoken(report, tmp_path / "fig.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install 'pytest-patchscope\[plot\]'"):
        plot_nexttoken(report, tmp_path / "fig2.png")
    # The tables do not need it: write_outputs notes the missing figure and writes the rest.
    files = write_outputs(report, tmp_path / "out")
    assert "png" not in files and "No figure" in report.notes[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nexttoken.csv", "nexttoken.json", "nexttoken.md", "samples.jsonl"]


# ---- the CLI, end to end on a tiny checkpoint and corpus ------------------------------------------
def test_cli_runs_end_to_end(tmp_path, tiny_llama_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS))
    out = tmp_path / "out"
    common = ["nexttoken", "--model", str(tiny_llama_dir), "--text", str(corpus), "--n", "5", "--n-train", "16",
              "--layers", "0-3", "--seed", "3"]
    assert main(common + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n=5 (seed 3)" in printed and "P@1 token_identity" in printed
    written = {"nexttoken.csv", "nexttoken.md", "nexttoken.json", "samples.jsonl", "affine"}
    if importlib.util.find_spec("matplotlib") is not None:
        written.add("nexttoken.png")
    assert {p.name for p in out.iterdir()} == written
    rows = (out / "nexttoken.csv").read_text().splitlines()
    assert rows[0].startswith("layer,p1_token_identity,p1_logit_lens,p1_affine,surprisal_token_identity") and len(rows) == 5
    data = json.loads((out / "nexttoken.json").read_text())
    assert (data["n"], data["n_train"], data["seed"], data["corpus"]) == (5, 16, 3, "corpus.txt")
    assert [row["layer"] for row in data["layers"]] == [0, 1, 2, 3]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5
    assert sorted(p.name for p in (out / "affine").iterdir()) == [f"layer_{l:02d}.safetensors" for l in range(4)]
    assert "| layer | P@1 Token identity (Patchscope) |" in (out / "nexttoken.md").read_text()
    # Same seed, same numbers.
    assert main(common + ["--out", str(tmp_path / "again"), "--no-plot"]) == 0
    assert (tmp_path / "again" / "nexttoken.csv").read_text() == (out / "nexttoken.csv").read_text()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, tiny_llama_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(PARAGRAPHS))
    assert main(["nexttoken", "--model", str(tiny_llama_dir), "--text", str(corpus), "--layers", "7", "--out", str(tmp_path)]) == 2
    assert "layers='7' is not valid" in capsys.readouterr().err
    assert main(["nexttoken", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_and_console_script_entry_points():
    done = subprocess.run([sys.executable, "-m", "pytest_patchscope.eval", "nexttoken", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--n-train" in done.stdout and "--text" in done.stdout


# ---- the real default model against plain HF hooks ------------------------------------------------
LAYERS = (0, 9, 18, 27, 29)


@pytest.fixture(scope="module")
def small_report(default_scope) -> NextTokenReport:
    return evaluate_nexttoken(default_scope, n=4, n_train=0, layers=LAYERS, seed=11)


def test_last_layer_state_is_pre_norm_on_the_default_model(default_scope, plain_hf):
    model = default_scope.model
    last = model.n_layers - 1
    assert last == 29
    ids = model.tokenize("The capital of France is")
    captured = Engine(model).capture(ids, len(ids) - 1, [last])[last]
    with torch.no_grad():
        post_norm = plain_hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        pre_norm = ref.source_state(plain_hf, ids, len(ids) - 1, last)
        assert torch.allclose(post_norm, plain_hf.model.norm(pre_norm), atol=1e-3)
    assert torch.allclose(captured, pre_norm, atol=1e-3)
    assert not torch.allclose(captured, post_norm, atol=1e-1)


def test_token_identity_at_the_last_layer_matches_the_reference(default_scope, plain_hf, small_report):
    model = default_scope.model
    last = model.n_layers - 1
    target = list(model.tokenize(TOKEN_IDENTITY.target))
    for k, sample in enumerate(small_report.prompts):
        vector = ref.source_state(plain_hf, list(sample.ids), sample.position, last)
        expected = ref.patched_generate(plain_hf, target, len(target) - 1, last, vector, 1, eos=min(model.eos_token_ids))
        assert small_report.tops["token_identity"][last][k] == expected[0]
        # Patching the pre-norm state at the last layer reproduces the model's own prediction.
        assert expected[0] == small_report.predictions[k]
    assert small_report.row(last).token_identity == small_report.row(last).logit_lens == 1.0


def test_token_identity_prediction_equals_plain_hf_hooks(default_scope, plain_hf, small_report):
    """Eval's token identity (the batched engine) = a patched forward of T with h_l written at i*, l* = l."""
    target = list(default_scope.model.tokenize(TOKEN_IDENTITY.target))
    with torch.no_grad():
        clean = int(plain_hf(torch.tensor([target])).logits[0, -1].argmax())
    changed = 0
    for k, sample in enumerate(small_report.prompts):
        with torch.no_grad():
            assert small_report.predictions[k] == int(plain_hf(torch.tensor([list(sample.ids)])).logits[0, -1].argmax())
        for layer in LAYERS:
            vector = ref.source_state(plain_hf, list(sample.ids), sample.position, layer)
            logits = ref.patched_next_token_logits(plain_hf, target, len(target) - 1, layer, vector)
            assert small_report.tops["token_identity"][layer][k] == int(logits.argmax()), (sample.text, layer)
            changed += int(logits.argmax()) != clean
    assert changed >= len(LAYERS), "the patch should usually change the next token, else this proves little"


def test_logit_lens_equals_plain_hf_norm_and_lm_head(default_scope, plain_hf, small_report):
    for layer in LAYERS:
        logps = []
        for k, sample in enumerate(small_report.prompts):
            with torch.no_grad():
                state = ref.source_state(plain_hf, list(sample.ids), sample.position, layer)
                logprobs = torch.log_softmax(plain_hf.lm_head(plain_hf.model.norm(state)), -1)
            assert small_report.tops["logit_lens"][layer][k] == int(logprobs.argmax())
            logps.append(float(logprobs[small_report.predictions[k]]))
        assert small_report.row(layer).logit_lens_surprisal == pytest.approx(-sum(logps) / len(logps), abs=1e-3)
    # The logit lens is also a Patchscope (T = S, l* = L-1): the engine's first token agrees.
    probes = [default_scope.probe(s.text, LOGIT_LENS, layer=layer, max_new_tokens=1) for s in small_report.prompts for layer in LAYERS]
    results = default_scope.run(probes)
    assert [r.tokens[0] for r in results] == [small_report.tops["logit_lens"][l][k] for k in range(4) for l in LAYERS]
