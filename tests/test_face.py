"""The public face: typed signatures that mypy and editors see, one `decoding=` argument with its
shorthands, and misspelt keywords that name the closest real one."""
from __future__ import annotations

import inspect
import textwrap

import pytest

from pytest_patchscope import Decoding, Patchscope, PatchscopeFixture, ProbeConfigError

from conftest import active_hooks

TARGET = "The capital city of x is"


@pytest.mark.parametrize(
    ("call", "misspelt", "suggested"),
    [
        (lambda s: s.generate("France", TARGET, layer=1, target_postion=-1), "target_postion", "target_position"),
        (lambda s: s.sweep("France", TARGET, layer=1), "layer", "layers"),
        (lambda s: s.score("France", TARGET, ["Paris"], layer=1, temprature=0.5), "temprature", "temperature"),
        (lambda s: s.probe("France", TARGET, layer=1, max_new_token=3), "max_new_token", "max_new_tokens"),
    ],
)
def test_a_misspelt_keyword_names_the_closest_real_one(tiny_llama, call, misspelt, suggested):
    scope = Patchscope(tiny_llama, progress=False)
    with pytest.raises(ProbeConfigError) as info:
        call(scope)
    assert info.value.field == misspelt
    assert f"Did you mean {suggested}=" in str(info.value)
    assert active_hooks(tiny_llama) == []


def test_a_missing_layer_is_a_project_error_naming_the_call(tiny_llama):
    scope = Patchscope(tiny_llama, progress=False)
    with pytest.raises(ProbeConfigError, match=r"^layr=1 is not valid: not a keyword of generate\(\)\. Did you mean layer=1\?$"):
        scope.generate("France", TARGET, layr=1)  # type: ignore[call-arg]
    with pytest.raises(ProbeConfigError, match=r"generate\(\).*'layer'"):
        scope.generate("France", TARGET)  # type: ignore[call-arg]


def test_decoding_settings_are_one_argument_or_their_shorthands(tiny_llama):
    scope = Patchscope(tiny_llama, progress=False)
    settings = Decoding(do_sample=True, temperature=0.7, seed=3, n_samples=2)
    by_object = scope.generate("France", TARGET, layer=1, target_position=-1, max_new_tokens=4, decoding=settings)
    by_shorthand = scope.generate(
        "France", TARGET, layer=1, target_position=-1, max_new_tokens=4, do_sample=True, temperature=0.7, seed=3, n_samples=2
    )
    assert by_object.probe.decoding == by_shorthand.probe.decoding == settings
    assert [s.tokens for s in by_object.samples] == [s.tokens for s in by_shorthand.samples]
    with pytest.raises(ProbeConfigError, match=r"^temperature=0\.5 is not valid: not given together with decoding="):
        scope.generate("France", TARGET, layer=1, target_position=-1, decoding=settings, temperature=0.5)


def test_the_fixture_methods_have_the_patchscope_signatures():
    for name in ("probe", "generate", "score", "sweep", "run", "check_all"):
        fixture_method = inspect.signature(getattr(PatchscopeFixture, name))
        scope_method = inspect.signature(getattr(Patchscope, name))
        assert fixture_method == scope_method, name
    assert "layer" in inspect.signature(PatchscopeFixture.generate).parameters


def test_mypy_sees_the_typed_face(tmp_path):
    """mypy on a user's test file: the root imports are typed, an unknown keyword is a type error,
    and score() is a PatchResult."""
    api = pytest.importorskip("mypy.api")
    user = tmp_path / "test_user.py"
    user.write_text(textwrap.dedent('''
        from pytest_patchscope import Decoding, PatchscopeFixture, Patchscope

        def test_probe(patchscope: PatchscopeFixture) -> None:
            result = patchscope.score("France", "The capital city of x is", ["Paris"], layer=1)
            reveal_type(result)
            patchscope.generate("France", "The capital city of x is", layer=1, layr=3)
            patchscope.generate("France", "T x", layer=1, decoding=Decoding(do_sample=True))
            reveal_type(Patchscope.load)
    '''))
    config = tmp_path / "mypy.ini"  # the package is followed; the heavy libraries behind it are not (seconds, not minutes)
    config.write_text("[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
                      "[mypy-torch.*,transformers.*,transformer_lens.*,hypothesis.*,numpy.*,safetensors.*,tqdm.*,pytest_html.*]\n"
                      "follow_imports = skip\n")
    out, err, status = api.run([str(user), "--config-file", str(config), "--cache-dir", str(tmp_path / "cache")])
    assert 'Revealed type is "pytest_patchscope.engine.results.PatchResult"' in out, out + err
    assert 'Unexpected keyword argument "layr"' in out, out
    assert out.count("error:") == 1, out  # only the misspelt keyword
    assert "def (model: " in out and "-> pytest_patchscope.scope.Patchscope" in out, out
