"""Exact parameter counts against published totals, and the lecture notes' figures checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedlm.analysis import count_parameters
from pagedlm.analysis.params import mtp_params
from pagedlm.config import ModelConfig

DATA = Path(__file__).parent / "data"


def cfg(name: str) -> ModelConfig:
    return ModelConfig.from_pretrained(DATA / f"{name}.json")


# Published exact totals (model cards / the safetensors index / the papers).
PUBLISHED = {
    "gpt2": 124_439_808,
    "Llama-2-7b-hf": 6_738_415_616,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "SmolLM2-135M": 134_515_008,
    "Llama-3.1-405B": 405_853_388_800,
    "Qwen3-30B-A3B": 30_532_122_624,
    "gemma-3-270m": 268_098_176,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name):
    assert count_parameters(cfg(name)).total == PUBLISHED[name]


def test_breakdown_sums_to_total_and_layers_add_up():
    for name in (*PUBLISHED, "DeepSeek-V3"):
        p = count_parameters(cfg(name))
        assert sum(p.breakdown().values()) == p.total
        assert p.embedding + p.position_embedding + p.lm_head + p.final_norm + sum(
            la.total for la in p.layers) == p.total


def test_gpt2_breakdown():
    p = count_parameters(cfg("gpt2"))
    assert p.tied and p.lm_head == 0
    assert p.embedding == 50257 * 768 and p.position_embedding == 1024 * 768
    layer = p.layers[0]
    assert layer.attention == 768 * 3 * 768 + 3 * 768 + 768 * 768 + 768  # c_attn + c_proj, with biases
    assert layer.mlp == 768 * 3072 + 3072 + 3072 * 768 + 768
    assert layer.norms == 4 * 768  # two LayerNorms, weight and bias
    assert p.norms == 12 * 4 * 768 + 2 * 768


def test_moe_active_parameters():
    mix = count_parameters(cfg("Mixtral-8x7B-v0.1"))
    # Mixtral's "12.9B active": 2 of 8 experts per layer.
    assert mix.active == 12_879_925_248
    assert mix.experts == 32 * 8 * 3 * 4096 * 14336
    assert mix.router == 32 * 4096 * 8
    qwen = count_parameters(cfg("Qwen3-30B-A3B"))
    assert qwen.active == 3_353_032_704  # published "3.3B activated" (embedding and lm_head included)
    assert qwen.layers[0].attention == 2048 * 4096 * 2 + 2 * 2048 * 512 + 2 * 128  # with q/k norm


def test_deepseek_v3_total():
    """DeepSeek-V3: 671B main model, 685B published checkpoint.

    Ours (671,026,419,200) is the model transformers builds: embedding, 61 decoder layers (3 dense,
    58 MoE with 256 routed + 1 shared expert and a router with its e_score_correction_bias),
    MLA attention with q/kv LoRA ranks, final norm, an untied lm_head. The published 685B
    (684,531,386,000 on the HF page) adds the multi-token-prediction module (one more MoE layer,
    enorm, hnorm, eh_proj and its own embedding and head copies: 13,463,426,304) and the FP8 block
    scales ``weight_scale_inv`` (one fp32 per 128x128 block of each FP8 linear: 41,540,496).
    """
    c = cfg("DeepSeek-V3")
    p = count_parameters(c)
    assert p.total == 671_026_419_200
    assert round(p.total / 1e9) == 671
    mtp = mtp_params(c)
    assert mtp == 13_463_426_304
    fp8_scales = 41_540_496
    assert p.total + mtp + fp8_scales == 684_531_386_000
    # Published "37B activated": 8 of 256 routed experts plus everything else.
    assert p.active == 37_552_297_472
    # Dense-first layers and MLA shapes.
    assert [la.kind for la in p.layers[:4]] == ["dense", "dense", "dense", "moe"]
    attn = (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)
            + 128 * 128 * 7168)
    assert p.layers[0].attention == attn == 187_107_328
    assert p.layers[3].shared_experts == 3 * 7168 * 2048
    assert p.layers[3].router == 256 * 7168 + 256


def test_seeds_llama_formula_is_exact_up_to_norms():
    """seeds/002 section 10.4: v h + N (4h^2 + 3hi) + v h. For Llama-2-7B (MHA) it misses only the
    RMSNorm weights (2 per layer + 1 final, h each)."""
    c = cfg("Llama-2-7b-hf")
    v, h, n, i = 32000, 4096, 32, 11008
    formula = v * h + n * (4 * h * h + 3 * h * i) + v * h
    assert formula == 6_738_149_376
    assert count_parameters(c).total - formula == (2 * n + 1) * h
    # "A 7B model with FP16 needs ~14 GB": 13.48 GB.
    assert count_parameters(c).total * 2 == 13_476_831_232


def test_seeds_llama3_405b_breakdown_corrected():
    """seeds/004 section 5 "The Bill" for Llama 3 405B, recomputed.

    Right in the notes: embedding 128,256 x 16,384 = 2.10B, lm_head the same, the 126-layer sum
    ~401.6B, the total ~405.8B and FFN ~82% of a layer. Wrong: the per-layer figures are 10x too
    large (attention "5.7B" is 0.570B, FFN "26.17B" is 2.617B, a layer "31.87B" is 3.188B; the
    notes' own 126 x 31.87 would be 4,016B, not 401.6B), and "W_Q, W_K, W_V of [16384, 16384]"
    ignores GQA: W_K and W_V are [16384, 1024] (8 KV heads x 128).
    """
    p = count_parameters(cfg("Llama-3.1-405B"))
    h, kv = 16384, 8 * 128
    assert p.embedding == p.lm_head == 128_256 * 16_384 == 2_101_346_304
    layer = p.layers[0]
    assert layer.attention == 2 * h * h + 2 * h * kv == 570_425_344  # notes: 5.7B
    assert layer.mlp == 3 * h * 53248 == 2_617_245_696  # notes: 26.17B
    assert layer.total == 3_187_703_808  # notes: 31.87B (incl. 2 norms of h)
    assert sum(la.total for la in p.layers) == 401_650_679_808  # notes: 401.6B (right)
    assert p.total == 405_853_388_800  # notes: 405.8B (right)
    assert round(100 * layer.mlp / layer.total) == 82  # notes: ~82% (right)
    # The notes' 4h^2 attention (MHA) would be 1,073,741,824 per layer: 88% too much for GQA.
    assert 4 * h * h - layer.attention == 503_316_480


def test_tied_and_untied_lm_head():
    smol = count_parameters(cfg("SmolLM2-135M"))
    assert smol.tied and smol.lm_head == 0
    llama3 = count_parameters(cfg("Meta-Llama-3-8B"))
    assert not llama3.tied and llama3.lm_head == llama3.embedding == 128256 * 4096


def test_gemma3_norms_and_qk_norm():
    p = count_parameters(cfg("gemma-3-270m"))
    assert p.layers[0].norms == 4 * 640  # input, post-attention, pre- and post-feedforward
    assert p.layers[0].attention == 640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 2 * 256
