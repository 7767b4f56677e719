"""A model's decoder layers and their sublayers, read from the HF modules alone (no TransformerLens).

The general path (see `pytest_patchscope.engine.general`) runs the model's own forward and
`generate`, so all it needs of the model's structure is where its decoder layers are and, for a
site inside a layer, which of the layer's submodules is its attention, its MLP, their output
projections and (in post-norm families) the norms that the residual stream adds. Layers of one
hybrid model differ (a Mamba layer has no attention, a mixture-of-experts layer no single down
projection), so everything here is read per layer, by the names HF's modelling code uses.

Also here: what neither path can run (`refuse_unrunnable`), and the families whose left padding
is exact, so that the general path may batch prompts of different lengths.
"""
from __future__ import annotations

from typing import Any

from pytest_patchscope.errors import ModelLoadError

ENCODERS = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod",
})
"""Encoders that transformers can run with a causal mask (their *LMHeadModel / *ForCausalLM): their
weights were trained bidirectionally, so a patch in the prompt pass is not what the model computes."""

GENERAL_FAMILIES = (
    "mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid",
    "recurrent_gemma", "lfm2", "qwen3_next", "qwen3_5_text", "gemma4_text", "llama4_text", "mpt", "rwkv", "openai-gpt",
    "olmo_hybrid", "deepseek_v4", "kimi_linear", "minimax", "xlstm", "lfm2_moe", "zamba",
)
"""model_type values that run on the general path and that tests/test_families.py checks token for token against plain HF."""

PADDED_BATCHES = frozenset(set(GENERAL_FAMILIES) - {"recurrent_gemma", "rwkv", "deepseek_v4", "xlstm", "minimax"})
"""Families whose own attention mask (and the position ids generate derives from it) makes a
left-padded row compute what it computes alone, checked token for token in
tests/test_families.py. The general path batches only prompts of one length for any other
family: Griffin's recurrence (RecurrentGemma) and xLSTM's run through the padding (xLSTM takes no
mask at all), DeepSeek-V4's compressors pool the padding into their windows, which they count
from the first token in the row, and MiniMax's decoding steps attend to the padding (transformers
5.23 sizes their mask from layer 0's cache, which a lightning-attention layer leaves empty)."""

UNBATCHED = frozenset({"rwkv"})
"""Families whose rows differ in a batch from the same row alone, even in a batch of two copies of
one prompt (transformers 5.23's RWKV: measured in tests/test_families.py): one row per batch."""


def residual_streams(config: Any) -> int:
    """How many residual streams a decoder layer carries per token: 1, or `hc_mult` for the
    hyper-connection families (DeepSeek-V4), whose layers take and return (batch, tokens, hc_mult,
    d_model). A site at the layer's input or output then holds all of them, stream after stream."""
    streams = getattr(config, "hc_mult", None)
    return streams if isinstance(streams, int) and streams > 1 else 1


def last_token_layers(config: Any) -> int | None:
    """The first layer from which generate's prompt pass computes only the last token (None: none).

    Gemma 3n/4 layers from `num_hidden_layers - num_kv_shared_layers` on reuse earlier layers' keys
    and values and write none, so with generate's logits_to_keep=1 the model drops every other
    token before them: only the last token exists there to patch."""
    shared = getattr(config, "num_kv_shared_layers", 0)
    return int(config.num_hidden_layers) - shared if isinstance(shared, int) and shared > 0 else None


ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer", "temporal_block")
"""Names of a decoder layer's attention submodule (`mixer` and `temporal_block` in hybrids whose
token mixer varies by layer: only an attention class counts)."""
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "block_sparse_moe", "shared_mlp", "mixer")
"""Names of a decoder layer's MLP submodule (`mixer`: only an MLP or mixture-of-experts class counts)."""
DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "w2", "proj_down")
"""An MLP's down projection, whose input is the MLP's neurons (`proj_down`: xLSTM's feed-forward)."""
OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o_a_proj")
"""An attention module's output projection, whose input is the heads' outputs side by side
(`o_a_proj`: DeepSeek-V4's grouped output projection, which takes them in `n_groups` groups)."""
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads")
POST_ATTENTION_NORMS = ("post_attention_layernorm", "post_operator_norm")
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_ffn_norm")
"""Post-norm families (Gemma 2-4, OLMo 2 and hybrid) normalise a sublayer's output before the
residual adds it: the site is the norm's output. In a pre-norm layer `post_attention_layernorm`
is the MLP's input norm, so it counts only beside a post-MLP (or pre-MLP) norm."""


