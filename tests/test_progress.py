"""Progress people can see: the engine's reports in probes, the tqdm bar, the "auto" rule, the log
lines, and the bar inside a pytest session (through pytester)."""
from __future__ import annotations

import contextlib
import io
import re
import sys

import pytest

import pytest_patchscope.progress as progress_module
from pytest_patchscope import TOKEN_IDENTITY, Patchscope
from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.progress import ProgressBar, ProgressLog, TerminalBar, progress_label, resolve_progress

pytest_plugins = ["pytester"]

CHUNKED_MB = 1.5
"""One tiny-llama row is about 0.7 MB (its float32 logits over a 49k vocabulary): two rows a chunk."""
GRID = dict(layers=range(4), target_layers=range(4), max_new_tokens=3)  # 16 probes + 1 clean row


class FakeTerminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_chunked_sweep_reports_probes_within_each_chunk(tiny_llama):
    seen: list[tuple[float, int]] = []
    scope = Patchscope(tiny_llama, batch_memory_mb=CHUNKED_MB, progress=lambda done, total: seen.append((done, total)))
    scope.sweep("Tokyo", TOKEN_IDENTITY, **GRID)
    done = [d for d, _ in seen]
    assert {t for _, t in seen} == {16}, "total counts probes (the clean row is not one)"
    assert done[0] == 0 and done[-1] == 16
    assert done == sorted(done), "progress never goes back"
    assert any(d != int(d) for d in done), "fractional reports inside a chunk (after the opening pass and each step)"
    chunk_ends = sorted({d for d in done if d == int(d) and 0 < d < 16})
    assert len(chunk_ends) >= 3, f"several chunks at {CHUNKED_MB} MB: {chunk_ends}"
    # within each chunk (between two whole numbers) there are several reports: one per decoding step
    inside = [d for d in done if 0 < d < chunk_ends[0]]
    assert len(inside) >= 2, seen


def test_the_opening_pass_reports_every_layer(tiny_llama):
    """A long opening pass (a big grid) moves the bar too: one report per layer before the first step."""
    seen: list[float] = []
    scope = Patchscope(tiny_llama, progress=lambda done, total: seen.append(done))
    scope.sweep("Tokyo", TOKEN_IDENTITY, layers=range(4), max_new_tokens=3)  # one chunk, 4 probes
    opening = [d for d in seen if 0 < d <= 4 / 4]  # the opening pass is the first of 1 + 3 steps
    assert len(opening) == tiny_llama.n_layers, seen
    assert opening == sorted(opening) and opening[-1] == pytest.approx(1.0)


def test_bar_shows_probes_rate_and_reaches_100_percent(tiny_llama, capsys):
    scope = Patchscope(tiny_llama, batch_memory_mb=CHUNKED_MB, progress=True)
    scope.sweep("Tokyo", TOKEN_IDENTITY, **GRID)
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\r")[-1]
    assert last.startswith("patchscope: 100%|") and "16/16" in last, repr(last)
    assert re.search(r"\d+\.\d\dprobe/s|s/probe", last), repr(last)  # a rate, in probes
    assert "<00:00" in last, "time left"
    assert err.endswith("\n") and err.count("\n") == 1, "one bar for one job, its last line kept"


def test_one_bar_per_job_and_a_label():
    out = io.StringIO()
    bar = ProgressBar(out, ncols=80, mininterval=0)
    with progress_label("token identity"):
        for done in (0, 1.5, 3.25, 4):
            bar(done, 4)
    for done in (0, 2, 2):
        bar(done, 2)  # a second job, which ends twice: nothing more after its end
    lines = out.getvalue().split("\n")
    assert len(lines) == 3 and lines[-1] == ""
    assert lines[0].split("\r")[-1].startswith("token identity: 100%|") and "4/4" in lines[0]
    assert lines[1].split("\r")[-1].startswith("patchscope: 100%|") and "2/2" in lines[1]
    assert " 3/4 " in lines[0] or " 2/4 " in lines[0], "fractional progress drawn as whole probes"


