"""Candidate scoring and controlled generation, against the plain-HF reference (tests/hf_reference.py).

Scores are compared with one cache-free forward of target + candidate with the same patch; samples
with HF `generate(do_sample=True)` after `torch.manual_seed(seed + k)`, using HF's own processors.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pytest_patchscope import TOKEN_IDENTITY, Patchscope, Placeholder, ProbeConfigError, assert_patched_prefers
from pytest_patchscope.baseline.comparator import Tolerances, compare_profiles
from pytest_patchscope.baseline.profile import LayerCell, LocalizationProfile
from pytest_patchscope.baseline.serializer import BaselineFile, Entry, deserialize_entry, serialize_entry
from pytest_patchscope.engine.decode import banned_ngram_tokens, degeneration

from conftest import active_hooks, expected_samples, expected_scores

CAPITALS = ["Paris", "London", "Rome"]
TOLERANCE = 1e-4


def assert_scores_match(result, reference) -> None:
    patched, clean = expected_scores(reference, result)
    for candidate in result.probe.candidates:
        ours, theirs = result.scores[candidate], patched[candidate]
        assert ours.logprobs == pytest.approx(theirs[0], abs=TOLERANCE), candidate
        assert theirs[1][0] <= ours.rank <= theirs[1][1], candidate
        ours, theirs = result.clean_scores[candidate], clean[candidate]
        assert ours.logprobs == pytest.approx(theirs[0], abs=TOLERANCE), candidate
        assert theirs[1][0] <= ours.rank <= theirs[1][1], candidate


# ---- the default model --------------------------------------------------------------------------
def test_france_prefers_paris_at_layer_1_and_scores_match_plain_hf(default_scope, plain_hf):
    result = default_scope.score("France", "The capital city of x is", CAPITALS, layer=1, target_position=Placeholder("x"))
    assert_scores_match(result, plain_hf)
    assert_patched_prefers(result, "Paris", over=["London", "Rome"], margin=1.0)
    assert result.scores["Paris"].rank == 0  # the patched model's greedy choice
    assert result.clean_scores["Paris"].rank > 100  # the clean "x" says nothing about France
    assert result.text == "" and result.tokens == ()  # max_new_tokens=0: scored, not generated
    with pytest.raises(AssertionError) as failure:
        assert_patched_prefers(result, "London", over=["Paris"])
    message = str(failure.value)
    assert "does not prefer 'London' over ['Paris']" in message
    for candidate in CAPITALS:  # every candidate, patched and clean
        score, clean = result.scores[candidate], result.clean_scores[candidate]
        assert f"{score.logprob:9.3f} ({score.mean_logprob:.3f}, {score.rank})" in message
        assert f"{clean.logprob:9.3f} ({clean.mean_logprob:.3f}, {clean.rank})" in message
    assert "as code:  Probe(" in message


def test_identity_sweep_with_candidates_equals_single_scores(default_scope, plain_hf):
    candidates = ["Paris", "London", "Rio de Janeiro"]
    layers = [3, 24, 27]
    profile = default_scope.sweep("The capital of France is", TOKEN_IDENTITY, layers=layers, candidates=candidates, max_new_tokens=0)
    assert profile.expect == "Paris" and profile.candidates == tuple(candidates)
    for layer in layers:
        single = default_scope.score("The capital of France is", TOKEN_IDENTITY, candidates, layer=layer)
        assert_scores_match(single, plain_hf)
        cell = profile.cell(layer)
        best_other = max(single.scores[c].logprob for c in candidates[1:])
        assert cell.margin == pytest.approx(single.scores["Paris"].logprob - best_other, abs=TOLERANCE)
        assert cell.hit is (cell.margin > 0)
        assert cell.candidate_logprobs == pytest.approx({c: s.logprob for c, s in single.scores.items()}, abs=TOLERANCE)
    assert profile.cell(27).hit and not profile.cell(3).hit  # the identity prompt decodes Paris high up only


def test_sampling_on_the_default_model_matches_hf_generate(default_scope, plain_hf):
    result = default_scope.generate(
        "The capital of France is", "The capital city of x is", layer=3, target_position=-1, max_new_tokens=10,
        do_sample=True, n_samples=3, seed=11, temperature=0.9, top_p=0.95, top_k=50,
    )
    patched, clean = expected_samples(plain_hf, result)
    assert [list(s.tokens) for s in result.samples] == patched
    assert [list(s.tokens) for s in result.clean_samples] == clean
    assert len({s.tokens for s in result.samples}) > 1  # the samples differ from one another
    assert result.text == result.samples[0].text


def test_repetition_controls_on_the_default_model_match_hf_generate(default_scope, plain_hf):
    result = default_scope.generate(
        "The capital of France is", "The capital city of x is", layer=3, target_position=-1, max_new_tokens=16,
        repetition_penalty=1.3, no_repeat_ngram_size=2,
    )
    patched, clean = expected_samples(plain_hf, result)
    assert [list(result.tokens)] == patched and [list(result.clean_tokens)] == clean
    plain = default_scope.generate("The capital of France is", "The capital city of x is", layer=3, target_position=-1, max_new_tokens=16)
    assert plain.tokens != result.tokens  # the controls changed the text


# ---- tiny models: batching, sharing, reference --------------------------------------------------
def test_batched_scores_equal_single_and_the_reference(tiny_model):
    scope = Patchscope(tiny_model)
    candidates = ["Paris", "Paris is", "London Bridge", "Rome"]  # shared first tokens, several lengths
    probes = [
        scope.probe("The capital of France is", "The capital city of x is", layer=layer, target_position=Placeholder("x"),
                    candidates=candidates[: 2 + layer % 3], max_new_tokens=3, strength=0.5 + 0.25 * layer)
        for layer in range(tiny_model.n_layers)
    ] + [scope.probe("Tokyo", "x is a city in", layer=1, target_position=0, candidates=["Japan", "France"], max_new_tokens=0)]
    batched = scope.run(probes)
    for probe, result in zip(probes, batched):
        alone = scope.run([probe])[0]
        assert list(result.scores) == list(alone.scores)
        for candidate, score in result.scores.items():
            assert score.logprobs == pytest.approx(alone.scores[candidate].logprobs, abs=1e-5)
        assert result.tokens == alone.tokens
        assert_scores_match(result, tiny_model.hf)
    assert active_hooks(tiny_model) == []


def test_candidates_reuse_the_patched_prompt_pass(tiny_llama):
    """Scoring feeds only each candidate's tokens after the first: the prompt runs once however many candidates."""
    scope = Patchscope(tiny_llama)
    seen: list[int] = []
    layer0 = tiny_llama.plain.model.layers[0]

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(int(hidden.shape[:2].numel()))

    handle = layer0.register_forward_pre_hook(count, with_kwargs=True)

    def tokens_through_layer0(candidates):
        seen.clear()
        scope.score("The capital of France is", "The capital city of x is", candidates, layer=1, target_position=Placeholder("x"))
        return sum(seen), len(seen)

    try:
        one = tokens_through_layer0(["Paris"])
        five = tokens_through_layer0(["Paris", "London", "Rome", "Berlin", "Madrid"])
        longer = tokens_through_layer0(["Paris", "New York City"])
    finally:
        handle.remove()
    assert five == one  # single-token candidates: nothing runs past the opening pass
    assert one[1] == 1  # one pass, the prompt's
    ids = scope.model.tokenize("The capital city of x is New York City")
    extra = len(ids) - len(scope.model.tokenize("The capital city of x is")) - 1
    # the multi-token candidate runs its remaining tokens once per stream (patched and clean), one step each
    assert longer[1] == 1 + extra and longer[0] > one[0]


