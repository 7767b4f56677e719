"""What the engine needs to know about, and do to, an HF causal LM before it can run probes on it.

- `plain_twin`: the HF model rebuilt without the bridge's wrappers, sharing every weight, so that
  passes without a TransformerLens hook run at plain HF speed (with the unembedding vocabulary-
  chunked on CPU).
- `Architecture`: per decoder layer, its attention window and how the layer takes its cache; the
  engine builds its own masks and caches, so every fact HF's masks would carry must be here.
- `describe_architecture` and `check_layers`: say (as a ModelLoadError) what the packed engine
  cannot run exactly (state-space and hybrid caches, layers without a key/value cache, ALiBi
  folded into masks); such a model runs on the general path instead (engine/general.py).
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
from dataclasses import dataclass, replace
from typing import Any

from pytest_patchscope.errors import ModelLoadError

VOCAB_CHUNK = 1024
CACHE_ARGUMENTS = ("past_key_values", "layer_past", "past_key_value")
"""What decoder layers call their key/value cache argument (Llama: past_key_values; GPT-NeoX, GPT-J, Falcon: layer_past)."""

VERIFIED_FAMILIES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "opt", "olmo", "olmo2", "olmo3", "stablelm", "cohere", "cohere2", "granite", "starcoder2",
    "gpt_oss", "deepseek_v3", "gpt_neox", "gptj", "gpt_neo", "codegen", "gpt_bigcode", "falcon", "xglm", "bloom",
)
"""model_type values that tests/test_families.py checks token for token against the plain-HF reference."""

ATTENTION_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}
"""config.layer_types values the engine runs: full causal attention, or a sliding window."""

NOT_KEY_VALUE = {
    "mamba": "state-space (Mamba) layers", "mamba2": "state-space (Mamba-2) layers", "falcon_mamba": "state-space (Mamba) layers",
    "rwkv": "recurrent (RWKV) layers", "rwkv7": "recurrent (RWKV-7) layers", "jamba": "hybrid attention/Mamba layers",
    "bamba": "hybrid attention/Mamba layers", "zamba": "hybrid attention/Mamba layers", "zamba2": "hybrid attention/Mamba layers",
    "falcon_h1": "hybrid attention/Mamba layers", "granitemoehybrid": "hybrid attention/Mamba layers",
    "nemotron_h": "hybrid attention/Mamba layers", "qwen3_next": "hybrid linear/full attention layers",
    "recurrent_gemma": "recurrent (Griffin) layers", "lfm2": "hybrid convolution/attention layers",
    "lfm2_moe": "hybrid convolution/attention layers", "llama4_text": "chunked attention layers",
    "gemma4": "per-layer head dimensions and key/value layers shared across layers",
    "gemma4_text": "per-layer head dimensions and key/value layers shared across layers",
    "mpt": "ALiBi position biases folded into boolean masks",
    "modernbert-decoder": "alternating global and local attention with its own masks",
    "deepseek_v4": "hyper-connection residual streams (hc_mult per token) and compressed attention with caches of its own",
    "kimi_linear": "hybrid linear/full attention layers", "minimax": "hybrid linear (lightning)/full attention layers",
    "xlstm": "recurrent (xLSTM) layers",
}
"""Families whose layers need more than a causal key/value cache and masks: they run on the general path."""


@dataclass(frozen=True)
class Architecture:
    """Per decoder layer: its sliding-window width (None = full causal attention); and for ALiBi
    models (BLOOM) the per-head slopes of the bias `slope * key position` that each layer is given."""

    windows: tuple[int | None, ...]
    alibi_heads: int = 0
    """Attention heads of an ALiBi model (0 = positions are not an attention bias)."""
    alibi_in_mask: bool = False
    """Falcon with alibi=True: the bias, divided by sqrt(head_dim), is folded into the mask (per head)."""
    head_dim: int = 0
    logit_scale: float = 1.0
    """What the family's LM head multiplies its logits by (Cohere's logit_scale, 1 / Granite's logits_scaling)."""
    logit_softcap: float | None = None
    """Gemma 2/3's final_logit_softcapping: logits = cap * tanh(logits / cap)."""

    def final_logits(self, logits: Any) -> Any:
        """The LM head's output as the family's CausalLM forward returns it: greedy choices never
        depend on this, but log-probabilities (scores) do."""
        import torch

        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def layer_bias(self, key_positions: Any, dtype: Any) -> Any:
        """The ALiBi bias for keys at `key_positions` (rows, keys), as this family's layers take it:
        (rows * heads, 1, keys), computed as HF computes it (Falcon multiplies in bfloat16)."""
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        slopes = _get_alibi_slopes(self.alibi_heads, key_positions.device)
        if self.alibi_in_mask:
            slopes = slopes.bfloat16()
        bias = slopes[None, :, None] * key_positions[:, None, :]
        return bias.reshape(-1, 1, key_positions.shape[-1]).to(dtype)

    def fold(self, mask: Any, bias: Any) -> Any:
        """Falcon's per-head mask: bias / sqrt(head_dim) where the float `mask` allows, its minimum elsewhere."""
        import math

        import torch

        per_head = bias.view(-1, self.alibi_heads, 1, bias.shape[-1]) / math.sqrt(self.head_dim)
        return per_head.masked_fill(mask < -1, torch.finfo(mask.dtype).min)

    @property
    def distinct_windows(self) -> tuple[int | None, ...]:
        return tuple(dict.fromkeys(self.windows))


