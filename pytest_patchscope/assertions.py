"""Assertions on patched generations and localization profiles, with pytest-style messages.

Each failure shows the probe (S, i, l -> T, i*, l*), the patched and the clean text, and what
was expected; the helper frames are hidden from tracebacks with __tracebackhide__.
"""
from __future__ import annotations

import re
from typing import Iterable

from pytest_patchscope.baseline.profile import LocalizationProfile
from pytest_patchscope.engine.results import MATCH_RULES, PatchResult, contains, describe_failure, match_rule
from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.validation import check_int, finite_real, layer_list


def _how(rule: str) -> str:
    """How a failure message names the match rule (the case-sensitive substring test needs no words)."""
    return {"ignore_case": " (case-insensitive)", "case_sensitive": ""}.get(rule, f" (match={rule!r}: {MATCH_RULES[rule]})")


def assert_patched_generation_contains(
    result: PatchResult, expected: str, *, case_sensitive: bool = False, match: str | None = None
) -> None:
    """The patched continuation contains `expected` (under `match`, a rule of MATCH_RULES such as
    "paper"; None: case_sensitive decides)."""
    __tracebackhide__ = True
    rule = match_rule(case_sensitive, match)
    if not contains(result.text, expected, rule):
        raise AssertionError(describe_failure(result, f"patched generation does not contain {expected!r}{_how(rule)}"))


def assert_patched_generation_not_contains(
    result: PatchResult, unexpected: str, *, case_sensitive: bool = False, match: str | None = None
) -> None:
    """The patched continuation does not contain `unexpected` (a negative control)."""
    __tracebackhide__ = True
    rule = match_rule(case_sensitive, match)
    if contains(result.text, unexpected, rule):
        raise AssertionError(describe_failure(result, f"patched generation contains {unexpected!r}{_how(rule)}, which it must not"))


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
    if not isinstance(profile, LocalizationProfile):
        raise ProbeConfigError("profile", profile, "a LocalizationProfile (what patchscope.sweep(...) returns)")
    if profile.expect is None:
        raise ProbeConfigError("profile", profile.probe.get("source"), "a profile swept with expect=...; this one has none",
                               "Pass expect='...' (or candidates=[...]) to sweep().")
    n_layers = profile.architecture.get("n_layers") or max(profile.layers) + 1
    wanted = sorted(set(profile.layers if layers is None else layer_list("layers", layers, n_layers)))
    missing = sorted(set(wanted) - set(profile.layers))
    if missing:
        raise ProbeConfigError("layers", layers, f"layers that were swept ({profile.layers}); {missing} were not")
    check_int("min_hits", min_hits, 1, len(wanted), hint=f"There are {len(wanted)} layers to hit among.")
    hits = [layer for layer in profile.hit_layers if layer in wanted]
    if len(hits) < min_hits:
        raise AssertionError(
            f"{profile.expect!r} decoded at {len(hits)} of layers {wanted} (hits at {hits}), "
            f"expected at least {min_hits}\n"
            f"  all hit layers: {profile.hit_layers}, peak layer: {profile.peak_layer}\n"
            + "\n".join("  " + line for line in profile.table().splitlines())
        )
