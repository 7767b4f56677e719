"""How a probe's continuation is decoded: greedy (the default) or sampled, as settings.

`Decoding` is plain data that a probe carries; `check_decoding` judges it. The token choice itself
(HF `generate`'s logits processors, seeded generators, the degeneration flag) is the engine's:
see `engine/decode.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from pytest_patchscope.errors import ProbeConfigError
from pytest_patchscope.validation import as_int, finite_real, plain

if TYPE_CHECKING:
    pass

MAX_SAMPLES = 1024
"""Sanity bound on n_samples (each sample is a row of the batch)."""
LOGIT_DIVISOR_RANGE = (1e-10, 1e10)
"""Bounds of temperature and repetition_penalty. Both divide (or multiply) float32 logits, the
penalty before the temperature: beyond these the logits overflow into inf/NaN probabilities, which
HF `generate` and torch.multinomial refuse with a raw error (1e-10 already picks the greedy token)."""


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of one probe (the defaults are greedy decoding, as before sampling existed).

    `repetition_penalty` and `no_repeat_ngram_size` act as in HF `generate` (the prompt counts as
    history). With `do_sample`, `temperature`, `top_k` (None: no cut) and `top_p` shape the
    distribution and sample k of `n_samples` draws from a generator seeded `seed + k`.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0
    n_samples: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def processes_logits(self) -> bool:
        """False for plain greedy decoding, which is an argmax of the raw logits."""
        return self.do_sample or self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def __post_init__(self) -> None:
        """numpy and torch scalars become the Python values they hold (see `Probe.__post_init__`)."""
        for f in fields(self):
            value = getattr(self, f.name)
            converted = plain(value)
            if converted is not value:
                object.__setattr__(self, f.name, converted)

    def __repr__(self) -> str:
        return f"Decoding({', '.join(f'{name}={value!r}' for name, value in self.changed().items())})"

    def changed(self) -> dict[str, Any]:
        """The settings that differ from greedy decoding (for identities and messages)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


GREEDY = Decoding()


def check_decoding(value: Any) -> Decoding:
    """`value` (a Decoding) with every field checked; a ProbeConfigError names the first bad one."""
    if not isinstance(value, Decoding):
        raise ProbeConfigError("decoding", value, "a Decoding (see pytest_patchscope.probes.decoding)")
    if not isinstance(value.do_sample, bool):
        raise ProbeConfigError("do_sample", value.do_sample, "True or False")
    n = as_int(value.n_samples)
    if n is None or not 1 <= n <= MAX_SAMPLES:
        raise ProbeConfigError("n_samples", value.n_samples, f"an int from 1 to {MAX_SAMPLES}")
    if n > 1 and not value.do_sample:
        raise ProbeConfigError("n_samples", value.n_samples, "1 with greedy decoding", "Pass do_sample=True to draw several samples.")
    low, high = LOGIT_DIVISOR_RANGE
    temperature = finite_real(value.temperature)
    if temperature is None or (value.do_sample and not low <= temperature <= high):
        raise ProbeConfigError(
            "temperature", value.temperature,
            f"a number > 0 with do_sample=True, from {low:g} to {high:g} (beyond, the float32 logits it divides overflow to inf/NaN)",
            "For the most likely token, use greedy decoding (do_sample=False) instead of temperature 0.",
        )
    top_p = finite_real(value.top_p)
    if top_p is None or not 0 < top_p <= 1:
        raise ProbeConfigError("top_p", value.top_p, "a number in (0, 1] (1 = no nucleus cut)")
    if value.top_k is not None and (as_int(value.top_k) is None or value.top_k < 1):
        raise ProbeConfigError("top_k", value.top_k, "None (no cut) or an int >= 1")
    if as_int(value.seed) is None or not 0 <= value.seed < 2**63 - MAX_SAMPLES:
        raise ProbeConfigError("seed", value.seed, f"an int from 0 to 2**63 - {MAX_SAMPLES + 1}")
    penalty = finite_real(value.repetition_penalty)
    if penalty is None or not low <= penalty <= high:
        raise ProbeConfigError(
            "repetition_penalty", value.repetition_penalty,
            f"a number > 0, from {low:g} to {high:g} (1 = no penalty, > 1 discourages repeats; beyond, the float32 "
            "logits it divides overflow to inf/NaN)",
        )
    ngram = as_int(value.no_repeat_ngram_size)
    if ngram is None or ngram < 0:
        raise ProbeConfigError("no_repeat_ngram_size", value.no_repeat_ngram_size, "an int >= 0 (0 = off)")
    sampling_only = {"temperature": 1.0, "top_p": 1.0, "top_k": None}
    if not value.do_sample:
        for name, default in sampling_only.items():
            if getattr(value, name) != default:
                raise ProbeConfigError(name, getattr(value, name), f"{default} with greedy decoding", "Pass do_sample=True to sample.")
    return value