def test_batched_samples_equal_alone_and_hf_generate(tiny_model):
    scope = Patchscope(tiny_model)
    settings = [
        dict(do_sample=True, n_samples=3, seed=3),
        dict(do_sample=True, n_samples=2, seed=7, temperature=0.7, top_k=20),
        dict(do_sample=True, seed=1, top_p=0.8, repetition_penalty=1.2),
        dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
    ]
    probes = [
        scope.probe("The capital of France is", "The capital city of x is", layer=k % tiny_model.n_layers,
                    target_position=Placeholder("x"), max_new_tokens=8, **kwargs)
        for k, kwargs in enumerate(settings)
    ]
    batched = scope.run(probes)
    for probe, result in zip(probes, batched):
        alone = scope.run([probe])[0]
        assert [s.tokens for s in result.samples] == [s.tokens for s in alone.samples]
        assert [s.tokens for s in result.clean_samples] == [s.tokens for s in alone.clean_samples]
        patched, clean = expected_samples(tiny_model.hf, result)
        assert [list(s.tokens) for s in result.samples] == patched
        assert [list(s.tokens) for s in result.clean_samples] == clean
        assert len(result.samples) == probe.decoding.n_samples


def test_greedy_results_are_unchanged_by_other_rows_sampling(tiny_llama):
    scope = Patchscope(tiny_llama)
    greedy = scope.probe("The capital of France is", "The capital city of x is", layer=1, target_position=-1, max_new_tokens=8)
    sampled = scope.probe("The capital of France is", "The capital city of x is", layer=1, target_position=-1, max_new_tokens=8,
                          do_sample=True, n_samples=4, candidates=["Paris"])
    alone = scope.run([greedy])[0]
    together = scope.run([sampled, greedy])[1]
    assert together.tokens == alone.tokens and together.clean_tokens == alone.clean_tokens
    assert alone.samples[0].tokens == alone.tokens and alone.hit_rate(alone.text) == 1.0


