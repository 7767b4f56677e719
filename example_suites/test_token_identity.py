"""Token identity (paper §3.2): the last hidden state of a factual prompt decodes the answer.

On SmolLM2-135M-Instruct, "The capital of France is" decodes " Paris" in the identity prompt
`cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?` from layer 23 up to the last layer (29), and the
subject token " France" decodes itself at early layers (0-14). Lower layers of the last position
say something else (" London" at 21-22, code-like text below): that is the localization the
sweep shows.
"""
import pytest

from pytest_patchscope import (
    TOKEN_IDENTITY,
    Substring,
    assert_generation_changed,
    assert_localized,
    assert_patched_generation_contains,
)

CAPITALS = [
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"),
    ("The capital of Germany is", "Berlin"),
    ("The Eiffel Tower is in", "Paris"),
]


def test_france_decodes_paris_at_a_late_layer(patchscope):
    result = patchscope.generate("The capital of France is", TOKEN_IDENTITY, layer=27)
    assert_patched_generation_contains(result, "Paris")
    assert_generation_changed(result)


@pytest.mark.parametrize("source,answer", CAPITALS)
def test_answer_is_decodable_in_the_upper_layers(patchscope, source, answer):
    profile = patchscope.sweep(source, TOKEN_IDENTITY, layers=range(18, 30), expect=answer, max_new_tokens=6)
    assert_localized(profile, layers=range(24, 29), min_hits=5)
    assert profile.first_hit is not None and profile.first_hit >= 21


def test_the_subject_token_decodes_itself_early(patchscope):
    profile = patchscope.sweep(
        "The capital of France is", TOKEN_IDENTITY, layers=range(0, 11, 2),
        source_position=Substring("France"), expect="France", max_new_tokens=6,
    )
    assert_localized(profile, layers=range(0, 11, 2), min_hits=6)
