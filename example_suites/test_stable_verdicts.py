"""Stable verdicts on the default model: candidate scores, seeded sampling, and the degeneration flag.

Scores are continuous, so they do not flip when a patched model rambles; every figure asserted
here was measured on SmolLM2-135M-Instruct (see docs/scoring.md).
"""
from pytest_patchscope import TOKEN_IDENTITY, Placeholder, assert_localized, assert_patched_prefers

CAPITALS = ["Paris", "London", "Rome"]


def test_france_into_x_prefers_paris_at_layer_1(patchscope):
    result = patchscope.score("France", "The capital city of x is", CAPITALS, layer=1, target_position=Placeholder("x"))
    assert_patched_prefers(result, "Paris", over=["London", "Rome"], margin=1.0)
    assert result.scores["Paris"].rank == 0
    assert result.clean_scores["Paris"].rank > 100  # the clean x knows nothing of France


def test_identity_scores_localize_paris_in_the_upper_layers(patchscope):
    profile = patchscope.sweep("The capital of France is", TOKEN_IDENTITY, layers=range(18, 30), candidates=CAPITALS, max_new_tokens=0)
    assert_localized(profile, layers=range(23, 30), min_hits=7)  # margin > 0 at every layer from 23
    assert not any(profile.cell(layer).hit for layer in range(18, 23))


def test_seeded_samples_say_paris_more_often_than_not(patchscope):
    result = patchscope.generate(
        "France", "The capital city of x is", layer=1, target_position=Placeholder("x"),
        do_sample=True, n_samples=8, seed=0, temperature=0.8, max_new_tokens=8,
    )
    assert result.hit_rate("Paris") >= 0.5
    assert result.hit_rate("Paris", clean=True) == 0.0
    again = patchscope.generate(
        "France", "The capital city of x is", layer=1, target_position=Placeholder("x"),
        do_sample=True, n_samples=8, seed=0, temperature=0.8, max_new_tokens=8,
    )
    assert [s.tokens for s in again.samples] == [s.tokens for s in result.samples]  # the same seed, the same samples
