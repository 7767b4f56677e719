"""Entity description (paper §4.3): the few-shot "Syria: Country in the Middle East, ..." prompt
verbalises the entity that a hidden state stands for.

On SmolLM2-135M-Instruct the early layers (0-8) of a person's name describe them ("German
physicist" for Albert Einstein, "President" for Barack Obama).
"""
import pytest

from pytest_patchscope import ENTITY_DESCRIPTION, assert_generation_changed, assert_localized


@pytest.mark.parametrize("entity,word", [("Albert Einstein", "physicist"), ("Barack Obama", "President")])
def test_people_are_described(patchscope, entity, word):
    profile = patchscope.sweep(entity, ENTITY_DESCRIPTION, layers=range(0, 9, 2), expect=word, max_new_tokens=8)
    assert_localized(profile, layers=range(0, 9, 2), min_hits=4)


def test_description_differs_from_the_clean_prompt(patchscope):
    assert_generation_changed(patchscope.generate("Albert Einstein", ENTITY_DESCRIPTION, layer=2, max_new_tokens=8))