def refuse_unrunnable(config: Any, hf_model: Any = None) -> None:
    """A ModelLoadError for what neither path can run: an encoder, the decoder half of an
    encoder-decoder model, or (given the model) a model without a language-model head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    model_type = str(getattr(config, "model_type", "") or "")
    name = "" if hf_model is None else f" ({type(hf_model).__name__})"
    why = None
    if model_type in ENCODERS:
        why = "an encoder: its weights were trained to attend both ways, so a causal run (and a patch in the prompt pass) is not what it computes"
    elif getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        why = "the decoder half of an encoder-decoder model: without the encoder's states its continuations mean nothing"
    elif hf_model is not None and (hf_model.get_output_embeddings() is None or not hf_model.can_generate()):
        why = "no language-model head that generates (a base model or a classifier)"
    if why is not None:
        raise ModelLoadError(
            f"architecture={model_type!r}{name} cannot be probed: it is {why}. Allowed: a decoder-only causal "
            "language model (a *ForCausalLM or *LMHeadModel of a decoder family)."
        )


def find_decoder_layers(hf_model: Any) -> tuple[str, Any]:
    """(name, ModuleList) of the model's decoder layers: the list with one entry per hidden layer
    (config.num_hidden_layers where the config says), closest to the root."""
    import torch

    wanted = getattr(hf_model.config, "num_hidden_layers", None)
    lists = [
        (name, module) for name, module in hf_model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) and (not isinstance(wanted, int) or len(module) == wanted)
    ]
    if not lists:
        raise ModelLoadError(
            f"architecture={getattr(hf_model.config, 'model_type', '')!r} ({type(hf_model).__name__}): no list of "
            f"{wanted if isinstance(wanted, int) else 'its'} decoder layers among its modules, so no layer can be patched. "
            "Allowed: causal language models whose decoder layers are a ModuleList (every transformers decoder family)."
        )
    return min(lists, key=lambda item: (item[0].count("."), item[0]))


def _named(layer: Any, names: tuple[str, ...], kinds: tuple[str, ...]) -> list[str]:
    """The layer's direct children called one of `names` whose class name contains one of `kinds`."""
    found = []
    for name in names:
        child = getattr(layer, name, None) if name in layer._modules else None
        if child is not None and any(kind in type(child).__name__.lower() for kind in kinds):
            found.append(name)
    return found


def attention_of(layer: Any) -> str | None:
    """The layer's attention submodule ("self_attn", ...), None for a layer without one (Mamba, a convolution, linear attention)."""
    found = _named(layer, ATTENTION_NAMES, ("attention",))
    return found[0] if len(found) == 1 else None


def mlps_of(layer: Any) -> list[str]:
    """The layer's MLP submodules (two where a mixture of experts runs beside a shared MLP)."""
    return _named(layer, MLP_NAMES, ("mlp", "moe", "feedforward", "expert", "ffn"))


def _child(module: Any, names: tuple[str, ...]) -> str | None:
    import torch

    for name in names:
        child = module._modules.get(name)
        if child is not None and (isinstance(child, torch.nn.Linear) or type(child).__name__ == "Conv1D"):
            return name
    return None


def post_norm(layer: Any, names: tuple[str, ...]) -> str | None:
    """The post-norm (see POST_ATTENTION_NORMS) of a post-norm layer, None in a pre-norm layer."""
    post_norm_family = any(n in layer._modules for n in (*POST_MLP_NORMS, "pre_feedforward_layernorm"))
    return next((n for n in names if n in layer._modules), None) if post_norm_family else None


def down_projection(mlp: Any) -> str | None:
    """An MLP's single down projection (None for a mixture of experts: one per expert)."""
    return _child(mlp, DOWN_NAMES)


def output_projection(attention: Any) -> str | None:
    return _child(attention, OUT_NAMES)


def head_count(attention: Any, config: Any) -> int | None:
    """The attention module's number of query heads (its own attribute, else the config's)."""
    for source in (attention, getattr(attention, "config", None), config):
        for name in HEAD_COUNTS:
            value = getattr(source, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def describe_layer(layer: Any) -> str:
    """A layer's class and its non-norm submodules' classes, for messages ("JambaMambaDecoderLayer: JambaMambaMixer, JambaMLP")."""
    parts = [type(child).__name__ for name, child in layer.named_children() if "norm" not in name.lower() and "dropout" not in name.lower()]
    return f"{type(layer).__name__}" + (f": {', '.join(parts)}" if parts else "")


def input_width(module: Any) -> int:
    """A projection's input width: nn.Linear's in_features (times its groups, for a grouped linear
    that applies one block of in_features to each of `n_groups` slices: DeepSeek-V4's o_a_proj), or
    a GPT-2 style Conv1D's weight rows."""
    width = getattr(module, "in_features", None)
    if isinstance(width, int):
        groups = getattr(module, "n_groups", 1)
        return width * (groups if isinstance(groups, int) and groups > 1 else 1)
    return int(module.weight.shape[0])