def test_hit_rate_counts_samples():
    from pytest_patchscope.engine.results import PatchResult, Sample

    result = PatchResult(
        probe=None, resolved=None, text="Paris", clean_text="x", tokens=(1,), clean_tokens=(2,),  # type: ignore[arg-type]
        samples=(Sample(" Paris.", (1,)), Sample(" paris", (2,)), Sample(" London", (3,)), Sample(" Rome", (4,))),
        clean_samples=(Sample(" Paris", (1,)), Sample(" no", (2,))),
    )
    assert result.hit_rate("Paris") == 0.5
    assert result.hit_rate("Paris", case_sensitive=True) == 0.25
    assert result.hit_rate("paris", clean=True) == 0.5
    with pytest.raises(ProbeConfigError, match="expected"):
        result.hit_rate("")


# ---- degeneration ---------------------------------------------------------------------------------
def test_degeneration_flags_repeats_but_not_ordinary_text(tokenizer):
    def flag(text):
        return degeneration(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.decode)

    assert flag(" Paris -> Paris") is None
    assert flag(" The capital of France is Paris, a city on the Seine.") is None
    assert "repeats 4 times in a row" in flag(" the the the the the")
    assert "occurs 3 times" in flag(" London, London, London, London")
    assert "occurs 3 times" in flag(" I think so. I think so. I think so.")
    assert flag("\n\n\n\n\n") is None  # whitespace runs are layout, not rambling


def test_degenerate_text_is_flagged_in_results_and_messages(default_scope):
    profile = default_scope.sweep("The capital of France is", TOKEN_IDENTITY, layers=range(0, 30, 2), expect="Paris", max_new_tokens=24, stop=())
    flagged = [c for c in profile.cells if c.degenerate]
    assert flagged, profile.table()  # the identity prompt makes the model repeat "x -> x" lines
    assert all(degeneration(default_scope.model.tokenize(c.text), default_scope.model.decode) for c in flagged)
    assert "(degenerate)" in profile.table(max_text=200)
    result = default_scope.generate("The capital of France is", TOKEN_IDENTITY, layer=flagged[0].layer, max_new_tokens=24, stop=())
    assert result.degenerate == flagged[0].degenerate
    with pytest.raises(AssertionError, match=r"\[degenerate: "):
        from pytest_patchscope import assert_patched_generation_contains

        assert_patched_generation_contains(result, "no such text")


def test_banned_ngrams_follow_hf():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 1], 2) == [2]
    assert banned_ngram_tokens([5, 6, 5], 1) == [5, 6]
    assert banned_ngram_tokens([1], 3) == []


# ---- the gate over margins -------------------------------------------------------------------------
def _profile(margins):
    cells = tuple(
        LayerCell(layer=k, target_layer=k, text="", hit=m > 0, logprob=-1.0, rank=0, margin=m,
                  candidate_logprobs={"Paris": -1.0, "London": -1.0 - m})
        for k, m in enumerate(margins)
    )
    return LocalizationProfile(probe={"source": "s"}, cells=cells, expect="Paris", candidates=("Paris", "London"))


def test_gate_compares_margins_with_max_margin_drop():
    baseline = _profile([2.0, 1.5, -3.0])
    steady = compare_profiles(baseline, _profile([1.6, 1.2, -9.0]))
    assert steady.status == "unchanged" and steady.margin_drop == pytest.approx(0.4)  # the -3 cell is not compared
    dropped = compare_profiles(baseline, _profile([0.5, 1.4, -3.0]))
    assert dropped.status == "regressed"
    assert any("margin of 'Paris'" in r and "layer 0 from 2.00 to 0.50" in r for r in dropped.reasons), dropped.reasons
    assert compare_profiles(baseline, _profile([0.5, 1.4, -3.0]), Tolerances(max_margin_drop=2.0)).status == "unchanged"


