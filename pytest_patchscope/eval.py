"""Paper evaluations: the Patchscopes next-token experiment (paper §4.1, Fig. 2), as a function and a CLI.

    patchscope-eval nexttoken --model default --n 1000 --out eval-out
    python -m pytest_patchscope.eval nexttoken --model ./my-checkpoint --text corpus.txt --layers 0-29
    patchscope-eval attribute --data ../shared/data/patchscopes-attribute --out attribute-out   # §4.2: see `attribute`

For (prompt, position) samples taken from real English text, and for every layer l, it measures
how well h_l (the residual stream after block l, at the prompt's last token) predicts the model's own
next token (the argmax of its normal forward pass there), three ways:

- token identity: the Patchscope (T = TOKEN_IDENTITY's few-shot prompt, i* = its last token,
  l* = l, f = identity), run through the batched engine (`run_probes`, one job for all samples and
  layers); the prediction is the first token it generates (greedy, max_new_tokens=1);
- logit lens: the model's own final norm and unembedding applied to h_l;
- affine (tuned-lens-style, the paper's "linear shortcut" baseline): an AffineMapping fitted by least
  squares from h_l to h_{L-1} (the last block's output, pre final norm) on training prompts, then
  final norm + unembedding of f(h_l) on the evaluation prompts. The maps are saved, and load with
  `AffineMapping.load` as any probe's `mapping=` (with LOGIT_LENS they give the affine lens as a probe).

Metrics per layer and method: Precision@1 (top-1 equals the model's prediction) and surprisal
(-log p of the model's predicted token under the method, in nats). The training and evaluation
prompts come from disjoint halves of the corpus' paragraphs.

The default corpus is CPython's own `pydoc_data.topics` (the language reference's prose, which ships
with every CPython), with reStructuredText markup, grammar and code stripped; `--text FILE` uses
your own plain-text files instead (paragraphs separated by blank lines).

At the last layer the hook point (`blocks.{L-1}.hook_out`) is the state *before* the final norm, so
patching it needs no special case (the paper's code hooks the final norm there instead, because HF's
last `hidden_states` entry is post-norm); both methods are then exactly the model's own prediction.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import io
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pytest_patchscope import attribute
from pytest_patchscope.engine.runner import DEFAULT_BATCH_MEMORY_MB, run_probes
from pytest_patchscope.errors import PatchscopeError, ProbeConfigError, ReportError
from pytest_patchscope.model.layers import residual_streams
from pytest_patchscope.model.sites import DEFAULT_SITE
from pytest_patchscope.probes.presets import TOKEN_IDENTITY
from pytest_patchscope.progress import ProgressLog, progress_label
from pytest_patchscope.validation import check_int, describe_layers, parse_layers

if TYPE_CHECKING:
    import torch

    from pytest_patchscope.model.loading import PatchscopeModel
    from pytest_patchscope.probes.mappings import AffineMapping
    from pytest_patchscope.scope import Patchscope

DEFAULT_N = 1000
DEFAULT_MIN_TOKENS = 8
DEFAULT_MAX_TOKENS = 24
DEFAULT_OUT = "patchscope-eval"
METHODS = ("token_identity", "logit_lens", "affine")
METHOD_LABELS = {
    "token_identity": "Token identity (Patchscope)",
    "logit_lens": "Logit lens",
    "affine": "Affine map (tuned lens)",
}
PLOT_INSTALL_HINT = "pip install 'pytest-patchscope[plot]'"

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ============================================================================================
# corpus
# ============================================================================================
_UNDERLINE = re.compile(r"^\s*([*=\-^~\"'`#+])\1{2,}\s*$")
_BULLET = re.compile(r"^\s*(?:[*\-+•]|\d+\.|\(\d+\)|[a-z]\))\s+")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_CODE_CHARS = frozenset("(){}[]=<>_#@\\|;$%&~^`")
_CODE_STARTS = (">>>", "...", "+-", "|", "-[", "$ ", "% ")


def prose_paragraphs(text: str, *, min_words: int = 8) -> list[str]:
    """The prose paragraphs of a reStructuredText-like document, each on one line.

    Drops section titles (underlined lines), grammar (``::=``), doctests, tables and code-like
    blocks (many brackets/operators or few letters); strips bullets, *emphasis* and [1] footnotes.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(_UNDERLINE.match(line) for line in lines):
            continue
        if lines[0].lstrip().startswith(_CODE_STARTS) or "::=" in block:
            continue
        joined = _BULLET.sub("", " ".join(line.strip() for line in lines))
        joined = _FOOTNOTE.sub("", _EMPHASIS.sub(r"\1", joined))
        joined = re.sub(r"\s+", " ", joined).strip()
        if len(joined.split()) < min_words:
            continue
        code = sum(c in _CODE_CHARS for c in joined) / len(joined)
        letters = sum(c.isalpha() or c == " " for c in joined) / len(joined)
        if code > 0.03 or letters < 0.85:
            continue
        paragraphs.append(joined)
    return paragraphs


