"""Assertions on patched generations and localization profiles, with pytest-style messages.

Each failure shows the probe (S, i, l -> T, i*, l*), the patched and the clean text, and what
was expected; the helper frames are hidden from tracebacks with __tracebackhide__.
"""
from __future__ import annotations

import re
from typing import Iterable

from .engine import PatchResult
from .profile import LocalizationProfile


def describe_failure(result: PatchResult, expectation: str) -> str:
    """What failed, then the probe, its patched and clean text, and the probe as code (for @example)."""
    return (
        f"{expectation}\n"
        f"  probe:    {result.probe.describe()}\n"
        f"  patched:  {result.text!r}\n"
        f"  clean:    {result.clean_text!r}\n"
        f"  as code:  {result.probe!r}"
    )


def _contains(text: str, expected: str, case_sensitive: bool) -> bool:
    return expected in text if case_sensitive else expected.lower() in text.lower()


def assert_patched_generation_contains(result: PatchResult, expected: str, *, case_sensitive: bool = False) -> None:
    """The patched continuation contains `expected`."""
    __tracebackhide__ = True
    if not _contains(result.text, expected, case_sensitive):
        how = "" if case_sensitive else " (case-insensitive)"
        raise AssertionError(describe_failure(result, f"patched generation does not contain {expected!r}{how}"))


def assert_patched_generation_not_contains(result: PatchResult, unexpected: str, *, case_sensitive: bool = False) -> None:
    """The patched continuation does not contain `unexpected` (a negative control)."""
    __tracebackhide__ = True
    if _contains(result.text, unexpected, case_sensitive):
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
