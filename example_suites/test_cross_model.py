"""A source from another checkpoint (the paper's M != M*): which model lost the fact?

The "new checkpoint" is ci_gate/damage_checkpoint.py's: the default model with a ROME-style
rank-one edit of its layer-0 MLP that rewrites " France" (in "Country: France"). Probed on the
default model before it was written down (attribute extraction into "The capital city of x is",
layers 0-10, 5 new tokens):

- the release reads the damaged checkpoint's "Country: France" as Paris at no layer, while the
  damaged checkpoint's Japan and Italy still read as Tokyo and Rome at every layer 0-10;
- the damaged checkpoint reads the *release's* France as Paris at every layer 0-10, but not its own.

So the damage sits in how the new checkpoint represents France, not in how it reads a
representation out: the question CI asks is "does the new checkpoint still read the old
checkpoint's representation of this fact?", and here it does.
"""
import importlib.util
from pathlib import Path

import pytest

from pytest_patchscope import Patchscope, assert_localized, attribute_extraction

CAPITAL_CITY = attribute_extraction("The capital city of x is")
LAYERS = range(0, 11)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The damaged checkpoint, written once for this module (about a minute on 2 CPU cores)."""
    spec = importlib.util.spec_from_file_location("damage_checkpoint", Path(__file__).parent / "ci_gate" / "damage_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = tmp_path_factory.mktemp("checkpoint") / "damaged"
    module.main([str(directory)])
    return directory


def test_the_release_no_longer_reads_paris_from_the_damaged_france(patchscope, damaged):
    profile = patchscope.sweep("Country: France", CAPITAL_CITY, layers=LAYERS, expect="Paris", max_new_tokens=5, source_model=damaged)
    assert profile.probe["source_model"].startswith("damaged")
    assert profile.hit_layers == [], profile.table()


@pytest.mark.parametrize("country,capital", [("Japan", "Tokyo"), ("Italy", "Rome")])
def test_other_countries_of_the_damaged_checkpoint_still_read_right(patchscope, damaged, country, capital):
    profile = patchscope.sweep(f"Country: {country}", CAPITAL_CITY, layers=LAYERS, expect=capital, max_new_tokens=5, source_model=damaged)
    assert_localized(profile, layers=LAYERS, min_hits=len(LAYERS))


def test_the_damaged_checkpoint_still_reads_the_releases_france(patchscope, damaged):
    new = Patchscope(patchscope.model_for(damaged))
    read_release = new.sweep("Country: France", CAPITAL_CITY, layers=LAYERS, expect="Paris", max_new_tokens=5, source_model=patchscope.model)
    read_own = new.sweep("Country: France", CAPITAL_CITY, layers=LAYERS, expect="Paris", max_new_tokens=5)
    assert_localized(read_release, layers=LAYERS, min_hits=len(LAYERS))
    assert read_own.hit_layers == [], read_own.table()