def _refusal(model_type: str, reason: str) -> ModelLoadError:
    """Why the packed engine cannot run a family: such a model runs on the general path (see loading.from_hf)."""
    return ModelLoadError(
        f"architecture={model_type!r} has {reason}, which the packed engine's key/value cache and masks cannot run exactly"
    )


LOGIT_SCALES = {t: "logit_scale" for t in ("cohere", "cohere2", "cohere2_moe")}
LOGIT_DIVISORS = {t: "logits_scaling" for t in ("granite", "granitemoe", "granitemoeshared", "granitemoe_swa")}
LOGIT_SOFTCAPS = {t: "final_logit_softcapping" for t in ("gemma2", "gemma3_text", "vaultgemma", "nanochat")}
"""model_type -> the config field of its LM head's post-processing (read from each family's CausalLM.forward)."""
LOGIT_FIELDS = {"logit_scale": 1.0, "logits_scaling": 1.0, "final_logit_softcapping": None}
"""Config fields that change the logits in some CausalLM.forward, and the value that changes nothing."""


def describe_architecture(config: Any) -> Architecture:
    """The attention windows of `config`'s layers, as HF's own masks apply them, and what its LM head
    does to the logits; refuses what it cannot run."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type in NOT_KEY_VALUE:
        raise _refusal(model_type, NOT_KEY_VALUE[model_type])
    known = model_type in LOGIT_SCALES or model_type in LOGIT_DIVISORS or model_type in LOGIT_SOFTCAPS
    changed = {name: getattr(config, name) for name, same in LOGIT_FIELDS.items() if getattr(config, name, same) not in (same, None)}
    if changed and not known:  # its scores would silently differ from the model's own
        raise _refusal(model_type, f"logits post-processed by {changed}, which the engine does not know how to apply")
    scale = float(getattr(config, LOGIT_SCALES[model_type])) if model_type in LOGIT_SCALES else 1.0
    if model_type in LOGIT_DIVISORS:
        scale /= float(getattr(config, LOGIT_DIVISORS[model_type]))
    cap = getattr(config, LOGIT_SOFTCAPS[model_type], None) if model_type in LOGIT_SOFTCAPS else None
    return replace(_attention(config, model_type), logit_scale=scale, logit_softcap=None if cap is None else float(cap))


def _attention(config: Any, model_type: str) -> Architecture:
    n_layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
        if unknown:
            raise _refusal(model_type, f"layers of type {unknown} (config.layer_types)")
        return Architecture(tuple(window if ATTENTION_LAYER_TYPES[t] else None for t in layer_types))
    attention_layers = getattr(config, "attention_layers", None)  # GPT-Neo: "global" or "local"
    if attention_layers:
        local = int(config.window_size)
        return Architecture(tuple(local if kind == "local" else None for kind in attention_layers))
    if model_type == "bloom":
        return Architecture((None,) * n_layers, alibi_heads=int(config.n_head))
    if model_type == "falcon" and getattr(config, "alibi", False):
        heads = int(config.num_attention_heads)
        return Architecture((None,) * n_layers, alibi_heads=heads, alibi_in_mask=True, head_dim=int(config.hidden_size) // heads)
    return Architecture((int(window) if window else None,) * n_layers)


@dataclass(frozen=True)
class LayerSignature:
    """How a decoder layer class is called: its positional parameters after hidden_states, and its cache's name."""

    positional: tuple[str, ...]
    cache: str | None


_SIGNATURES: dict[type, LayerSignature] = {}


def layer_signature(layer: Any) -> LayerSignature:
    """Read once per layer class: the engine calls every layer by name, with its own cache."""
    cls = type(layer)
    if cls not in _SIGNATURES:
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in params]
        cache = next((name for name in CACHE_ARGUMENTS if name in names), None)
        _SIGNATURES[cls] = LayerSignature(tuple(p.name for p in params if p.kind in kinds), cache)
    return _SIGNATURES[cls]


def boot_bridge(name: str, hf_model: Any, tokenizer: Any) -> Any:
    """`TransformerBridge.boot_transformers` over `hf_model`, with what its adapters misread put right.

    Falcon's new decoder architecture (40B, 180B) counts its key/value heads in num_kv_heads and
    ignores multi_query, which its checkpoints still set; TransformerLens' adapter reads multi_query
    as one key/value head (its fused QKV then fails to split), and splits the rows as [queries, keys,
    values] where HF lays them out per key/value group. The engine runs on the plain twin either way;
    the fix keeps the bridge's own hooks (hook_q, hook_k, hook_v) and forward equal to HF's.
    """
    from transformer_lens.model_bridge import TransformerBridge

    config = hf_model.config
    grouped_falcon = getattr(config, "model_type", "") == "falcon" and bool(getattr(config, "new_decoder_architecture", False))
    # What HF's FalconAttention reads (num_kv_heads), in the fields the adapter reads first.
    overrides = {"multi_query": False, "num_key_value_heads": int(config.num_kv_heads)} if grouped_falcon else None
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, hf_config_overrides=overrides)
    if grouped_falcon:
        _regroup_falcon_qkv(bridge, config)
    return bridge