def default_corpus() -> list[str]:
    """Prose paragraphs of CPython's `pydoc_data.topics` (the language reference text, ~250 kB)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - some distributions strip pydoc_data
        raise ProbeConfigError(
            "text", None, "one or more plain-text files",
            "This Python has no pydoc_data.topics (the default corpus); pass --text FILE.",
        ) from exc
    return [p for key in sorted(topics) for p in prose_paragraphs(topics[key])]


def read_corpus(paths: Iterable[str | Path]) -> list[str]:
    """Paragraphs (blank-line separated, whitespace collapsed) of plain-text files, in order."""
    documents = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ProbeConfigError("text", str(path), "a readable plain-text file", str(exc)) from exc
        documents += [" ".join(block.split()) for block in re.split(r"\n[ \t]*\n", text) if block.strip()]
    if not documents:
        raise ProbeConfigError("text", [str(p) for p in paths], "files with some text in them")
    return documents


def split_documents(documents: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """Indices of the (evaluation, training) halves: paragraphs shuffled by `seed`, split by characters.

    The split depends only on the corpus and the seed, so the evaluation samples of a seed do not
    change with the number of training prompts.
    """
    order = list(range(len(documents)))
    random.Random(f"split:{seed}").shuffle(order)
    total = sum(len(documents[k]) for k in order)
    evaluation: list[int] = []
    training: list[int] = []
    used = 0
    for k in order:
        (evaluation if used < total / 2 else training).append(k)
        used += len(documents[k])
    return sorted(evaluation), sorted(training)


@dataclass(frozen=True)
class Sample:
    """One (prompt, position) sample: a window of a paragraph, predicted at its last token."""

    text: str
    ids: tuple[int, ...]
    """The prompt's token ids as the model's tokenizer makes them (what every code path uses)."""
    document: int
    """Index of the paragraph it was cut from."""

    @property
    def position(self) -> int:
        return len(self.ids) - 1


def sample_windows(
    model: "PatchscopeModel",
    documents: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    pool: Sequence[int] | None = None,
    salt: str = "eval",
) -> list[Sample]:
    """`n` distinct windows of `min_tokens`..`max_tokens` tokens, each ending at a random token.

    Every token of the pool's paragraphs that has at least `min_tokens - 1` tokens before it is an
    equally likely end; the window length is uniform. Deterministic in (corpus, pool, seed, salt),
    and prefix-stable: the first k samples of n are the samples of n = k.
    """
    check_int("n", n, 0)
    if not (isinstance(min_tokens, int) and isinstance(max_tokens, int) and 2 <= min_tokens <= max_tokens):
        raise ProbeConfigError("min_tokens/max_tokens", (min_tokens, max_tokens), "ints with 2 <= min_tokens <= max_tokens")
    if n == 0:
        return []
    pool = list(range(len(documents))) if pool is None else list(pool)
    encoded = model.tokenizer([documents[k] for k in pool], add_special_tokens=False, return_offsets_mapping=True)
    offsets = [list(o) for o in encoded["offset_mapping"]]
    counts = [max(0, len(o) - min_tokens + 1) for o in offsets]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    total = starts[-1]
    if total < n:
        raise ProbeConfigError(
            "n", n, f"at most {total}: the corpus half used for this split has only {total} positions with "
            f"{min_tokens - 1}+ tokens of context",
            "Pass more or longer text (--text), a smaller --n/--n-train or a smaller --min-tokens.",
        )
    candidates = list(range(total))
    random.Random(f"{salt}:{seed}").shuffle(candidates)
    samples = []
    for candidate in candidates[:n]:
        j = bisect.bisect_right(starts, candidate) - 1
        end = candidate - starts[j] + min_tokens - 1
        length = random.Random(f"{salt}:{seed}:{candidate}").randint(min_tokens, min(max_tokens, end + 1))
        doc = documents[pool[j]]
        text = doc[offsets[j][end - length + 1][0]: offsets[j][end][1]]
        samples.append(Sample(text=text, ids=tuple(model.tokenize(text)), document=pool[j]))
    return samples


# ============================================================================================
# states: the engine's own packed opening pass, so they are exactly what probes patch in
# ============================================================================================
def capture_states(
    model: "PatchscopeModel",
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    first_position: int | None = None,
    batch_size: int = 32,
) -> tuple[dict[int, list["torch.Tensor"]], "torch.Tensor"]:
    """Hidden states at `model.hook_name(l)` for many prompts, captured by `Engine.capture_many`.

    With first_position None: each prompt's last position, returned as {layer: [(d,), ...]} in
    prompt order, plus the model's own logits there ((n, vocab) on the CPU would be big, so only
    their argmax and log-softmax of it: a (n, 2) tensor of [predicted id, log p]), from a plain
    forward pass of the unhooked twin. With first_position p: every position >= p, as
    {layer: [(len - p, d), ...]}, and an empty tensor.
    """
    import torch

    from pytest_patchscope.engine.runner import Engine

    engine = Engine(model)
    wanted = sorted(set(layers))
    out: dict[int, list[Any]] = {layer: [None] * len(prompts) for layer in wanted}
    last_only = first_position is None
    for start in range(0, len(prompts), batch_size):
        batch = range(start, min(len(prompts), start + batch_size))
        positions = {k: [len(prompts[k]) - 1] if last_only else list(range(first_position, len(prompts[k]))) for k in batch}  # type: ignore[arg-type]
        requests = [(prompts[k], p) for k in batch for p in positions[k]]
        captured = iter(engine.capture_many(requests, wanted))
        for k in batch:
            rows = [next(captured) for _ in positions[k]]
            for layer in wanted:
                if last_only:
                    out[layer][k] = rows[0][layer].to("cpu", torch.float32)
                elif rows:
                    out[layer][k] = torch.stack([row[layer] for row in rows]).to("cpu", torch.float32)
                else:
                    out[layer][k] = torch.zeros(0, model.d_model)
    return out, (_predictions(model, prompts, batch_size) if last_only else torch.zeros(0, 2))


def _predictions(model: "PatchscopeModel", prompts: Sequence[Sequence[int]], batch_size: int) -> "torch.Tensor":
    """[predicted id, its log p] at each prompt's last position; prompts of one length run together (no padding)."""
    import torch

    predictions = torch.zeros(len(prompts), 2, dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for k, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(k)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            batch = members[start: start + batch_size]
            batch_ids = torch.tensor([list(prompts[k]) for k in batch], device=model.device)
            with torch.no_grad():
                logits = model.plain(input_ids=batch_ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            top = logprobs.argmax(dim=-1)
            predictions[batch, 0] = top.double().cpu()
            predictions[batch, 1] = logprobs.gather(1, top[:, None])[:, 0].double().cpu()
    return predictions


def lens_logits(model: "PatchscopeModel", hidden: "torch.Tensor") -> "torch.Tensor":
    """Final norm then unembedding (the model's own modules, via the bridge) of (n, d) states."""
    import torch

    with torch.no_grad():
        if model.bridge is None:
            raise ProbeConfigError(
                "model", model.name, "a model on the packed path: the logit lens reads TransformerLens' ln_final and unembed, "
                f"and {model.name!r} runs on the general path (no bridge: {model.path_reason})",
            )
        return model.bridge.unembed(model.bridge.ln_final(hidden.to(model.device))).float()


def _lens_scores(model: "PatchscopeModel", hidden: "torch.Tensor", targets: "torch.Tensor", chunk: int = 256) -> tuple[list[int], list[float]]:
    """Top-1 token and log p(target) of lens_logits, in chunks (vocab-sized rows are big)."""
    import torch

    tops: list[int] = []
    logps: list[float] = []
    for start in range(0, hidden.shape[0], chunk):
        logprobs = torch.log_softmax(lens_logits(model, hidden[start: start + chunk]), dim=-1).cpu()
        tops += logprobs.argmax(dim=-1).tolist()
        logps += logprobs.gather(1, targets[start: start + chunk, None])[:, 0].tolist()
    return tops, logps


# ============================================================================================
# results
# ============================================================================================
@dataclass(frozen=True)
class LayerScores:
    """One layer's Precision@1 and mean surprisal (nats) per method; None where not measured."""

    layer: int
    token_identity: float
    logit_lens: float
    affine: float | None
    token_identity_surprisal: float
    logit_lens_surprisal: float
    affine_surprisal: float | None

    def precision(self, method: str) -> float | None:
        return getattr(self, method)

    def surprisal(self, method: str) -> float | None:
        return getattr(self, f"{method}_surprisal")


@dataclass
class NextTokenReport:
    """The outcome of `evaluate_nexttoken`: per-layer scores, the settings, timings and per-sample tops."""

    model: str
    weights_hash: str
    n_layers: int
    corpus: str
    seed: int
    n: int
    n_train: int
    n_train_pairs: int
    min_tokens: int
    max_tokens: int
    layers: list[LayerScores]
    model_surprisal: float
    """Mean -log p of the predicted token under the model itself (the floor for every method)."""
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Per sample: its text, the model's next token, and each method's top token per layer (decoded)."""
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    prompts: list[Sample] = field(default_factory=list, repr=False)
    predictions: list[int] = field(default_factory=list, repr=False)
    """The model's own next-token id per sample."""
    tops: dict[str, dict[int, list[int]]] = field(default_factory=dict, repr=False)
    """tops[method][layer][k]: the method's top-1 token id for sample k (-1: an end-of-sequence token)."""

    def row(self, layer: int) -> LayerScores:
        for scores in self.layers:
            if scores.layer == layer:
                return scores
        raise KeyError(f"layer {layer} was not evaluated (layers: {[s.layer for s in self.layers]})")

    def mean(self, method: str, layers: Iterable[int]) -> float:
        """Mean Precision@1 of `method` over `layers`."""
        values = [self.row(layer).precision(method) for layer in layers]
        if any(v is None for v in values):
            raise KeyError(f"{method} was not measured")
        return sum(values) / len(values)  # type: ignore[arg-type]

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if self.layers and self.layers[0].precision(m) is not None]

    # ---- formats ---------------------------------------------------------------------------
    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        methods = self.methods
        writer.writerow(["layer"] + [f"p1_{m}" for m in methods] + [f"surprisal_{m}" for m in methods])
        for s in self.layers:
            writer.writerow(
                [s.layer] + [f"{s.precision(m):.4f}" for m in methods] + [f"{s.surprisal(m):.4f}" for m in methods]
            )
        return buffer.getvalue()

    def to_markdown(self) -> str:
        methods = self.methods
        se = 0.5 / math.sqrt(max(self.n, 1))
        lines = [
            f"# Next-token Precision@1 by layer: {self.model}",
            "",
            f"Patchscopes paper §4.1 / Fig. 2. {self.n} evaluation samples ({self.min_tokens}-{self.max_tokens}-token "
            f"windows of {self.corpus}, seed {self.seed}); "
            + (f"affine maps fitted on {self.n_train} other prompts ({self.n_train_pairs} positions). " if self.n_train else "no affine maps. ")
            + f"Precision@1: the method's top token equals the model's own "
            f"next-token prediction; surprisal: mean -log p (nats) of that prediction under the method "
            f"(the model itself: {self.model_surprisal:.3f}). Standard error of a Precision@1 <= {se:.3f}.",
            "",
            "| layer | " + " | ".join(f"P@1 {METHOD_LABELS[m]}" for m in methods) + " | "
            + " | ".join(f"surprisal {METHOD_LABELS[m]}" for m in methods) + " |",
            "|---:|" + "---:|" * (2 * len(methods)),
        ]
        for s in self.layers:
            lines.append(
                f"| {s.layer} | " + " | ".join(f"{s.precision(m):.3f}" for m in methods) + " | "
                + " | ".join(f"{s.surprisal(m):.2f}" for m in methods) + " |"
            )
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_text(self) -> str:
        """The table as printed by the CLI."""
        methods = self.methods
        head = f"{'layer':>5}  " + "  ".join(f"{'P@1 ' + m:>18}" for m in methods) + "  " + "  ".join(
            f"{'surpr ' + m:>20}" for m in methods
        )
        lines = [head]
        for s in self.layers:
            lines.append(
                f"{s.layer:>5}  " + "  ".join(f"{s.precision(m):>18.3f}" for m in methods) + "  "
                + "  ".join(f"{s.surprisal(m):>20.2f}" for m in methods)
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        """Settings, per-layer scores, timings and notes (per-sample outcomes go to samples.jsonl)."""
        data = asdict(self)
        for bulky in ("samples", "prompts", "predictions", "tops"):
            data.pop(bulky)
        return json.dumps(data, indent=1, ensure_ascii=False)


# ============================================================================================
# the evaluation
# ============================================================================================
def evaluate_nexttoken(
    scope: "Patchscope",
    documents: Sequence[str] | None = None,
    *,
    n: int = DEFAULT_N,
    n_train: int | None = None,
    layers: str | Iterable[int] | None = None,
    seed: int = 0,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    corpus_name: str | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    log: Log = _quiet,
) -> NextTokenReport:
    """Run the next-token experiment on `scope`'s model; see the module docstring.

    documents: paragraphs of text (default: `default_corpus()`); n: evaluation samples; n_train:
    training prompts for the affine maps (default n; 0 skips the affine method); layers: which
    source layers (default all). With `out`, writes nexttoken.{csv,md,json}, samples.jsonl, the
    maps (affine/layer_XX.safetensors) and, with plot=True, nexttoken.png (needs matplotlib).
    """
    import torch

    from pytest_patchscope.probes.mappings import AffineMapping

    model = scope.model
    L = model.n_layers
    streams = residual_streams(model.hf.config)
    if streams > 1:
        raise ProbeConfigError(
            "model", model.name,
            "a model with one residual stream per token: the logit lens and the affine maps read h_l as d_model values",
            hint=f"This model carries {streams} hyper-connection streams per token, which its own head merges first; "
            "probe it with generate/sweep instead (resid_post then holds all the streams).",
        )
    chosen = parse_layers(layers, L)
    check_int("n", n, 1)
    n_train = n if n_train is None else n_train
    check_int("n_train", n_train, 0, hint="0 skips the affine maps.")
    if documents is None:
        documents = default_corpus()
        corpus_name = corpus_name or "pydoc_data.topics"
    corpus_name = corpus_name or f"{len(documents)} paragraphs"
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    eval_docs, train_docs = split_documents(documents, seed)
    samples = sample_windows(model, documents, n, seed=seed, min_tokens=min_tokens, max_tokens=max_tokens, pool=eval_docs, salt="eval")
    train = sample_windows(model, documents, n_train, seed=seed, min_tokens=min_tokens, max_tokens=max_tokens, pool=train_docs, salt="train")
    lap("sample")
    log(f"{len(samples)} evaluation and {len(train)} training prompts from {corpus_name}; layers {describe_layers(chosen)} of 0-{L - 1}")

    # 1. the model's own predictions, and h_l at each sample's last position
    states, predicted = capture_states(model, [s.ids for s in samples], sorted(set(chosen) | {L - 1}))
    targets = predicted[:, 0].long()
    model_surprisal = float(-predicted[:, 1].mean())
    lap("capture")

    # 2. token identity: one batched engine job for every (sample, layer)
    known = {(s.ids, s.position, DEFAULT_SITE, ""): {layer: states[layer][k] for layer in chosen} for k, s in enumerate(samples)}
    probes = [scope.probe(s.text, TOKEN_IDENTITY, layer=layer, max_new_tokens=1, stop=()) for s in samples for layer in chosen]
    score_ids = [(int(targets[k]),) for k in range(len(samples)) for _ in chosen]
    log(f"token identity: {len(probes)} probes in one batched job")
    # The scope's live bar when it has one (the CLI on a terminal), else a few lines through `log`.
    progress = scope.progress or ProgressLog(log, every_s=60.0, announce=False)
    with progress_label("token identity"):
        results = run_probes(scope.engine, probes, score_ids=score_ids, source_states=known, progress=progress)
    lap("token_identity")
    identity_top: dict[int, list[int]] = {layer: [] for layer in chosen}
    identity_logp: dict[int, list[float]] = {layer: [] for layer in chosen}
    for index, result in enumerate(results):
        k, j = divmod(index, len(chosen))
        layer = chosen[j]
        target = int(targets[k])
        logp, rank = result.first_token_scores[target]
        if result.tokens:
            top = result.tokens[0]
        else:  # the first generated token was an end-of-sequence token, which the engine does not keep
            top = target if (target in model.eos_token_ids and rank == 0) else -1
        identity_top[layer].append(top)
        identity_logp[layer].append(logp)

    # 3. logit lens on the same states
    lens_top: dict[int, list[int]] = {}
    lens_logp: dict[int, list[float]] = {}
    for layer in chosen:
        lens_top[layer], lens_logp[layer] = _lens_scores(model, torch.stack(states[layer]), targets)
    lap("logit_lens")

    # 4. affine maps h_l -> h_{L-1}, fitted on the training prompts' positions >= min_tokens - 1
    affine_top: dict[int, list[int]] = {}
    affine_logp: dict[int, list[float]] = {}
    maps: dict[int, AffineMapping] = {}
    n_pairs = 0
    notes: list[str] = []
    if train:
        train_states, _ = capture_states(model, [s.ids for s in train], sorted(set(chosen) | {L - 1}), first_position=min_tokens - 1)
        outputs = torch.cat(train_states[L - 1])
        n_pairs = int(outputs.shape[0])
        if n_pairs <= model.d_model:
            notes.append(
                f"The affine fits are underdetermined ({n_pairs} training positions for d_model = {model.d_model}): "
                "least squares returns a minimum-norm solution. Use a larger --n-train."
            )
        lap("affine_capture")
        for layer in chosen:
            inputs = torch.cat(train_states[layer])
            maps[layer] = AffineMapping.fit(inputs, outputs, name=f"{model.name}:affine_l{layer}_to_l{L - 1}")
            with torch.no_grad():
                mapped = maps[layer](torch.stack(states[layer]))
            affine_top[layer], affine_logp[layer] = _lens_scores(model, mapped, targets)
            del train_states[layer]
        lap("affine_fit")
    log(f"scored in {time.perf_counter() - started:.0f} s")

    def precision(tops: list[int]) -> float:
        return sum(int(t == int(targets[k])) for k, t in enumerate(tops)) / len(tops)

    def surprisal(logps: list[float]) -> float:
        return -sum(logps) / len(logps)

    rows = [
        LayerScores(
            layer=layer,
            token_identity=precision(identity_top[layer]),
            logit_lens=precision(lens_top[layer]),
            affine=precision(affine_top[layer]) if maps else None,
            token_identity_surprisal=surprisal(identity_logp[layer]),
            logit_lens_surprisal=surprisal(lens_logp[layer]),
            affine_surprisal=surprisal(affine_logp[layer]) if maps else None,
        )
        for layer in chosen
    ]
    decode = lambda token: model.decode([token]) if token >= 0 else "<eos>"  # noqa: E731
    sample_records = [
        {
            "text": s.text,
            "next": decode(int(targets[k])),
            "token_identity": [decode(identity_top[layer][k]) for layer in chosen],
            "logit_lens": [decode(lens_top[layer][k]) for layer in chosen],
            **({"affine": [decode(affine_top[layer][k]) for layer in chosen]} if maps else {}),
        }
        for k, s in enumerate(samples)
    ]
    seconds["total"] = round(time.perf_counter() - started, 2)
    report = NextTokenReport(
        model=model.name,
        weights_hash=model.weights_hash,
        n_layers=L,
        corpus=corpus_name,
        seed=seed,
        n=len(samples),
        n_train=len(train),
        n_train_pairs=n_pairs,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        layers=rows,
        model_surprisal=model_surprisal,
        seconds=seconds,
        samples=sample_records,
        notes=notes,
        prompts=samples,
        predictions=[int(t) for t in targets],
        tops={
            "token_identity": identity_top,
            "logit_lens": lens_top,
            **({"affine": affine_top} if maps else {}),
        },
    )
    if out is not None:
        write_outputs(report, out, maps=maps, plot=plot, log=log)
    return report


# ============================================================================================
# outputs
# ============================================================================================
def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(
            f"plotting the next-token figure needs matplotlib, which is not installed. Install it with: "
            f"{PLOT_INSTALL_HINT} (or pass --no-plot; the CSV and Markdown tables need nothing)."
        ) from exc
    return Figure, FigureCanvasAgg


def plot_nexttoken(report: NextTokenReport, path: str | Path) -> Path:
    """Fig. 2 of the paper for this model: Precision@1 (left) and surprisal (right) over layers."""
    from pytest_patchscope.fileio import atomic_write

    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    p1_ax, s_ax = fig.subplots(1, 2)
    layers = [s.layer for s in report.layers]
    styles = {"token_identity": ("tab:blue", "o"), "logit_lens": ("tab:orange", "s"), "affine": ("tab:green", "^")}
    for method in report.methods:
        color, marker = styles[method]
        p1_ax.plot(layers, [s.precision(method) for s in report.layers], color=color, marker=marker, markersize=3, label=METHOD_LABELS[method])
        s_ax.plot(layers, [s.surprisal(method) for s in report.layers], color=color, marker=marker, markersize=3, label=METHOD_LABELS[method])
    s_ax.axhline(report.model_surprisal, color="grey", linestyle=":", linewidth=1, label="model itself")
    p1_ax.set_ylim(0, 1.02)
    p1_ax.set_ylabel("Precision@1")
    s_ax.set_ylabel("surprisal (nats)")
    for ax in (p1_ax, s_ax):
        ax.set_xlabel("source layer l")
        ax.grid(alpha=0.3)
    p1_ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"Next-token prediction from h_l: {report.model}, {report.n} samples of {report.corpus}", fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def write_outputs(
    report: NextTokenReport, out: str | Path, *, maps: dict[int, "AffineMapping"] | None = None, plot: bool = True, log: Log = _quiet
) -> dict[str, str]:
    """Write the tables, per-sample tops, affine maps and (plot=True) the figure into `out`."""
    from pytest_patchscope.fileio import atomic_write

    directory = Path(out)
    files = {
        "csv": directory / "nexttoken.csv",
        "markdown": directory / "nexttoken.md",
        "samples": directory / "samples.jsonl",
        "json": directory / "nexttoken.json",
    }
    try:
        for layer, mapping in sorted((maps or {}).items()):
            path = directory / "affine" / f"layer_{layer:02d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            mapping.save(path)
        if maps:
            files["affine"] = directory / "affine"
        atomic_write(files["csv"], report.to_csv())
        atomic_write(files["markdown"], report.to_markdown())
        atomic_write(files["samples"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.samples))
        if plot:
            try:
                files["png"] = plot_nexttoken(report, directory / "nexttoken.png")
            except ReportError as exc:
                report.notes.append(f"No figure: {exc}")
                log(f"warning: {exc}")
        report.files = {key: str(path) for key, path in files.items()}
        atomic_write(files["json"], report.to_json())
    except OSError as exc:
        raise ReportError(f"--out {str(out)!r}: cannot write the results there ({exc}). Pass a writable directory.") from exc
    return report.files


# ============================================================================================
# CLI
# ============================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchscope-eval",
        description="Paper evaluations of pytest-patchscope (Patchscopes, Ghandeharioun et al. 2024).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nt = commands.add_parser(
        "nexttoken",
        help="next-token Precision@1 by layer: token identity vs logit lens vs affine (paper §4.1, Fig. 2)",
        description=(
            "Precision@1 and surprisal of the model's own next-token prediction, decoded from the hidden "
            "state after each layer by the token-identity Patchscope, the logit lens and a least-squares "
            "affine map (tuned lens). Writes nexttoken.csv/.md/.json/.png, samples.jsonl and the maps "
            "(affine/layer_XX.safetensors, loadable with AffineMapping.load as a probe's mapping=)."
        ),
    )
    nt.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), an HF directory or a .gguf file")
    nt.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    nt.add_argument("--n", type=int, default=DEFAULT_N, help=f"evaluation samples (default {DEFAULT_N})")
    nt.add_argument("--n-train", type=int, default=None, help="prompts to fit the affine maps on (default: --n; 0 skips them)")
    nt.add_argument("--text", nargs="+", action="extend", metavar="FILE", help="plain-text corpus files (default: pydoc_data.topics)")
    nt.add_argument("--layers", default="all", help="source layers: all (default), '0-29', '10,15,20-25'")
    nt.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    nt.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    nt.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS, help=f"shortest prompt window (default {DEFAULT_MIN_TOKENS})")
    nt.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"longest prompt window (default {DEFAULT_MAX_TOKENS})")
    nt.add_argument(
        "--batch-memory-mb", type=float, default=DEFAULT_BATCH_MEMORY_MB, help=f"memory bound of one probe batch (default {DEFAULT_BATCH_MEMORY_MB})"
    )
    nt.add_argument("--no-plot", action="store_true", help="do not draw nexttoken.png")
    nt.add_argument("--no-progress", action="store_true", help="no live progress bar (it is drawn only when stderr is a terminal)")
    attribute.add_parser(commands)
    return parser