def test_a_job_cut_short_by_an_error_does_not_hide_the_next_bar():
    out, lines = io.StringIO(), []
    bar, log = ProgressBar(out, ncols=80, mininterval=0), ProgressLog(lines.append)
    for callback in (bar, log):
        for done in (0, 1, 0, 1, 2, 2):  # the first job stops at 1 of 2; the second runs to its end
            callback(done, 2)
    bars = out.getvalue().split("\n")
    assert len(bars) == 3 and bars[0].split("\r")[-1].startswith("patchscope:  50%|"), "the first stays where it stopped"
    assert bars[1].split("\r")[-1].startswith("patchscope: 100%|") and "2/2" in bars[1]
    assert [line.split(" after ")[0].split(" in ")[0] for line in lines] == [
        "patchscope: 2 probes to run", "patchscope: 1/2 probes (50%)",
        "patchscope: 2 probes to run", "patchscope: 1/2 probes (50%)", "patchscope: 2/2 probes (100%)",
    ]


def test_a_one_probe_job_draws_no_bar(tiny_llama, capsys):
    scope = Patchscope(tiny_llama, progress=True)
    scope.generate("Tokyo", TOKEN_IDENTITY, layer=1, max_new_tokens=2)
    assert capsys.readouterr().err == ""
    scope.run([scope.probe("Tokyo", TOKEN_IDENTITY, layer=layer, max_new_tokens=2) for layer in (1, 2)])
    assert "2/2" in capsys.readouterr().err


def test_an_empty_job_draws_nothing():
    out = io.StringIO()
    bar, lines = ProgressBar(out), []
    log = ProgressLog(lines.append)
    for callback in (bar, log):
        callback(0, 0)
        callback(0, 0)
    assert out.getvalue() == "" and lines == []


@pytest.mark.parametrize("value", ["loud", "on", "AUTO", "", 1, 0, 3.5, b"auto", [], {"a": 1}, object()])
def test_bad_progress_settings_are_named_errors(value, tiny_llama):
    with pytest.raises(ProbeConfigError) as info:
        resolve_progress(value)
    message = str(info.value)
    assert message.startswith("progress=") and "'auto' or None" in message and "True" in message and "callable" in message
    with pytest.raises(ProbeConfigError, match=r"^progress="):
        Patchscope(tiny_llama, progress=value)


def test_good_progress_settings(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)

    def mine(done: float, total: int) -> None:
        pass

    assert resolve_progress(mine) is mine
    assert resolve_progress(False) is None
    assert isinstance(resolve_progress(True), ProgressBar)
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert isinstance(resolve_progress("auto"), ProgressBar) and isinstance(resolve_progress(None), ProgressBar)


