"""How a row picks its next token: greedy or sampled, with HF `generate`'s logits processors.

The processors run in HF's order and with HF's arithmetic (repetition penalty, no-repeat n-grams,
then temperature, top-k and top-p), so a probe decodes as `model.generate(...)` would with the
same settings. Each sampled row draws from its own `torch.Generator`, seeded `seed + sample`, so
a probe's samples are the same whether it runs alone or in a batch of thousands.

Also here: `degeneration`, the flag that tells "the model rambled" from "the fact is gone".
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pytest_patchscope.probes.decoding import Decoding

if TYPE_CHECKING:
    import torch


def banned_ngram_tokens(history: Sequence[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of `size` already in `history` (HF's no_repeat_ngram_size)."""
    if size <= 0 or len(history) + 1 < size:
        return []
    if size == 1:
        return sorted(set(history))
    tail = tuple(history[len(history) - size + 1:])
    return sorted({history[k + size - 1] for k in range(len(history) - size + 1) if tuple(history[k:k + size - 1]) == tail})


def next_token(
    logits: "torch.Tensor", history: Sequence[int], decoding: Decoding, generator: "torch.Generator | None"
) -> int:
    """The next token of one row from its float32 logits (vocab,), its history (prompt + generated)
    and its settings; a sampled row draws from `generator`."""
    import torch

    scores = logits[None].clone()
    if decoding.repetition_penalty != 1.0 and history:
        seen = torch.tensor([list(history)], device=scores.device)
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * decoding.repetition_penalty, picked / decoding.repetition_penalty)
        scores = scores.scatter(1, seen, picked)
    banned = banned_ngram_tokens(history, decoding.no_repeat_ngram_size)
    if banned:
        scores[0, banned] = -math.inf
    if not decoding.do_sample:
        return int(scores.argmax(dim=-1))
    if decoding.temperature != 1.0:
        scores = scores / decoding.temperature
    if decoding.top_k is not None:
        kth = torch.topk(scores, min(decoding.top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if decoding.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cut = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - decoding.top_p
        cut[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(cut.scatter(1, order, cut), -math.inf)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, num_samples=1, generator=generator)[0, 0])


def token_rank(logprobs: "torch.Tensor", token: int) -> int:
    """A token's rank among all tokens of one step (0 = the greedy choice; ties share the better rank)."""
    return int((logprobs > logprobs[token]).sum())


def first_step_scores(logits: "torch.Tensor", token_ids: tuple[int, ...]) -> dict[int, tuple[float, int]]:
    """(log-probability, rank) of each requested token at the first generated step, from its float logits."""
    import torch

    if not token_ids:
        return {}
    logprobs = torch.log_softmax(logits, dim=-1)
    return {t: (float(logprobs[t]), token_rank(logprobs, t)) for t in token_ids}


def row_generator(decoding: Decoding, sample: int, device: Any) -> "torch.Generator | None":
    """Sample `sample`'s own generator (None for greedy rows)."""
    import torch

    if not decoding.do_sample:
        return None
    return torch.Generator(device=device).manual_seed(decoding.seed + sample)


# ---- degeneration -------------------------------------------------------------------------------
RUN_LENGTH = 4
"""A token repeated this many times in a row is degenerate ('the the the the')."""


NGRAM_REPEATS = 3
"""An n-gram of 2-4 tokens that occurs this many times is degenerate ('London, London, London')."""


def degeneration(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> str | None:
    """Why a continuation looks degenerate, or None: a token repeated RUN_LENGTH times in a row,
    or a 2-4-token n-gram occurring NGRAM_REPEATS times (whitespace-only tokens are not counted)."""
    run = 1
    for k in range(1, len(tokens)):
        run = run + 1 if tokens[k] == tokens[k - 1] else 1
        if run >= RUN_LENGTH and decode([tokens[k]]).strip():
            return f"token {decode([tokens[k]])!r} repeats {RUN_LENGTH} times in a row"
    for size in (4, 3, 2):
        counts: dict[tuple[int, ...], int] = {}
        for k in range(len(tokens) - size + 1):
            gram = tuple(tokens[k:k + size])
            counts[gram] = counts.get(gram, 0) + 1
            if counts[gram] >= NGRAM_REPEATS and decode(list(gram)).strip():
                return f"the {size}-token sequence {decode(list(gram))!r} occurs {NGRAM_REPEATS} times"
    return None
