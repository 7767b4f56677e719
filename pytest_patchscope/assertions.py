"""Assertions on patched generations and localization profiles, with pytest-style messages.

Each failure shows the probe (S, i, l -> T, i*, l*), the patched and the clean text, and what
was expected; the helper frames are hidden from tracebacks with __tracebackhide__.
"""
from __future__ import annotations

import re
from typing import Iterable

from .errors import ProbeConfigError
from .probe import finite_real
from .profile import LocalizationProfile
from .results import PatchResult, contains


def _text_line(text: str | None, degenerate: str | None, generated: bool) -> str:
    if not generated:
        return "(none generated: max_new_tokens=0 scores only)"
    return repr(text) + (f"  [degenerate: {degenerate}]" if degenerate else "")


def describe_scores(result: PatchResult) -> list[str]:
    """Every candidate's score after the patched and the clean target, one line each."""
    if not result.scores:
        return []
    width = max(len(repr(c)) for c in result.scores)
    lines = [f"  {'candidate':<{width}}  {'patched logprob (mean, rank)':<32}clean logprob (mean, rank)"]
    for candidate, score in sorted(result.scores.items(), key=lambda item: -item[1].logprob):
        clean = result.clean_scores.get(candidate) if result.clean_scores else None
        shown = "" if clean is None else f"{clean.logprob:9.3f} ({clean.mean_logprob:.3f}, {clean.rank})"
        lines.append(f"  {candidate!r:<{width}}  {f'{score.logprob:9.3f} ({score.mean_logprob:.3f}, {score.rank})':<32}{shown}")
    return lines


def describe_failure(result: PatchResult, expectation: str) -> str:
    """What failed, then the probe, its patched and clean text (flagged when degenerate), any
    candidate scores, and the probe as code (for @example)."""
    generated = result.probe.max_new_tokens > 0
    lines = [
        expectation,
        f"  probe:    {result.probe.describe()}",
        f"  patched:  {_text_line(result.text, result.degenerate, generated)}",
        f"  clean:    {_text_line(result.clean_text, result.clean_degenerate, generated)}",
    ]
    if len(result.samples) > 1:
        lines.append(f"  samples:  {[s.text for s in result.samples]!r}")
    lines += describe_scores(result)
    lines.append(f"  as code:  {result.probe!r}")
    return "\n".join(lines)


def assert_patched_generation_contains(result: PatchResult, expected: str, *, case_sensitive: bool = False) -> None:
    """The patched continuation contains `expected`."""
    __tracebackhide__ = True
    if not contains(result.text, expected, case_sensitive):
        how = "" if case_sensitive else " (case-insensitive)"
        raise AssertionError(describe_failure(result, f"patched generation does not contain {expected!r}{how}"))


def assert_patched_generation_not_contains(result: PatchResult, unexpected: str, *, case_sensitive: bool = False) -> None:
    """The patched continuation does not contain `unexpected` (a negative control)."""
    __tracebackhide__ = True
    if contains(result.text, unexpected, case_sensitive):
        how = "" if case_sensitive else " (case-insensitive)"
        raise AssertionError(describe_failure(result, f"patched generation contains {unexpected!r}{how}, which it must not"))


def assert_patched_generation_matches(result: PatchResult, pattern: str | re.Pattern[str], *, flags: int = 0) -> None:
    """The patched continuation matches the regular expression `pattern` (re.search)."""
    __tracebackhide__ = True
    if re.search(pattern, result.text, flags) is None:
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        raise AssertionError(describe_failure(result, f"patched generation does not match regex {shown!r}"))


def assert_generation_changed(result: PatchResult) -> None:
    """The patch changed the continuation: patched text differs from the clean one."""
    __tracebackhide__ = True
    if result.tokens == result.clean_tokens:
        raise AssertionError(describe_failure(result, "patched generation is identical to the clean generation"))


def assert_patched_prefers(result: PatchResult, expected: str, *, over: Iterable[str] | None = None, margin: float = 0.0) -> None:
    """After the patch, `expected` scores more than `margin` nats above each of `over` (default:
    every other candidate), by summed log-probability. The result must come from `score` (or a
    probe with candidates) that scored them all."""
    __tracebackhide__ = True
    if finite_real(margin) is None:
        raise ProbeConfigError("margin", margin, "a finite number of nats (0.0: strictly preferred)")
    if isinstance(over, (str, bytes)):
        raise ProbeConfigError("over", over, "None (every other candidate) or a list of candidates", f"Use over=[{over!r}] for one.")
    others = [c for c in result.scores if c != expected] if over is None else list(over)
    missing = [c for c in [expected, *others] if c not in result.scores]
    if missing:
        raise ProbeConfigError(
            "candidates", list(result.scores), f"a list that includes {missing}",
            "assert_patched_prefers compares scored candidates: add them to candidates=[...].",
        )
    if not others:
        raise ProbeConfigError("over", over, f"at least one candidate other than {expected!r}")
    best = max(others, key=lambda c: result.scores[c].logprob)
    gap = result.scores[expected].logprob - result.scores[best].logprob
    if not gap > margin:
        raise AssertionError(
            describe_failure(
                result,
                f"patched model does not prefer {expected!r} over {others} by more than {margin}: "
                f"its margin over {best!r} is {gap:.3f} nats",
            )
        )


def assert_localized(profile: LocalizationProfile, layers: Iterable[int] | None = None, *, min_hits: int = 1) -> None:
    """The expected answer was decoded at least `min_hits` times among source `layers` (default: all swept)."""
    __tracebackhide__ = True
    if profile.expect is None:
        raise AssertionError("assert_localized needs a profile swept with expect=...; this one has none")
    wanted = sorted(set(profile.layers if layers is None else layers))
    missing = sorted(set(wanted) - set(profile.layers))
    if missing:
        raise AssertionError(f"assert_localized: layers {missing} were not swept (swept: {profile.layers})")
    hits = [layer for layer in profile.hit_layers if layer in wanted]
    if len(hits) < min_hits:
        raise AssertionError(
            f"{profile.expect!r} decoded at {len(hits)} of layers {wanted} (hits at {hits}), "
            f"expected at least {min_hits}\n"
            f"  all hit layers: {profile.hit_layers}, peak layer: {profile.peak_layer}\n"
            + "\n".join("  " + line for line in profile.table().splitlines())
        )
