"""An independent Patchscopes implementation in plain HF forward hooks, for correctness tests.

It shares no code with pytest_patchscope: a fresh (unbridged) HF model, `register_forward_hook`
on the decoder layers, the whole target prompt in one pass and `model.generate` for decoding,
patching only the prompt pass (sequence length > 1), as in the paper's official code.
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


def source_state(model, source_ids, source_index, layer):
    """The output of decoder layer `layer` (pre final norm) at `source_index`."""
    store = {}

    def hook(module, args, output):
        store["h"] = _hidden(output)[0, source_index].detach().clone()

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.tensor([source_ids]))
    finally:
        handle.remove()
    return store["h"]


def patched_generate(model, target_ids, target_index, target_layer, vector, max_new_tokens, strength=1.0, eos=None):
    """Greedy continuation (new token ids) of `target_ids` with the prompt pass patched."""

    def hook(module, args, output):
        hidden = _hidden(output)
        if hidden.shape[1] > 1:
            clean = hidden[:, target_index].clone()
            hidden[:, target_index] = clean + strength * (vector - clean)
        return output

    handle = None
    if vector is not None:
        handle = decoder_layers(model)[target_layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ids = torch.tensor([target_ids])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
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