def test_margins_and_candidates_survive_the_baseline_file():
    profile = _profile([2.0, -0.5])
    header = BaselineFile(Path("b.json"), model="m", weights_hash="h")
    entry = deserialize_entry("entry", serialize_entry(Entry(profile, "t.py::test")), header)
    assert entry.profile.candidates == profile.candidates
    assert [c.margin for c in entry.profile.cells] == [2.0, -0.5]
    assert entry.profile.cells[1].candidate_logprobs == {"Paris": -1.0, "London": -0.5}


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(candidates=[]), "candidates", "non-empty"),
        (dict(candidates=["Paris", "Paris"]), "candidates", "more than once"),
        (dict(candidates=["Paris", " Paris"]), "candidates", "both scored as the tokens"),
        (dict(candidates=["<|endoftext|>"]), "candidates", "tokenizes to nothing"),
        (dict(candidates=["  "]), "candidates", "non-space"),
        (dict(candidates="Paris"), "candidates", "candidates=[...]"),
        (dict(candidates=[3]), "candidates", "3 is not"),
        (dict(n_samples=0, do_sample=True), "n_samples", "from 1"),
        (dict(n_samples=2), "n_samples", "do_sample=True"),
        (dict(do_sample=True, temperature=0), "temperature", "> 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature", "> 0"),
        (dict(do_sample=True, temperature=10**400), "temperature", "> 0"),
        (dict(repetition_penalty=10**400), "repetition_penalty", "> 0"),
        (dict(do_sample=True, top_p=0), "top_p", "(0, 1]"),
        (dict(do_sample=True, top_p=1.5), "top_p", "(0, 1]"),
        (dict(do_sample=True, top_k=0), "top_k", ">= 1"),
        (dict(do_sample=True, seed=-1), "seed", "from 0"),
        (dict(top_p=0.5), "top_p", "greedy"),
        (dict(repetition_penalty=0), "repetition_penalty", "> 0"),
        (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size", ">= 0"),
        (dict(max_new_tokens=0), "max_new_tokens", "needs candidates"),
    ],
)
def test_bad_scoring_and_sampling_input_is_refused_before_any_hook(tiny_llama, kwargs, field, words):
    scope = Patchscope(tiny_llama)
    with pytest.raises(ProbeConfigError) as error:
        if "candidates" in kwargs:
            scope.score("France", "The capital city of x is", kwargs.pop("candidates"), layer=1, target_position=-1, **kwargs)
        else:
            scope.generate("France", "The capital city of x is", layer=1, target_position=-1, **kwargs)
    assert error.value.field == field and words in str(error.value)
    assert active_hooks(tiny_llama) == []


def test_sweep_candidates_expect_must_be_a_candidate(tiny_llama):
    scope = Patchscope(tiny_llama)
    with pytest.raises(ProbeConfigError, match="one of the candidates"):
        scope.sweep("France", "The capital city of x is", layers=[0], candidates=["Paris", "Rome"], expect="Berlin", target_position=-1)
    with pytest.raises(ProbeConfigError, match="non-empty"):
        scope.sweep("France", "The capital city of x is", layers=[0], candidates=[], target_position=-1)
    assert torch.is_grad_enabled()


def test_bad_assertion_arguments_are_named_errors(tiny_llama):
    result = Patchscope(tiny_llama).score("France", "The capital city of x is", CAPITALS, layer=1, target_position=-1)
    with pytest.raises(ProbeConfigError, match="margin"):
        assert_patched_prefers(result, "Paris", margin="1")
    with pytest.raises(ProbeConfigError, match=r"over=\['London'\]"):
        assert_patched_prefers(result, "Paris", over="London")
    with pytest.raises(ProbeConfigError, match="add them to candidates"):
        assert_patched_prefers(result, "Berlin")


def test_logit_post_processing_is_applied_or_the_family_refused():
    """The opening pass's logits must be the family's own (scores, not just the greedy choice, depend on it)."""
    from types import SimpleNamespace

    from pytest_patchscope.errors import ModelLoadError
    from pytest_patchscope.model.backend import describe_architecture

    capped = describe_architecture(SimpleNamespace(model_type="vaultgemma", num_hidden_layers=2, final_logit_softcapping=30.0))
    assert capped.logit_softcap == 30.0
    logits = torch.tensor([[10.0, -50.0, 90.0]])
    assert torch.allclose(capped.final_logits(logits), 30.0 * torch.tanh(logits / 30.0))
    granite = describe_architecture(SimpleNamespace(model_type="granitemoeshared", num_hidden_layers=2, logits_scaling=4.0))
    assert granite.logit_scale == 0.25
    with pytest.raises(ModelLoadError, match="logits post-processed by {'logit_scale': 0.5}"):
        describe_architecture(SimpleNamespace(model_type="mystery", num_hidden_layers=2, logit_scale=0.5))
    assert describe_architecture(SimpleNamespace(model_type="mystery", num_hidden_layers=2, logit_scale=1.0)).logit_scale == 1.0
