"""Tiny random models of every decoder family: the packed engine's, the general path's, and those refused.

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
    drawn: tuple[str, ...] = ()
    """Weights (name endings) drawn here as N(0, 0.06), what the scaling below makes of the usual
    N(0, 0.02): ones the family's own init sets to zero (xLSTM's feed-forward gate, without which a
    fresh model's MLPs output nothing), and 3-D expert tensors, which the scaling leaves out, where
    experts are a family's only MLPs (MiniMax): else no patch of an MLP output could change the text."""

    def build(self, seed: int = 0) -> Any:
        import transformers

        config = getattr(transformers, self.config_class)(**{**COMMON, **self.extra})
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.config.architectures = [type(model).__name__]
        # Scale up the weights a little so that greedy decoding is not one repeated token.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if self.drawn and name.endswith(self.drawn):
                    p.normal_(0.0, 0.06)
                elif p.ndim == 2:
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

SSM = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=WINDOW, mamba_expand=2)
"""Mamba-2 mixers of the hybrids: 4 heads of 32 (= 2 x d_model), scanned in chunks of 8 tokens."""

GENERAL = [
    Family("mamba", "MambaConfig", "state-space (Mamba) layers: no attention, no MLP", {"state_size": 8}),
    Family("mamba2", "Mamba2Config", "state-space (Mamba-2) layers, scanned in 8-token chunks",
           {"num_heads": 4, "head_dim": 32, "n_groups": 1, "state_size": 16, "chunk_size": WINDOW, "time_step_rank": 8}),
    Family("falcon_mamba", "FalconMambaConfig", "state-space layers with normalised B, C and dt (FalconMamba)", {"state_size": 8}),
    Family("jamba", "JambaConfig", "Mamba and attention layers; dense and mixture-of-experts MLPs",
           {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 4,
            "mamba_dt_rank": 8, **MOE}),
    Family("bamba", "BambaConfig", "Mamba-2 and attention layers", {**SSM, "attn_layer_indices": [1]}),
    Family("zamba2", "Zamba2Config", "Mamba-2 layers and hybrid layers that add a shared attention block",
           {"layers_block_type": ["mamba", "hybrid", "mamba"], "n_mamba_heads": 4, "mamba_d_state": 16, "chunk_size": WINDOW,
            "adapter_rank": 8}),
    Family("falcon_h1", "FalconH1Config", "Mamba-2 beside attention in every layer; multipliers", {**SSM, "mamba_d_ssm": 128}),
    Family("nemotron_h", "NemotronHConfig", "Mamba-2, attention, MLP and mixture-of-experts blocks",
           {"layers_block_type": ["mamba", "attention", "mlp", "moe"], "mamba_num_heads": 4, "mamba_head_dim": 32, "n_groups": 1,
            "ssm_state_size": 16, "chunk_size": WINDOW, "head_dim": 16, "n_routed_experts": 4, "moe_intermediate_size": 32,
            "moe_shared_expert_intermediate_size": 32, **MOE}),
    Family("granitemoehybrid", "GraniteMoeHybridConfig", "Mamba-2 and attention layers; experts beside a shared MLP",
           {**SSM, "layer_types": ["mamba", "attention", "mamba"], "num_local_experts": 4, "shared_intermediate_size": 64, **MOE}),
    Family("recurrent_gemma", "RecurrentGemmaConfig", "recurrent (RG-LRU) and local-attention layers (Griffin)",
           {"lru_width": 64, "attention_window_size": WINDOW, "head_dim": 16, "num_key_value_heads": 1}),
    Family("lfm2", "Lfm2Config", "short convolutions and attention layers", {"layer_types": ["conv", "full_attention", "conv"], "full_attn_idxs": [1]}),
    Family("qwen3_next", "Qwen3NextConfig", "gated delta-net (linear attention) and gated attention layers; experts",
           {"layer_types": ["linear_attention", "full_attention", "linear_attention"], "head_dim": 16, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 4,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, **MOE}),
    Family("qwen3_5_text", "Qwen3_5TextConfig", "gated delta-net (linear attention) and gated attention layers",
           {"layer_types": ["linear_attention", "full_attention", "linear_attention"], "head_dim": 16, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4}),
    Family("gemma4_text", "Gemma4TextConfig", "sliding and global layers of other head sizes, shared key/value layers, per-layer inputs",
           {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "num_kv_shared_layers": 2,
            "head_dim": 16, "global_head_dim": 32, "sliding_window": WINDOW, "vocab_size_per_layer_input": 49152,
            "hidden_size_per_layer_input": 8}),
    Family("llama4_text", "Llama4TextConfig", "attention in 8-token chunks and global layers; dense and expert MLPs",
           {"attention_chunk_size": WINDOW, "head_dim": 16, "num_local_experts": 4, "interleave_moe_layer_step": 2,
            "intermediate_size_mlp": 128, "no_rope_layer_interval": 3, **MOE}),
    Family("mpt", "MptConfig", "ALiBi in boolean masks; multi-head", {"d_model": 64, "n_heads": 4, "n_layers": 3, "expansion_ratio": 2, "max_seq_len": 512}),
    Family("rwkv", "RwkvConfig", "recurrent (RWKV-4) time and channel mixing", {"attention_hidden_size": 64, "context_length": 512}),
    Family("openai_gpt", "OpenAIGPTConfig", "learned absolute; blocks without a key/value cache (GPT-1)", {"n_positions": 512}),
    Family("olmo_hybrid", "OlmoHybridConfig", "gated delta-net and post-norm attention layers",
           {"layer_types": ["linear_attention", "full_attention", "linear_attention"], "linear_num_key_heads": 2,
            "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 32}),
    Family("deepseek_v4", "DeepseekV4Config",
           "2 hyper-connection residual streams; sliding, compressed-sparse (indexer) and heavily compressed attention; hash and routed experts",
           {"layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            "mlp_layer_types": ["hash_moe", "moe", "moe"], "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": WINDOW},
            "sliding_window": WINDOW, "hc_mult": 2, "num_key_value_heads": 1, "head_dim": 16, "q_lora_rank": 32, "o_groups": 2,
            "o_lora_rank": 16, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 2, "n_routed_experts": 4,
            "moe_intermediate_size": 32, **MOE}),
    Family("kimi_linear", "KimiLinearConfig", "Kimi delta attention (linear) and latent (MLA) attention layers; dense and expert MLPs",
           {"layer_types": ["linear_attention", "full_attention", "linear_attention"], "mlp_layer_types": ["dense", "sparse", "sparse"],
            "linear_num_heads": 4, "linear_head_dim": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
            "v_head_dim": 16, "num_key_value_heads": 4, "num_experts": 4, "moe_intermediate_size": 32, **MOE}),
    Family("minimax", "MiniMaxConfig", "lightning (linear, 8-token blocks) and full attention layers; mixture of experts",
           {"layer_types": ["linear_attention", "full_attention", "linear_attention"], "block_size": WINDOW, "num_local_experts": 4,
            "head_dim": 16, **MOE}, drawn=("experts.gate_up_proj", "experts.down_proj")),
    Family("xlstm", "xLSTMConfig", "recurrent (mLSTM) layers scanned in 8-token chunks; gated MLP",
           {"num_heads": 4, "chunk_size": WINDOW, "qk_dim_factor": 1.0}, drawn=("ffn.proj_up_gate.weight",)),
    Family("lfm2_moe", "Lfm2MoeConfig", "short convolutions and attention layers; dense and expert MLPs",
           {"layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 2, "num_experts": 4, "moe_intermediate_size": 32, **MOE}),
    Family("zamba", "ZambaConfig", "Mamba layers and hybrid layers that share one attention block",
           {"layers_block_type": ["hybrid", "mamba", "hybrid"], "n_mamba_heads": 2}),
]
"""Families the packed engine cannot run exactly: they run on the general path (their own forward
and generate). Each mixes its layer kinds within 3-4 layers, with windows and chunks of 8 tokens."""

REFUSED = [
    Family("bert", "BertConfig", "an encoder run as a decoder (BertLMHeadModel)", {"is_decoder": True}),
    Family("roberta", "RobertaConfig", "an encoder run as a decoder (RobertaForCausalLM)", {"is_decoder": True}),
    Family("bart", "BartConfig", "the decoder half of an encoder-decoder model (BartForCausalLM)"),
]
"""What neither path can run: a ModelLoadError at load time, naming the architecture and why."""
