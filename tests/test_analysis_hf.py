"""Cross-check: analysis parameter counts equal transformers' own models, for tiny random configs.

This test imports torch and transformers (the analysis package itself never does).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagedlm.analysis import count_parameters  # noqa: E402
from pagedlm.analysis.flops import matmul_weights_per_token  # noqa: E402
from pagedlm.config import ModelConfig  # noqa: E402

T = transformers
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    yield "llama", T.LlamaConfig(**SMALL)
    yield "llama-bias-tied", T.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    yield "mistral", T.MistralConfig(**SMALL, sliding_window=16)
    yield "qwen2", T.Qwen2Config(**SMALL)
    yield "qwen3", T.Qwen3Config(**SMALL, head_dim=16)
    yield "qwen3-bias", T.Qwen3Config(**SMALL, head_dim=16, attention_bias=True, tie_word_embeddings=True)
    yield "gpt2", T.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    yield "gpt2-n_inner", T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40)
    yield "gemma3", T.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    yield "mixtral", T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    yield "qwen2moe", T.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=40, decoder_sparse_step=1,
                                       mlp_only_layers=[1])
    yield "qwen3moe", T.Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[])
    yield "deepseek_v3", T.DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64)


CONFIGS = dict(_configs())


def _hf_model(hf_cfg):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(hf_cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_matches_transformers(name):
    hf_cfg = CONFIGS[name]
    model = _hf_model(hf_cfg)
    hf_total = sum(p.numel() for p in model.parameters())
    # DeepSeek-V3's router bias is a buffer in transformers but a tensor in the checkpoint; we count it.
    hf_total += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert count_parameters(cfg).total == hf_total, name


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "mixtral", "qwen2moe", "deepseek_v3", "gpt2"])
def test_matmul_weights_match_linear_layers(name):
    """FLOPs count 2 per weight of every linear layer a token passes; check against the model's
    nn.Linear / Conv1D / expert tensors (routed experts scaled to top-k of E)."""
    hf_cfg = CONFIGS[name]
    model = _hf_model(hf_cfg)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    n = 0
    for mod_name, mod in model.model.named_modules() if hasattr(model, "model") else model.transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            n += mod.weight.numel()
        elif mod_name.endswith("mlp.gate") and hasattr(mod, "weight") and mod.weight.dim() == 2:
            n += mod.weight.numel()  # routers written as a bare parameter
        elif mod_name.endswith("experts") and hasattr(mod, "gate_up_proj"):
            per_expert = (mod.gate_up_proj.numel() + mod.down_proj.numel()) // cfg.num_experts
            n += per_expert * cfg.num_experts_per_tok
    assert matmul_weights_per_token(cfg) == n, name
