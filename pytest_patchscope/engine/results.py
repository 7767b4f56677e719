"""What a probe gives back: the patched continuation beside the clean one, candidate scores and samples.

Plain data (no torch): results are compared, asserted on and shown in reports. A result also knows
how a failed expectation about it reads (`describe_failure`), for assertions and `check_all` alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pytest_patchscope.engine.resolve import ResolvedProbe
from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.probes.probe import Probe


@dataclass(frozen=True)
class CandidateScore:
    """One candidate answer teacher-forced after a prompt: its tokens and each token's log-probability."""

    candidate: str
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    rank: int
    """Rank of the candidate's first token among all tokens at the first step (0 = the greedy choice)."""

    @property
    def logprob(self) -> float:
        """Log-probability of the whole candidate: the sum over its tokens."""
        return sum(self.logprobs)

    @property
    def mean_logprob(self) -> float:
        """The mean over its tokens (comparable across candidates of different lengths)."""
        return self.logprob / len(self.logprobs)

    def __str__(self) -> str:
        return f"{self.candidate!r}: logprob {self.logprob:.3f} (mean {self.mean_logprob:.3f}, first-token rank {self.rank})"


@dataclass(frozen=True)
class Sample:
    """One sampled continuation."""

    text: str
    tokens: tuple[int, ...]
    degenerate: str | None = None


MATCH_RULES = {
    "ignore_case": "the expected text occurs in the generation, ignoring case (the default)",
    "case_sensitive": "the expected text occurs in the generation as written",
    "paper": (
        "the Patchscopes paper's rule (its §4.2 code): the expected text with spaces removed occurs in the "
        "generation with spaces removed, case-sensitive"
    ),
}
"""How a hit is decided: `match=` of sweeps, `hit_rate` and the generation assertions."""
DEFAULT_MATCH = "ignore_case"


def check_match(match: object) -> str:
    """`match` if it names a rule of MATCH_RULES, else a ProbeConfigError listing them."""
    if not isinstance(match, str) or match not in MATCH_RULES:
        rules = "; ".join(f"{name!r}: {meaning}" for name, meaning in MATCH_RULES.items())
        raise ProbeConfigError("match", match, f"one of the match rules ({rules})")
    return match


def match_rule(case_sensitive: object, match: object) -> str:
    """The rule meant by the `case_sensitive` / `match` keywords of an assertion or `hit_rate`
    (match=None: case_sensitive decides); contradictory values are refused."""
    if not isinstance(case_sensitive, bool):
        raise ProbeConfigError("case_sensitive", case_sensitive, "True or False")
    if match is None:
        return "case_sensitive" if case_sensitive else DEFAULT_MATCH
    rule = check_match(match)
    if case_sensitive and rule == "ignore_case":
        raise ProbeConfigError("match", match, "a case-sensitive rule with case_sensitive=True", "Pass one of the two keywords.")
    return rule


def contains(text: str, expected: str, match: str = DEFAULT_MATCH) -> bool:
    """The one hit test of results, sweeps and assertions, under a rule of MATCH_RULES."""
    if match == "paper":
        return expected.replace(" ", "") in text.replace(" ", "")
    return expected in text if match == "case_sensitive" else expected.lower() in text.lower()


@dataclass(frozen=True)
class PatchResult:
    """What one probe generated: the patched continuation beside the clean one.

    With `candidates`, `scores[c]` / `clean_scores[c]` score each candidate after the patched /
    clean target. With sampling, `samples` holds every sample (`text` is the first one's).
    """

    probe: Probe
    resolved: ResolvedProbe
    text: str
    clean_text: str | None
    """The unpatched continuation (None when run with clean=False)."""
    tokens: tuple[int, ...]
    clean_tokens: tuple[int, ...] | None
    first_token_scores: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)
    """For requested token ids: (log-probability, rank) at the first generated step."""
    scores: dict[str, CandidateScore] = field(default_factory=dict, repr=False)
    clean_scores: dict[str, CandidateScore] | None = field(default=None, repr=False)
    """The candidates after the clean target (None when run with clean=False)."""
    samples: tuple[Sample, ...] = field(default=(), repr=False)
    """Every continuation drawn: n_samples of them when sampling, else the greedy one."""
    clean_samples: tuple[Sample, ...] | None = field(default=None, repr=False)
    degenerate: str | None = None
    """Why the patched continuation looks degenerate (see `decoding.degeneration`), or None."""
    clean_degenerate: str | None = None
    path: str = "packed"
    """Which engine ran it: "packed" (the batched, prefix-sharing engine) or "general" (the model's
    own forward and generate, for families the packed engine cannot run; see PatchscopeModel.path)."""

    def hit_rate(self, expected: str, *, case_sensitive: bool = False, clean: bool = False, match: str | None = None) -> float:
        """The share of samples (patched, or clean ones with clean=True) whose text contains `expected`
        (under `match`, a rule of MATCH_RULES; None: case_sensitive decides).

        A greedy probe has one sample, its continuation, so its hit rate is 0.0 or 1.0."""
        rule = match_rule(case_sensitive, match)
        samples = self.clean_samples if clean else self.samples
        if samples is None:
            raise ProbeConfigError("clean", clean, "False for a result run with clean=False (it has no clean samples)")
        if not isinstance(expected, str) or not expected:
            raise ProbeConfigError("expected", expected, "a non-empty string")
        return sum(contains(s.text, expected, rule) for s in samples) / len(samples)

    def __str__(self) -> str:
        ran = "" if self.path == "packed" else f"\n  path:    {self.path}"
        return f"{self.probe.describe()}\n  patched: {self.text!r}\n  clean:   {self.clean_text!r}{ran}"


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
    if result.path != "packed":
        lines.append(f"  path:     {result.path} (the model's own forward and generate)")
    lines += describe_scores(result)
    lines.append(f"  as code:  {result.probe!r}")
    return "\n".join(lines)