def test_auto_is_off_when_not_a_terminal_and_on_xdist_workers(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert resolve_progress("auto") is None, "stderr is not a terminal (a pipe, a CI log, pytest's capture)"
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert resolve_progress("auto") is None and resolve_progress(None) is None
    assert isinstance(resolve_progress(True), ProgressBar), "True still draws one"


def test_auto_is_the_default_of_the_python_api(tiny_llama, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert Patchscope(tiny_llama).progress is None, "under pytest stderr is captured: not a terminal"
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert isinstance(Patchscope(tiny_llama).progress, ProgressBar)


def test_log_lines_are_few_and_in_probes(tiny_llama):
    lines: list[str] = []
    scope = Patchscope(tiny_llama, batch_memory_mb=CHUNKED_MB, progress=ProgressLog(lines.append))
    scope.sweep("Tokyo", TOKEN_IDENTITY, **GRID)
    assert lines[0] == "patchscope: 16 probes to run"
    assert re.fullmatch(r"patchscope: 16/16 probes \(100%\) in [\d.]+ s, [\d.]+ probes/s", lines[-1]), lines
    assert 2 <= len(lines) <= 5, "start, each quarter, end"
    assert all(" probes " in line for line in lines[1:]) and not any("token" in line for line in lines)


def test_log_lines_every_n_seconds(monkeypatch):
    clock = iter([0.0, 1.0, 31.5, 32.0, 40.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    log = ProgressLog(lines.append, every_s=30.0)
    for done in (0, 1, 2, 3, 100):
        log(done, 100)
    assert lines == [
        "patchscope: 100 probes to run",
        "patchscope: 2/100 probes (2%) after 31.5 s",
        "patchscope: 100/100 probes (100%) in 40.0 s, 2.5 probes/s",
    ]


def test_terminal_bar_writes_through_the_capture_and_gives_the_line_back():
    """Inside pytest: the bar is drawn with capture suspended, on a line of its own under pytest's
    line ("tests/test_x.py ." here, 17 columns), erased at the end, and the cursor goes back there."""
    terminal, suspended = FakeTerminal(), []

    @contextlib.contextmanager
    def suspend():
        suspended.append(True)
        yield

    class Writer:
        width_of_current_line = 17
        fullwidth = 100

        def flush(self) -> None:
            pass

    bar = TerminalBar(terminal, suspend, lambda: Writer())
    bar.mininterval = 0  # draw every report
    for done in (0, 0.5, 1, 2):
        bar(done, 2)
    text = terminal.getvalue()
    assert text.startswith("\n") and "patchscope:" in text and "2/2" in text
    assert text.endswith("\r\x1b[1A\x1b[18G"), repr(text[-40:])
    assert len(suspended) >= 3, "every write goes through the suspended capture"


def test_forced_terminal_bar_into_a_pipe_keeps_its_last_line():
    pipe = io.StringIO()
    bar = TerminalBar(pipe, contextlib.nullcontext, lambda: None)
    for done in (0, 1, 2):
        bar(done, 2)
    text = pipe.getvalue()
    assert text.endswith("]\n") and "2/2 [" in text.split("\r")[-1] and "\x1b" not in text


# ---- inside a pytest session (pytester) ------------------------------------------------------------
SWEEP_TEST = """
def test_sweep(patchscope):
    patchscope.sweep("Tokyo", "cat -> cat; 135 -> 135; hello -> hello; ?", layers=range(4), target_layers=range(4), max_new_tokens=3)
"""


@pytest.fixture
def tiny_args(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the inner session is no worker, even when this one is
    return ["--patchscope-model", str(tiny_llama_dir), "--patchscope-batch-memory-mb", "2", "-p", "no:cacheprovider"]


def test_in_a_session_the_bar_is_off_when_not_a_terminal(pytester, tiny_args):
    pytester.makepyfile(SWEEP_TEST)
    result = pytester.runpytest(*tiny_args, "--log-level=INFO", "-rP", "-o", "log_cli=false")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "probe/s" not in out and "100%|" not in out, out
    # the INFO lines stay, captured with the test: a few per job, in probes
    result.stdout.fnmatch_lines(["*patchscope: 16 probes to run*", "*patchscope: 16/16 probes (100%) in * s, * probes/s*"])
    assert "generated tokens" not in out


def test_in_a_session_a_forced_bar_reaches_the_terminal_through_the_capture(pytester, tiny_args):
    pytester.makepyfile(SWEEP_TEST)
    result = pytester.runpytest(*tiny_args, "--patchscope-progress=on")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert re.search(r"patchscope: 100%\|[^\n]*\| 16/16 \[[^\n]*(probe/s|s/probe)\]", out), out


def test_in_a_session_the_ini_key_turns_it_off_and_bad_values_are_usage_errors(pytester, tiny_args):
    pytester.makepyfile(SWEEP_TEST)
    pytester.makeini("[pytest]\npatchscope_progress = off\n")
    result = pytester.runpytest(*tiny_args)
    result.assert_outcomes(passed=1)
    assert "probe/s" not in result.stdout.str()
    bad = pytester.runpytest(*tiny_args, "--patchscope-progress=loud")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--patchscope-progress='loud' is not valid: auto, on or off.*"])


# ---- patchscope-eval --------------------------------------------------------------------------------
def test_eval_cli_draws_the_bar_on_a_terminal_and_lines_with_no_progress(tmp_path, tiny_llama_dir, monkeypatch):
    from pytest_patchscope.eval import main

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(
        "The baker opens his shop before sunrise and sells bread, small cakes and coffee to the workers "
        f"who walk by on their way to the station number {k} at the edge of the town." for k in range(4)
    ))
    args = ["nexttoken", "--model", str(tiny_llama_dir), "--text", str(corpus), "--n", "3", "--n-train", "0",
            "--layers", "0-3", "--no-plot", "--out", str(tmp_path / "out")]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args) == 0
    drawn = terminal.getvalue()
    assert re.search(r"token identity: 100%\|[^\n]*\| 12/12 \[", drawn), drawn
    assert "probes (100%)" not in drawn, "the bar replaces the lines"
    piped = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", piped)
    assert main([*args, "--no-progress"]) == 0
    lines = piped.getvalue()
    assert "%|" not in lines and re.search(r"token identity: 12/12 probes \(100%\) in [\d.]+ s", lines), lines