def _load_scope(args: argparse.Namespace, log: Log) -> "Patchscope":
    """The model named by a subcommand's --model/--device/--batch-memory-mb/--no-progress."""
    from pytest_patchscope.model.devices import detect_device, parse_device
    from pytest_patchscope.scope import Patchscope

    device = detect_device(parse_device(args.device, "--device"))
    log(f"loading {args.model} on {device} ...")
    return Patchscope.load(args.model, device=device, batch_memory_mb=args.batch_memory_mb, progress=False if args.no_progress else "auto")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.command == "attribute":
        return attribute.main(args, lambda: _load_scope(args, log), log)
    try:
        documents = read_corpus(args.text) if args.text else None
        corpus_name = ", ".join(Path(p).name for p in args.text) if args.text else None
        scope = _load_scope(args, log)
        report = evaluate_nexttoken(
            scope, documents, n=args.n, n_train=args.n_train, layers=args.layers, seed=args.seed,
            min_tokens=args.min_tokens, max_tokens=args.max_tokens, corpus_name=corpus_name,
            out=args.out, plot=not args.no_plot, log=log,
        )
    except PatchscopeError as exc:
        print(f"patchscope-eval: error: {exc}", file=sys.stderr)
        return 2
    affine = (f"affine maps fitted on {report.n_train} prompts / {report.n_train_pairs} positions" if report.n_train
              else "no affine maps (--n-train 0)")
    print(f"# {report.model}: next-token Precision@1 by layer, n={report.n} (seed {report.seed}), {affine}")
    print(report.to_text())
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote: {', '.join(report.files.values())}  ({report.seconds.get('total', 0):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
