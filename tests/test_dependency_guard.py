"""Guards the transformers pin (<5.24): TransformerLens 4.3's KV-cache generate must stay correct.

transformers 5.24 renamed the output field `past_key_values` to `cache`; TransformerLens 4.3
still reads `past_key_values`, so every token after the first came out as '-'.
"""
from __future__ import annotations

import torch
import transformers
from packaging.version import Version


def test_transformers_version_is_inside_the_pin():
    assert Version("5.9") <= Version(transformers.__version__) < Version("5.24")


def test_bridge_kv_cache_generation_matches_plain_hf(default_scope, plain_hf):
    model = default_scope.model
    ids = torch.tensor([model.tokenize("The capital of France is")])
    with torch.no_grad():
        bridge_out = model.bridge.generate(ids, max_new_tokens=8, do_sample=False, use_past_kv_cache=True, verbose=False)
        hf_out = plain_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    bridge_text = model.decode(bridge_out[0, ids.shape[1]:].tolist())
    assert bridge_out[0].tolist() == hf_out[0].tolist(), bridge_text
    assert bridge_text.count("-") < 3