def _regroup_falcon_qkv(bridge: Any, config: Any) -> None:
    """Re-split each block's fused QKV from HF's grouped layout (FalconAttention._split_heads: per
    key/value group, its queries, then one key, then one value) into the bridge's q, k and v."""
    from types import SimpleNamespace

    import torch

    heads, groups = int(config.num_attention_heads), int(config.num_kv_heads)
    head_dim = int(config.hidden_size) // heads
    rows = torch.arange((heads + 2 * groups) * head_dim).view(groups, heads // groups + 2, head_dim)
    order = torch.cat([rows[:, :-2].reshape(-1), rows[:, -2].reshape(-1), rows[:, -1].reshape(-1)])
    for block in bridge.blocks:
        fused = block.attn.original_component.query_key_value
        regrouped = SimpleNamespace(
            weight=fused.weight[order], bias=None if fused.bias is None else fused.bias[order]
        )
        q, k, v = bridge.adapter._split_falcon_qkv(SimpleNamespace(query_key_value=regrouped))
        block.attn.q.set_original_component(q)
        block.attn.k.set_original_component(k)
        block.attn.v.set_original_component(v)


def check_layers(layers: Any, model_type: str) -> None:
    """Every decoder layer must take a key/value cache argument (OpenAI-GPT's blocks take none)."""
    for layer in layers:
        if layer_signature(layer).cache is None:
            raise _refusal(model_type, f"decoder layers ({type(layer).__name__}) without a key/value cache argument")


def plain_twin(hf: Any) -> Any:
    """Rebuild `hf`'s class on the meta device and point its tensors at `hf`'s (no copy)."""
    import torch

    tensors = {
        name.replace("._original_component", ""): tensor
        for name, tensor in itertools.chain(
            hf.named_parameters(remove_duplicate=False), hf.named_buffers(remove_duplicate=False)
        )
    }
    config = copy.deepcopy(hf.config)
    if getattr(type(hf), "_supports_sdpa", False):
        config._attn_implementation = "sdpa"  # the bridge runs eager attention; the twin needs no patterns
    with torch.device("meta"):
        twin = type(hf)(config)
    for module_name, module in twin.named_modules():
        for store in (module._parameters, module._buffers):
            for name, value in list(store.items()):
                if value is None:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                if full not in tensors:
                    raise ModelLoadError(
                        f"model={type(hf).__name__!r}: the bridge exposes no tensor for {full!r}, so no "
                        "unwrapped twin can share its weights. Allowed: architectures whose TransformerBridge "
                        "keeps the HF module names (Llama, Mistral, Qwen, GPT-2 and most decoder-only models)."
                    )
                store[name] = tensors[full]
                if name == "bias" and store is module._buffers and tensors[full].dtype == torch.bool:
                    # A causal (or local) triangle indexed by packed column (GPT-Neo): the engine's masks,
                    # built from each token's own position, carry causality and windows instead.
                    store[name] = torch.ones_like(tensors[full])
    _copy_dispatch_hooks(hf, twin)
    twin.generation_config = hf.generation_config
    head = twin.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.weight.device.type == "cpu" and head.out_features > 4 * VOCAB_CHUNK:
        # Instance-level override of nn.Module.forward; torch types it as a method.
        head.forward = functools.partial(_vocab_chunked_linear, head)  # type: ignore[method-assign]
    return twin.eval()


def _copy_dispatch_hooks(hf: Any, twin: Any) -> None:
    """Give the twin's modules the accelerate hooks of `hf`'s (a device_map placement): each moves its
    module's inputs to the module's device and loads offloaded weights for the call."""
    hooks = {
        name.replace("._original_component", ""): module._hf_hook
        for name, module in hf.named_modules()
        if getattr(module, "_hf_hook", None) is not None
    }
    if not hooks:
        return
    from accelerate.hooks import add_hook_to_module

    for name, hook in hooks.items():
        # A copy: the same placement and offloaded weights, its own per-call state.
        add_hook_to_module(twin.get_submodule(name), copy.copy(hook))


def _vocab_chunked_linear(head: Any, hidden: Any) -> Any:
    """The unembedding in slices of the vocabulary: the same numbers, but on CPU a few short rows
    against a 49k-row matrix run 1.5x faster this way (measured with MKL on 2 cores, 8-64 rows)."""
    import torch

    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat.new_empty(flat.shape[0], head.out_features)
    for start in range(0, head.out_features, VOCAB_CHUNK):
        torch.mm(flat, head.weight[start: start + VOCAB_CHUNK].t(), out=out[:, start: start + VOCAB_CHUNK])
    if head.bias is not None:
        out += head.bias
    return out.reshape(*hidden.shape[:-1], head.out_features)
