"""KV cache bytes, memory budget, FLOPs (checked against brute force and the notes) and roofline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedlm.analysis import count_parameters, kv_cache_bytes, kv_cache_bytes_per_token, max_seq_in_budget
from pagedlm.analysis import flops as fl
from pagedlm.analysis.hardware import HARDWARE, parse_hardware
from pagedlm.analysis.memory import kv_bytes_per_token_layer, weights_per_stage
from pagedlm.analysis.roofline import decode_roofline, expected_distinct_experts, max_memory_bound_batch
from pagedlm.config import ModelConfig

DATA = Path(__file__).parent / "data"


def cfg(name: str) -> ModelConfig:
    return ModelConfig.from_pretrained(DATA / f"{name}.json")


# ---- KV cache --------------------------------------------------------------------------------
def test_kv_bytes_per_token_known_models():
    assert kv_cache_bytes_per_token(cfg("Meta-Llama-3-8B"), 2) == 32 * 2 * 8 * 128 * 2 == 131_072  # GQA
    assert kv_cache_bytes_per_token(cfg("Llama-2-7b-hf"), 2) == 32 * 2 * 32 * 128 * 2 == 524_288  # MHA
    assert kv_cache_bytes_per_token(cfg("gpt2"), 4) == 12 * 2 * 12 * 64 * 4
    assert kv_cache_bytes_per_token(cfg("SmolLM2-135M"), 2) == 30 * 2 * 3 * 64 * 2
    assert kv_cache_bytes_per_token(cfg("Llama-3.1-405B"), 1) == 126 * 2 * 8 * 128  # fp8 cache
    assert kv_cache_bytes_per_token(cfg("gemma-3-270m"), 0.5) == 18 * 2 * 1 * 256 // 2


def test_kv_mla_latent_matches_seeds_deepseek_example():
    """seeds/000: DeepSeek-V3, B=16, L=61, c_kv=512, k_r=64, bf16: B L (c_kv + k_r) 2 ~ 1.07 MB per
    token step, and S=1024 "about 1GB". Right, in binary units: 1,124,352 B = 1.07 MiB and
    1,151,336,448 B = 1.07 GiB (1.15 GB)."""
    ds = cfg("DeepSeek-V3")
    assert kv_bytes_per_token_layer(ds, 0, 2) == (512 + 64) * 2
    per_token = kv_cache_bytes_per_token(ds, 2)
    assert per_token == 61 * 576 * 2 == 70_272
    assert 16 * per_token == 1_124_352 and round(16 * per_token / 2**20, 2) == 1.07
    assert kv_cache_bytes(ds, 16, 1024, 2) == 1_151_336_448
    assert round(kv_cache_bytes(ds, 16, 1024, 2) / 2**30, 2) == 1.07
    # The latent is not split by TP: every rank holds it whole.
    assert kv_bytes_per_token_layer(ds, 0, 2, tp=8) == 1152


def test_sliding_window_layers_hold_at_most_the_window():
    g = cfg("gemma-3-270m")  # 15 sliding layers (window 512) + 3 global layers, 1 KV head of 256
    per_layer = 2 * 256 * 2
    assert kv_cache_bytes(g, 1, 512, 2) == 18 * 512 * per_layer
    assert kv_cache_bytes(g, 2, 4096, 2) == 2 * (3 * 4096 + 15 * 512) * per_layer
    mistral = ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "sliding_window": 16})
    assert kv_cache_bytes(mistral, 1, 1000, 2) == kv_cache_bytes(mistral, 1, 16, 2)
    assert max_seq_in_budget(mistral, 10**9, 2) is None  # never grows past the window


@pytest.mark.parametrize("name", ["Meta-Llama-3-8B", "gemma-3-270m", "DeepSeek-V3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_max_seq_in_budget_is_the_last_length_that_fits(name, batch):
    c = cfg(name)
    budget = 3 * 2**30 + 12345
    s = max_seq_in_budget(c, budget, 2, batch)
    assert s > 0
    assert kv_cache_bytes(c, batch, s, 2) <= budget < kv_cache_bytes(c, batch, s + 1, 2)


def test_kv_per_device_under_tp():
    c = cfg("Meta-Llama-3-8B")
    assert kv_bytes_per_token_layer(c, 0, 2, tp=4) == 2 * 2 * 128 * 2
    assert kv_bytes_per_token_layer(c, 0, 2, tp=16) == 2 * 1 * 128 * 2  # 8 KV heads replicated over 16


def test_weights_per_stage_sum_and_split():
    c = cfg("Meta-Llama-3-8B")
    total = count_parameters(c).total
    assert weights_per_stage(c, 2) == [total * 2]
    assert sum(weights_per_stage(c, 2, pp=4)) == total * 2  # untied: nothing duplicated
    tp8 = weights_per_stage(c, 2, tp=8)[0]
    assert total * 2 / 8 < tp8 < total * 2 / 7  # only norms are replicated
    mix = cfg("Mixtral-8x7B-v0.1")
    p = count_parameters(mix)
    ep = weights_per_stage(mix, 2, ep=8)[0]
    assert ep == pytest.approx((p.total - p.experts + p.experts / 8) * 2)


# ---- FLOPs -----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.one_of(st.none(), st.integers(1, 200)))
def test_keys_scored_matches_brute_force(start, n, window):
    brute = sum(min(p, window) if window else p for p in range(start + 1, start + n + 1))
    assert fl.keys_scored(start, n, window) == brute


def _tiny_gemma() -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["Gemma3ForCausalLM"], "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})


def test_attention_flops_brute_force_with_windows_and_gqa():
    c = _tiny_gemma()
    ctx, new = 7, 9
    brute = 0
    for layer in range(3):
        for pos in range(ctx, ctx + new):  # 0-based position of each new query
            keys = [k for k in range(pos + 1) if not c.is_sliding(layer) or pos - k < c.sliding_window]
            brute += len(keys) * (2 * 4 * 16 + 2 * 4 * 16)  # QK^T and PV over all 4 query heads
    assert fl.forward_flops(c, new, ctx).attention == brute
    # GQA does not change attention FLOPs (every query head scores every key), only the projections.
    mha = replace(c, num_key_value_heads=4)
    assert fl.forward_flops(mha, new, ctx).attention == brute
    assert fl.forward_flops(mha, new, ctx).matmul - fl.forward_flops(c, new, ctx).matmul == \
        2 * new * 3 * 2 * 32 * (4 - 2) * 16


@pytest.mark.parametrize("name", ["Meta-Llama-3-8B", "gemma-3-270m", "DeepSeek-V3", "gpt2"])
def test_chunked_prefill_adds_up(name):
    c = cfg(name)
    whole = fl.forward_flops(c, 1000, 0, logits_tokens=1)
    parts = fl.forward_flops(c, 600, 0, logits_tokens=0) + fl.forward_flops(c, 400, 600, logits_tokens=1)
    assert parts == whole


def test_decode_matmul_is_two_flops_per_weight():
    c = cfg("Meta-Llama-3-8B")
    p = count_parameters(c)
    d = fl.decode_flops(c, 1)
    assert d.matmul == 2 * (p.total - p.embedding - p.norms)  # every weight but the lookup table and norms
    assert d.attention == 32 * 4 * 32 * 128  # one key (itself)
    mix = cfg("Mixtral-8x7B-v0.1")
    pm = count_parameters(mix)
    assert fl.decode_flops(mix, 1).matmul == 2 * (pm.active - pm.embedding - pm.norms)


def test_seeds_training_forward_formula_exact_for_mha():
    """seeds/002 section 14: layers (6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2) + layers 6bshi + 2bshv.
    For MHA (Llama-2-7B) our matmul + attention count plus the notes' softmax term 3bs^2n is
    exactly the notes' formula."""
    c = cfg("Llama-2-7b-hf")
    b, s = 2, 4096
    ours = fl.training_forward_flops_exact(c, b, s).total + fl.seeds_softmax_flops(c, b, s)
    assert ours == fl.seeds_training_forward_flops(c, b, s)


