"""DeepSeek-V2 / V3 in the engine: multi-head latent attention over a paged cache of latents
(absorbed decode, expanded prefill), YaRN rope, dense-first layers, routed + shared experts with
V2's group-limited softmax and V3's bias-corrected group-limited sigmoid router, against
transformers' implementation of the same weights (float32)."""

from __future__ import annotations

import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.analysis.memory import kv_cache_bytes_per_token
from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from tests.test_engine import prompts_mixed, run_alone
from tests.test_models import assert_close, run_pagedlm

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0}
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, routed_scaling_factor=1.5)
VARIANTS = {
    # V2-Lite-like: no q compression, group-limited softmax, YaRN with mscale != mscale_all_dim
    # (cos/sin scaled by their ratio, the softmax by mscale_all_dim's square).
    "v2": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}),
    "v2_greedy": dict(q_lora_rank=None, topk_method="greedy", rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}),
    # V3: q low-rank, sigmoid router with correction bias in 4 groups, interleaved rope, YaRN.
    "v3": dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
               rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v3_rotate_half": dict(q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def hf_tiny_deepseek(variant: str):
    import transformers as T

    torch.manual_seed(0)
    kw = {**TINY, **VARIANTS[variant]}
    if variant.startswith("v2"):
        model = T.DeepseekV2ForCausalLM(T.DeepseekV2Config(**kw))
    else:
        model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**kw))
    model.eval()
    # Routers start at zero and the V3 correction bias too: give both real spread so the group
    # limit, the bias and the top-k all decide something.
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.weight.normal_(0, 0.5)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_v3")
    hf_tiny_deepseek("v3").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_of_prefill_and_every_decode_step_match_transformers(variant, tmp_path):
    hf = hf_tiny_deepseek(variant)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.is_mla and cfg.runnable and cfg.moe_layers == (False, True, True)
    model = load_model(str(tmp_path), cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(run_pagedlm(model, ids, prefill=11), ref)  # rows 0-10 prefill, 11-23 one decode step each


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_param_count_equals_inspect(variant):
    from pagedlm.analysis.params import count_parameters
    from pagedlm.model.registry import build_model

    hf = hf_tiny_deepseek(variant)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    n = sum(p.numel() for p in build_model(cfg, torch.float32).parameters())
    assert count_parameters(cfg).total == n == sum(t.numel() for t in hf.state_dict().values())


def test_cache_holds_the_latent_only(v3_dir):
    cfg = ModelConfig.from_pretrained(v3_dir)
    llm = LLM(v3_dir, dtype="float32", num_kv_blocks=8, block_size=4)
    runner = llm.engine.runner
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 40, vs 2 * 4 heads * 24 = 192 expanded
    assert all(c.shape == (1, 8, 4, 1, per_layer) for c in runner.kv_caches)
    assert runner.kv_bytes_per_token() == cfg.num_hidden_layers * per_layer * 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_bytes_per_token_equal_inspect(v3_dir, dtype):
    llm = LLM(v3_dir, dtype=dtype, num_kv_blocks=8, block_size=4)
    eng = llm.engine
    allocated = sum(c.numel() * c.element_size() for c in eng.runner.kv_caches)
    per_token = allocated // (eng.num_kv_blocks * eng.config.block_size)
    assert per_token == eng.kv_bytes_per_token == kv_cache_bytes_per_token(eng.model_config,
                                                                         eng.runner.dtype.itemsize)
    assert f"{per_token} bytes/token" in eng.cache_report()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_batched_equals_alone_under_chunking_and_preemption(v3_dir, params):
    prompts = prompts_mixed(6, 384, hi=30)
    alone = LLM(v3_dir, dtype="float32", max_num_seqs=1, enable_prefix_caching=False)
    # 12 blocks of 4 = 48 tokens for 6 sequences of up to 42: preemption; a 12-token step budget
    # splits prompts into chunks that attend to their cached latents.
    llm = LLM(v3_dir, dtype="float32", block_size=4, num_kv_blocks=12, max_num_batched_tokens=12, max_num_seqs=6)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.get_metrics()["num_preemptions"] > 0
    assert batched == run_alone(alone, prompts, params)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_greedy_matches_transformers_generate(v3_dir):
    hf = hf_tiny_deepseek("v3")
    prompt = list(range(5, 17))
    llm = LLM(v3_dir, dtype="float32", block_size=4, num_kv_blocks=16)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 12:]
    assert out == ref.tolist()


def test_paged_latent_decode_matches_torch_backend():
    """The compiled step's in-place backend reads the latent cache as the reference does."""
    from pagedlm.model.layers.attention import (
        AttentionMetadata,
        PagedAttentionBackend,
        PagedDecodeMetadata,
        TorchAttentionBackend,
    )

    torch.manual_seed(0)
    nb, bs, heads, rank, rope = 10, 4, 4, 12, 4
    lens, width = [1, 6, 11], 4
    tables = [[(3 * i + j) % (nb - 1) for j in range((n + bs - 1) // bs)] for i, n in enumerate(lens)]
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)])
    tables = torch.tensor([t + [nb - 1] * (width - len(t)) for t in tables])
    cache = torch.randn(1, nb, bs, 1, rank + rope)
    latent, q = torch.randn(3, rank + rope), torch.randn(3, heads, rank + rope)
    ref_cache, paged_cache = cache.clone(), cache.clone()
    ref_meta = AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                                 decode_context_lens=torch.tensor(lens), decode_max_context=max(lens), block_size=bs)
    TorchAttentionBackend.write_latent(ref_cache, latent, slots)
    ref = TorchAttentionBackend.decode_latent(q, ref_cache, ref_meta, 0.3, rank)
    meta = PagedDecodeMetadata(slots, tables, torch.tensor(lens), bs)
    PagedAttentionBackend.write_latent(paged_cache, latent, slots)
    out = PagedAttentionBackend.decode_latent(q, paged_cache, meta, 0.3, rank)
    assert torch.equal(ref_cache, paged_cache)
    assert out.shape == (3, heads, rank)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compiled_decode_equals_eager(tmp_path):
    """MLA through the compiled decode step (dense layers: the MoE expert loop syncs with the host,
    so MoE models decode eagerly after one fallback warning)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.DeepseekV3Config(**{**TINY, **VARIANTS["v3"], "num_hidden_layers": 1, "first_k_dense_replace": 1})
    T.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    prompts = prompts_mixed(3, 384, hi=20, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=24, max_num_seqs=2)
    ref = [o.outputs[0].token_ids for o in LLM(str(tmp_path), enforce_eager=True, **kw).generate(prompts, params)]
    llm = LLM(str(tmp_path), enforce_eager=False, **kw)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    compiled = llm.engine.runner.compiled
    assert not compiled.failed and compiled.compiled_buckets >= {1, 2}
    assert outs == ref
