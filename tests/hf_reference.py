"""An independent Patchscopes implementation in plain HF forward hooks, for correctness tests.

It shares no code with pytest_patchscope: a fresh (unbridged) HF model, `register_forward_hook`
on the decoder layers (or on the submodules named in SUBMODULES, written out here per family
rather than read from TransformerLens as the engine does), the whole target prompt in one pass
and `model.generate` for decoding, patching only the prompt pass (the hook's first call: the
paper's official code tells it by its length, which a layer that keeps only the last token would
defeat). It runs every family of tests/families.py, the state-space, recurrent and hybrid ones
included (SUBMODULES names their sites, per layer where layers differ). Sampling is
`model.generate(do_sample=True)` after `torch.manual_seed`, with HF's own logits processors; candidates are scored by one full forward of target + candidate (no
cache at all), the patch written into the target's tokens.
"""
from __future__ import annotations

import torch


def decoder_layers(model):
    """The model's decoder layers: the ModuleList with one entry per hidden layer (any family's naming)."""
    n = model.config.num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    assert found, f"no ModuleList of {n} layers in {type(model).__name__}"
    return found[0]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _llama_like(attn="self_attn", mlp="mlp", down="mlp.down_proj", o="self_attn.o_proj"):
    sites = {"mlp_out": (mlp, "output")}
    for site, path, side in (("attn_out", attn, "output"), ("heads", o, "input"), ("neurons", down, "input")):
        if path is not None:
            sites[site] = (path, side)
    return sites


_POST_NORMED = _llama_like(attn="post_attention_layernorm", mlp="post_feedforward_layernorm")
_MOE = _llama_like(down=None)
SUBMODULES = {
    **{t: _llama_like() for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "stablelm", "cohere", "cohere2", "granite", "phi3")},
    **{t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")},
    **{t: _POST_NORMED for t in ("gemma2", "gemma3_text", "olmo2", "olmo3")},
    "phi": _llama_like(down="mlp.fc2", o="self_attn.dense"),
    "gpt2": _llama_like(attn="attn", down="mlp.c_proj", o="attn.c_proj"),
    "gpt_bigcode": _llama_like(attn="attn", down="mlp.c_proj", o="attn.c_proj"),
    "opt": _llama_like(mlp="fc2", down="fc2", o="self_attn.out_proj"),
    "xglm": _llama_like(mlp="fc2", down="fc2", o="self_attn.out_proj"),
    "starcoder2": _llama_like(down="mlp.c_proj"),
    "gpt_neox": _llama_like(attn="attention", down="mlp.dense_4h_to_h", o="attention.dense"),
    "gptj": _llama_like(attn="attn", down="mlp.fc_out", o="attn.out_proj"),
    "codegen": _llama_like(attn="attn", down="mlp.fc_out", o="attn.out_proj"),
    "gpt_neo": _llama_like(attn="attn", down="mlp.c_proj", o="attn.attention.out_proj"),
    "falcon": _llama_like(attn="self_attention", down="mlp.dense_4h_to_h", o="self_attention.dense"),
    # BLOOM's attention and MLP modules add the residual themselves: their projections' outputs are the sublayers'.
    "bloom": _llama_like(attn="self_attention.dense", mlp="mlp.dense_4h_to_h", down="mlp.dense_4h_to_h", o="self_attention.dense"),
    # General-path families. Hybrids differ by layer: a site whose submodule a layer lacks is not in that layer.
    **{t: {} for t in ("mamba", "mamba2", "falcon_mamba", "zamba2")},
    **{t: _llama_like(mlp="feed_forward", down="feed_forward.down_proj") for t in ("jamba", "bamba", "falcon_h1", "llama4_text")},
    "granitemoehybrid": {"attn_out": ("self_attn", "output"), "heads": ("self_attn.o_proj", "input")},
    "lfm2": _llama_like(mlp="feed_forward", down="feed_forward.w2", o="self_attn.out_proj"),
    "qwen3_next": _MOE,
    "qwen3_5_text": _llama_like(),
    "gemma4_text": _POST_NORMED,
    "mpt": _llama_like(attn="attn", mlp="ffn", down="ffn.down_proj", o="attn.out_proj"),
    "rwkv": {"attn_out": ("attention", "output"), "mlp_out": ("feed_forward", "output")},
    "openai-gpt": _llama_like(attn="attn", down="mlp.c_proj", o="attn.c_proj"),
    # Sites that depend on which token mixer (or MLP) a layer has, by that module's class.
    "nemotron_h": lambda block: {
        "NemotronHAttention": {"attn_out": ("mixer", "output"), "heads": ("mixer.o_proj", "input")},
        "NemotronHMLP": {"mlp_out": ("mixer", "output"), "neurons": ("mixer.down_proj", "input")},
        "NemotronHMoE": {"mlp_out": ("mixer", "output")},
    }.get(type(block.mixer).__name__, {}),
    "recurrent_gemma": lambda block: {
        "mlp_out": ("mlp_block", "output"), "neurons": ("mlp_block.down_proj", "input"),
        **({"attn_out": ("temporal_block", "output"), "heads": ("temporal_block.o_proj", "input")}
           if "Attention" in type(block.temporal_block).__name__ else {}),
    },
    "olmo_hybrid": lambda block: _POST_NORMED if hasattr(block, "self_attn") else _llama_like(attn=None, o=None),
    # DeepSeek-V4: the heads enter its grouped output projection (o_a_proj) side by side; experts only.
    "deepseek_v4": _llama_like(down=None, o="self_attn.o_a_proj"),
    "kimi_linear": _llama_like(),  # both token mixers (delta and latent attention) are its self_attn, with an o_proj
    "minimax": lambda block: _llama_like(down=None, o="self_attn.out_proj" if "Lightning" in type(block.self_attn).__name__ else "self_attn.o_proj"),
    "xlstm": {"mlp_out": ("ffn", "output"), "neurons": ("ffn.proj_down", "input")},
    "lfm2_moe": _llama_like(mlp="feed_forward", down="feed_forward.w2", o="self_attn.out_proj"),
    "zamba": {},
}
"""model_type -> {site: (submodule of the decoder layer, whether the site is its input or output)}, or a
function of the decoder layer giving that (families whose layers differ by their token mixer)."""


