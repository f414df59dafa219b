"""Sparse MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers' implementation, and the
checkpoint layouts the MoE loader accepts."""

from __future__ import annotations

import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from tests.test_models import assert_close, run_pagedlm

MOE_TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def hf_tiny_moe(kind: str, **overrides):
    """A tiny random HF MoE model (seeded): 4 experts, top-2."""
    import transformers as T

    torch.manual_seed(0)
    kw = {**MOE_TINY, **overrides}
    if kind == "mixtral":
        cfg, cls = T.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **kw}), T.MixtralForCausalLM
    elif kind == "qwen2_moe":
        # Layer 1 sparse only every 2nd layer would leave 1 MoE layer; keep both sparse, shared expert on.
        cfg = T.Qwen2MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                  "shared_expert_intermediate_size": 48, "norm_topk_prob": False, **kw})
        cls = T.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                  "head_dim": 16, "norm_topk_prob": True, **kw})
        cls = T.Qwen3MoeForCausalLM
    else:
        raise ValueError(kind)
    model = cls(cfg).eval()
    # transformers initialises the routers to zero (Qwen) or tiny values: give them real spread so
    # the top-k choice matters and differs between tokens.
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_logits_match_transformers(kind, tmp_path):
    hf = hf_tiny_moe(kind)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.is_moe and all(cfg.moe_layers)
    model = load_model(str(tmp_path), cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(run_pagedlm(model, ids, prefill=11), ref)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_fused_3d_expert_checkpoint_loads(kind, tmp_path):
    """Checkpoints holding transformers 5's in-memory names (fused ``experts.gate_up_proj`` /
    ``experts.down_proj`` 3-D tensors, Mixtral under ``mlp``) load to the same model."""
    from safetensors.torch import save_file

    hf = hf_tiny_moe(kind)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = load_model(str(tmp_path), cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(run_pagedlm(model, ids, prefill=5), ref)


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from pagedlm.errors import ModelLoadError

    hf_tiny_moe("qwen3_moe").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_model(str(tmp_path), ModelConfig.from_pretrained(str(tmp_path)), torch.float32)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_bf16_weights_fp32_compute_on_cpus_without_native_bf16(kind, tmp_path, monkeypatch):
    """Forced no-native-bf16 policy (bf16 weights, fp32 activations): the router, the fused experts
    and the shared expert multiply through ``matmul.linear`` like dense layers (``F.linear`` of a
    bf16 weight and an fp32 input would raise), and the logits are those of the same model with
    bf16-rounded weights computed in float32 (few-row matmuls round their input to bf16: looser
    tolerance than float32)."""
    from pagedlm.model.layers import matmul

    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: False)
    hf = hf_tiny_moe(kind)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = load_model(str(tmp_path), cfg, torch.bfloat16)
    mlp = model.model.layers["0"].mlp
    assert mlp.experts.gate_up_proj.dtype == torch.bfloat16 and mlp.gate.weight.dtype == torch.bfloat16
    if kind == "qwen2_moe":
        assert mlp.shared_expert.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = run_pagedlm(model, ids, prefill=11)
    assert ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= 0.03 * ref.abs().max().item(), err
