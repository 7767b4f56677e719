"""Tiny random models of every decoder family the engine supports, and of those it refuses.

Each is a transformers config class with small sizes plus `from_config`: 3 layers, d_model 64,
the default model's 49k vocabulary (so prompts tokenize realistically) and a sliding window of 8
tokens where the family has one, so that a 20-token prompt already crosses it. What each covers
(positions, attention kind, MLP kind) is written beside it and goes into README's coverage table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

WINDOW = 8
COMMON: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
MOE = dict(num_experts_per_tok=2)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
"""Families whose default pattern (5:1, 3:1) would make all 3 tiny layers sliding get both kinds."""


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    features: str
    """Positions; attention; MLP; embeddings: what this family adds to the matrix."""
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> Any:
        import transformers

        config = getattr(transformers, self.config_class)(**{**COMMON, **self.extra})
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.config.architectures = [type(model).__name__]
        # Scale up the weights a little so that greedy decoding is not one repeated token.
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(3.0)
        return model.eval()


SUPPORTED = [
    Family("llama", "LlamaConfig", "rotary; grouped-query; gated MLP"),
    Family("mistral", "MistralConfig", "rotary; grouped-query, sliding window on every layer; gated MLP", {"sliding_window": WINDOW}),
    Family("mixtral", "MixtralConfig", "rotary; grouped-query, sliding window; mixture of experts", {"sliding_window": WINDOW, "num_local_experts": 4, **MOE}),
    Family("qwen2", "Qwen2Config", "rotary; grouped-query with q/k/v biases; gated MLP"),
    Family("qwen2_moe", "Qwen2MoeConfig", "rotary; grouped-query; mixture of experts with a shared expert",
           {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, **MOE}),
    Family("qwen3", "Qwen3Config", "rotary; grouped-query with q/k norms; gated MLP", {"head_dim": 16}),
    Family("qwen3_moe", "Qwen3MoeConfig", "rotary; grouped-query with q/k norms; mixture of experts",
           {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **MOE}),
    Family("gemma", "GemmaConfig", "rotary; grouped-query; GeGLU; scaled tied embeddings", {"head_dim": 16}),
    Family("gemma2", "Gemma2Config", "rotary; alternating sliding/global, logit soft-capping; GeGLU", {"head_dim": 16, "sliding_window": WINDOW}),
    Family("gemma3_text", "Gemma3TextConfig", "rotary (local and global bases); sliding and global layers; GeGLU",
           {"head_dim": 16, "sliding_window": WINDOW, "layer_types": MIXED}),
    Family("phi", "PhiConfig", "partial rotary; parallel attention + MLP; untied embeddings"),
    Family("phi3", "Phi3Config", "rotary; fused qkv; gated MLP"),
    Family("gpt2", "GPT2Config", "learned absolute; multi-head; GELU MLP; tied embeddings"),
    Family("opt", "OPTConfig", "learned absolute (offset 2); multi-head; ReLU MLP", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    Family("olmo", "OlmoConfig", "rotary; non-parametric layer norm; gated MLP"),
    Family("olmo2", "Olmo2Config", "rotary; q/k norms, post-norm; gated MLP"),
    Family("olmo3", "Olmo3Config", "rotary; sliding and global layers; gated MLP", {"sliding_window": WINDOW, "layer_types": MIXED}),
    Family("stablelm", "StableLmConfig", "partial rotary; grouped-query; gated MLP"),
    Family("cohere", "CohereConfig", "rotary (interleaved); parallel attention + MLP; scaled logits"),
    Family("cohere2", "Cohere2Config", "rotary on sliding layers only; sliding and global layers; parallel blocks",
           {"sliding_window": WINDOW, "layer_types": MIXED}),
    Family("granite", "GraniteConfig", "rotary; grouped-query; residual and logit multipliers"),
    Family("starcoder2", "Starcoder2Config", "rotary; grouped-query, sliding window; GELU MLP with biases", {"sliding_window": WINDOW}),
    Family("gpt_oss", "GptOssConfig", "rotary (YaRN); alternating sliding/global with sinks; mixture of experts",
           {"sliding_window": WINDOW, "num_local_experts": 4, "head_dim": 16, "max_position_embeddings": 4096, **MOE}),
    Family("deepseek_v3", "DeepseekV3Config", "rotary; multi-head latent attention; routed + shared experts",
           {"n_routed_experts": 4, "moe_intermediate_size": 32, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
            "num_key_value_heads": 4, **MOE}),
    Family("gpt_neox", "GPTNeoXConfig", "partial rotary; parallel attention + MLP; untied embeddings (Pythia)"),
    Family("gptj", "GPTJConfig", "partial interleaved rotary; parallel attention + MLP", {"rotary_dim": 8}),
    Family("gpt_neo", "GPTNeoConfig", "learned absolute; global and local (windowed) layers",
           {"window_size": WINDOW, "attention_types": [[["global", "local", "local"], 1]]}),
    Family("codegen", "CodeGenConfig", "partial rotary; fused qkv; parallel attention + MLP", {"rotary_dim": 8}),
    Family("gpt_bigcode", "GPTBigCodeConfig", "learned absolute; multi-query attention (StarCoder)"),
    Family("falcon", "FalconConfig", "rotary; multi-query; parallel attention + MLP"),
    Family("falcon_grouped", "FalconConfig", "rotary; grouped-query, fused per-group QKV; parallel attention + MLP, two norms (Falcon-40B/180B)",
           {"new_decoder_architecture": True, "num_kv_heads": 2}),
    Family("xglm", "XGLMConfig", "sinusoidal absolute; multi-head; scaled embeddings"),
    Family("bloom", "BloomConfig", "ALiBi; multi-head; embedding layer norm (BLOOM)"),
    Family("falcon_alibi", "FalconConfig", "ALiBi folded into per-head masks; multi-query (Falcon-RW)", {"alibi": True}),
]

REFUSED = [
    Family("mamba", "MambaConfig", "state-space layers"),
    Family("rwkv", "RwkvConfig", "recurrent layers"),
    Family("jamba", "JambaConfig", "hybrid attention/Mamba layers"),
    Family("mpt", "MptConfig", "ALiBi folded into boolean masks"),
    Family("openai_gpt", "OpenAIGPTConfig", "blocks without a key/value cache"),
    Family("gemma4_text", "Gemma4TextConfig", "per-layer head dimensions, key/value layers shared across layers", {"head_dim": 16}),
    Family("qwen3_next", "Qwen3NextConfig", "hybrid linear/full attention layers"),
    Family("llama4_text", "Llama4TextConfig", "chunked attention layers"),
    Family("modernbert_decoder", "ModernBertDecoderConfig", "bidirectionally trained layers run causally"),
    Family("bert", "BertConfig", "an encoder run as a decoder (BertLMHeadModel)", {"is_decoder": True}),
]