def layer_sites(model, layer):
    """The sites of decoder layer `layer`: the residual before and after it, and every site whose
    submodule that layer has."""
    block = decoder_layers(model)[layer]
    found = {"resid_pre", "resid_post"}
    for site, (path, _) in _sites_of(model, block).items():
        try:
            block.get_submodule(path)
        except AttributeError:
            continue
        found.add(site)
    return found


def _sites_of(model, block):
    spec = SUBMODULES[model.config.model_type]
    return spec(block) if callable(spec) else spec


def _n_heads(model):
    config = model.config
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or config.num_heads


def _hook(model, layer, site, edit):
    """Register `edit(value) -> value` on the site of decoder layer `layer`; value is (tokens, width)."""
    block = decoder_layers(model)[layer]
    if site in ("resid_post", "resid_pre"):
        module, side = block, "output" if site == "resid_post" else "input"
    else:
        path, side = _sites_of(model, block)[site]
        module = block.get_submodule(path)

    def apply(value):
        # One row per token: (batch, tokens, ...) -> (tokens, everything at a token), e.g. DeepSeek-V4's
        # (1, tokens, hc_mult, d_model) residual streams side by side; a mixture of experts' (tokens, width) as it is.
        flat = value.reshape(value.shape[0] * value.shape[1], -1) if value.dim() > 2 else value
        return edit(flat).reshape(value.shape)

    if side == "output":
        def after(module, args, output):
            if isinstance(output, (tuple, list)):  # GPT-1's blocks return lists
                return type(output)([apply(output[0]), *output[1:]])
            return apply(output)

        return module.register_forward_hook(after)

    def before(module, args, kwargs):
        if args:
            return (apply(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(before, with_kwargs=True)


def _shape(model, site, width):
    return (_n_heads(model), width // _n_heads(model)) if site == "heads" else (width,)


def source_state(model, source_ids, source_index, layer, site="resid_post"):
    """The site's value in decoder layer `layer` at `source_index` (resid_post: the layer's output,
    pre final norm); heads come as (n_heads, d_head)."""
    store = {}

    def keep(flat):
        store["h"] = flat[source_index].detach().clone().view(_shape(model, site, flat.shape[-1]))
        return flat

    handle = _hook(model, layer, site, keep)
    try:
        with torch.no_grad():
            model(torch.tensor([source_ids]))
    finally:
        handle.remove()
    return store["h"]


def _patch_hook(model, target_index, target_layer, vector, strength, site, units, prompt_length):
    """The hook writing `vector` at the target's `target_index` (a list: pairwise or one for all)
    in the prompt pass (the hook's first call, over the `prompt_length` tokens given), and in any
    later pass that computes the prompt again (no cache); None when vector is None (a clean run).
    A layer that computes only the prompt's last tokens (Gemma 4's layers that share keys/values,
    under generate) is handed those: indices count from the end."""
    if vector is None:
        return None
    indices = list(target_index) if isinstance(target_index, (list, tuple)) else [target_index]
    vectors = list(vector) if isinstance(vector, (list, tuple)) else [vector] * len(indices)
    calls = []

    def write(flat):
        calls.append(flat.shape[0])
        # The prompt pass; or a model without a cache (GPT-1), which computes the prompt again at every step.
        if len(calls) == 1 or flat.shape[0] > prompt_length:
            shape = _shape(model, site, flat.shape[-1])
            for index, value in zip(indices, vectors):
                if len(calls) == 1:
                    index -= prompt_length - flat.shape[0]
                clean = flat[index].clone().view(shape)
                patched = clean + strength * (value.view(shape) - clean)
                if units is not None:
                    kept = clean.clone()
                    kept[list(units)] = patched[list(units)]
                    patched = kept
                flat[index] = patched.reshape(-1)
        return flat

    return _hook(model, target_layer, site, write)


def patched_generate(
    model, target_ids, target_index, target_layer, vector, max_new_tokens, strength=1.0, eos=None, site="resid_post", units=None,
    seed=None, **generation,
):
    """Greedy continuation (new token ids) of `target_ids` with the prompt pass patched.

    `target_index` may be a list, with `vector` one tensor for all of them or a list of one per index;
    `units` are indices of the site's first axis (heads for "heads"); only they are written.
    `generation` goes to `model.generate` (do_sample, temperature, top_k, top_p,
    repetition_penalty, no_repeat_ngram_size); `seed` seeds torch's global generator first.
    """
    settings = {"do_sample": False, **generation}
    if settings["do_sample"]:
        settings = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, **settings}  # HF's defaults would cut at top_k=50
    handle = _patch_hook(model, target_index, target_layer, vector, strength, site, units, len(target_ids))
    try:
        with torch.no_grad():
            ids = torch.tensor([target_ids])
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=0,
                **settings,
            )
    finally:
        if handle is not None:
            handle.remove()
    new = out[0, len(target_ids):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new


def patched_next_token_logits(model, target_ids, target_index, target_layer, vector):
    """Logits at the last position of one forward of the target with h[target_layer][target_index] := vector."""

    def hook(module, args, output):
        _hidden(output)[:, target_index] = vector
        return output

    handle = decoder_layers(model)[target_layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(torch.tensor([target_ids])).logits[0, -1]
    finally:
        handle.remove()


def candidate_logprobs(
    model, target_ids, target_index, target_layer, vector, candidate_ids, strength=1.0, site="resid_post", units=None, tie=1e-5
):
    """Per-token log-probabilities of `candidate_ids` after the (patched) target: one forward of
    target + candidate, no cache, the patch written into the target's tokens. The first token's
    rank comes as a (low, high) band: the ranks it has if tokens within `tie` nats count either way
    (a random tiny model's near-flat distribution has ties at float precision)."""
    handle = _patch_hook(model, target_index, target_layer, vector, strength, site, units, len(target_ids) + len(candidate_ids))
    try:
        with torch.no_grad():
            ids = torch.tensor([list(target_ids) + list(candidate_ids)])
            logits = model(ids).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()
    logprobs = torch.log_softmax(logits[len(target_ids) - 1: -1], dim=-1)
    values = [float(logprobs[k, token]) for k, token in enumerate(candidate_ids)]
    first, value = logprobs[0], logprobs[0][candidate_ids[0]]
    return values, (int((first > value + tie).sum()), int((first > value - tie).sum()))