def test_seeds_training_forward_formula_overcounts_gqa():
    """Corrected for GQA: the notes' 6bsh^2 for X W_Q, X W_K, X W_V assumes K and V of width h.
    Llama-3-8B's are 8 x 128 = 1024 wide: the formula over-counts by layers * 4bsh(h - 1024)."""
    c = cfg("Meta-Llama-3-8B")
    b, s, h = 1, 8192, 4096
    ours = fl.training_forward_flops_exact(c, b, s).total + fl.seeds_softmax_flops(c, b, s)
    diff = fl.seeds_training_forward_flops(c, b, s) - ours
    assert diff == 32 * 4 * b * s * h * (h - 1024)
    # Causal prefill scores s(s+1)/2 keys, not s^2: the attention term is a little over half.
    causal = fl.forward_flops(c, s, 0, logits_tokens=s).attention
    full = fl.training_forward_flops_exact(c, b, s).attention
    assert causal * 2 * s == full * (s + 1)


def test_mla_decode_absorbed_attention():
    ds = cfg("DeepSeek-V3")
    d = fl.decode_flops(ds, 1024)
    assert d.attention == 61 * 1024 * 2 * 128 * (2 * 512 + 64)
    naive = fl.forward_flops(ds, 1, 1023).attention
    assert naive == 61 * 1024 * 2 * 128 * (128 + 64 + 128)


# ---- roofline --------------------------------------------------------------------------------
def test_decode_batch1_is_memory_bound_and_exact():
    c = cfg("Meta-Llama-3-8B")
    h100 = HARDWARE["h100"]
    r = decode_roofline(c, h100, 1, 2048, 2, 2)
    nbytes = 8_030_261_248 * 2 + 2048 * 131_072
    assert r["bytes"] == nbytes and r["bound"] == "memory"
    assert r["time_s"] == pytest.approx(nbytes / 3.35e12)
    # At 2048 keys each sequence reads 256 MiB of KV for ~17 GFLOP (< 295 FLOP/B): never compute-bound.
    assert max_memory_bound_batch(c, h100, 2048, 2, 2, limit=1 << 14) is None
    b = max_memory_bound_batch(c, h100, 128, 2, 2)
    assert b > 1
    assert decode_roofline(c, h100, b, 128, 2, 2)["bound"] == "memory"
    assert decode_roofline(c, h100, b + 1, 128, 2, 2)["bound"] == "compute"


def test_long_context_decode_never_turns_compute_bound():
    # Llama-2-7B (MHA) at 32K keys: each sequence reads 16 GiB of KV for ~100 GFLOP: always memory-bound.
    assert max_memory_bound_batch(cfg("Llama-2-7b-hf"), HARDWARE["h100"], 32768, 2, 2, limit=1 << 12) is None


def test_expected_distinct_experts():
    mix = cfg("Mixtral-8x7B-v0.1")
    assert expected_distinct_experts(mix, 1) == pytest.approx(2)
    assert expected_distinct_experts(mix, 10_000) == pytest.approx(8)


def test_parse_hardware():
    hw = parse_hardware("custom:1e15,2e12,40")
    assert (hw.peak_flops, hw.bandwidth, hw.memory_bytes) == (1e15, 2e12, 40e9)
    assert parse_hardware("a100", memory_gb=40).memory_bytes == 40e9
    for bad in ("tpu", "custom:1e15", "custom:x,y", "custom:-1,2"):
        with pytest.raises(ValueError, match="hardware"):
            parse_hardware(bad)
