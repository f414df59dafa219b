"""The paged engine: batching changes nothing but speed; prefix caching skips work; every
SamplingParams field has an effect; bad requests fail alone."""

from __future__ import annotations

import random

import pytest

from pagedlm import LLM, SamplingParams
from pagedlm.errors import RequestRejectedError


def prompts_mixed(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


@pytest.fixture(scope="module")
def alone_llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32", max_num_seqs=1, enable_prefix_caching=False)


def run_alone(llm, prompts, params):
    return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_batched_equals_alone_under_chunking_and_preemption(tiny_llama_dir, alone_llm, params):
    prompts = prompts_mixed(12, 384)
    # 14 blocks of 4 tokens = 56 tokens of cache for 12 sequences of up to 64 tokens: forced preemption.
    # A 16-token step budget splits the longer prompts into chunks.
    llm = LLM(tiny_llama_dir, dtype="float32", block_size=4, num_kv_blocks=18, max_num_batched_tokens=16,
              max_num_seqs=8)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.get_metrics()["num_preemptions"] > 0
    assert batched == run_alone(alone_llm, prompts, params)
    # Nothing leaked: every block is free again.
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks
    llm.engine.block_manager.check_invariants([])


def test_seed_reproducible_regardless_of_batch(tiny_llama_dir, alone_llm):
    p = SamplingParams(temperature=1.2, seed=123, max_tokens=16, ignore_eos=True)
    target = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    alone = run_alone(alone_llm, [target], p)[0]
    llm = LLM(tiny_llama_dir, dtype="float32")
    others = prompts_mixed(6, 384, seed=3)
    mixed = llm.generate(others[:3] + [target] + others[3:],
                         [SamplingParams(temperature=1.0, max_tokens=10)] * 3 + [p] + [SamplingParams(max_tokens=5)] * 3,
                         use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    # A different seed gives a different sample (16 tokens from a flat-ish distribution).
    other_seed = run_alone(alone_llm, [target], SamplingParams(temperature=1.2, seed=124, max_tokens=16,
                                                               ignore_eos=True))[0]
    assert other_seed != alone


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "auto"])
def test_real_model_batched_equals_alone(smollm2_llm, quantization):
    """Preempted, chunked and batched, greedy decoding gives what each prompt gives alone. Exactly
    with float activations. With ``auto``'s int8 activations it cannot be exact: a chunk boundary
    moves x by a last bit, which flips an int8 rounding somewhere, and the flips cascade through
    the layers (measured: up to ~0.2 nats on a log-probability, as llama.cpp's Q8 activations
    behave). There the outputs agree up to a first difference at a close call: the token taken
    is the alone run's runner-up, within 0.5 nats of its choice."""
    from pagedlm import LLM

    prompts = ["The capital of France is", "def add(a, b):\n   ",
               "In 1969, the first human to walk on the Moon was"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    ref = smollm2_llm if quantization == "none" else LLM(smollm2_llm.engine.weights_path, dtype="float32",
                                                          kv_cache_memory=64 << 20, quantization=quantization)
    alone = [ref.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    # 12 blocks of 4 = 48 tokens for 3 sequences of up to 26: preemption; 8-token chunks.
    small = LLM(smollm2_llm.engine.weights_path, dtype="float32", block_size=4, num_kv_blocks=12,
                max_num_batched_tokens=8, quantization=quantization)
    batched = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.engine.get_metrics()["num_preemptions"] > 0
    if quantization == "none":
        assert batched == [a.token_ids for a in alone]
        return
    for a, b in zip(alone, batched):
        i = next((i for i, (x, y) in enumerate(zip(a.token_ids, b)) if x != y), None)
        if i is None:
            continue
        top = a.logprobs[i]
        assert b[i] in top and top[a.token_ids[i]].logprob - top[b[i]].logprob < 0.5, (i, top, b[i])


def test_prefix_cache_computes_only_new_tokens(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", block_size=4)
    eng = llm.engine
    prefix = list(range(10, 50))  # 40 tokens = 10 full blocks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prefix + [60, 61, 62]}, params, use_tqdm=False)[0]
    before = eng.stats["prefill_tokens"]
    second = llm.generate({"prompt_token_ids": prefix + [70, 71, 72]}, params, use_tqdm=False)[0]
    assert eng.stats["prefill_tokens"] - before == 3  # 40 cached, 3 new
    assert second.metrics.num_cached_tokens == 40
    cold = LLM(tiny_llama_dir, dtype="float32", block_size=4, enable_prefix_caching=False)
    ref = cold.generate({"prompt_token_ids": prefix + [70, 71, 72]}, params, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == ref.outputs[0].token_ids
    assert first.metrics.num_cached_tokens == 0
    assert eng.get_metrics()["prefix_cache_hits"] >= 40


def test_n_samples_share_prompt_blocks(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", block_size=4)
    prompt = {"prompt_token_ids": list(range(20, 53))}  # 33 tokens: 8 full blocks
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # the 2nd and 3rd samples reuse the first one's 8 full prompt blocks
    assert llm.engine.get_metrics()["prefix_cache_hits"] == 2 * 32


# ---- every SamplingParams field has an effect --------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32")


def gen(llm, prompt="Hello world", **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def test_top_k_1_equals_greedy(llm):
    g = gen(llm, temperature=0, max_tokens=12, ignore_eos=True).outputs[0].token_ids
    assert gen(llm, temperature=1.5, top_k=1, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids == g
    assert gen(llm, temperature=1.5, top_p=1e-6, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids == g
    assert gen(llm, temperature=1.5, min_p=1.0, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids == g
    assert gen(llm, temperature=1.5, seed=3, max_tokens=12, ignore_eos=True).outputs[0].token_ids != g


def test_top_k_restricts_support(llm):
    """With top_k=2 every sampled token is one of the two likeliest (checked with logprobs)."""
    out = gen(llm, temperature=5.0, top_k=2, seed=0, max_tokens=20, logprobs=2, ignore_eos=True).outputs[0]
    ranks = []
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp[tok].rank in (1, 2) and len(lp) == 2
        ranks.append(lp[tok].rank)
    assert 2 in ranks  # at temperature 5 the second token is drawn too


def test_penalties_change_output(llm):
    base = gen(llm, temperature=0, max_tokens=30, ignore_eos=True).outputs[0].token_ids
    for kw in ({"repetition_penalty": 1.8}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        toks = gen(llm, temperature=0, max_tokens=30, ignore_eos=True, **kw).outputs[0].token_ids
        assert toks != base, kw
        # penalised outputs repeat less
        assert len(set(toks)) >= len(set(base)), kw


def test_stop_strings_cut_text(llm):
    full = gen(llm, temperature=0, max_tokens=30, ignore_eos=True).outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = gen(llm, temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]).outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = gen(llm, temperature=0, max_tokens=30, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept.outputs[0].text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(llm):
    full = gen(llm, temperature=0, max_tokens=20, ignore_eos=True).outputs[0].token_ids
    stop_tok = full[4]
    out = gen(llm, temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok]).outputs[0]
    assert out.token_ids == full[: full.index(stop_tok) + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_tok
    # The same token as EOS: stops unless ignore_eos.
    eng = llm.engine
    saved = set(eng.eos_ids)
    eng.eos_ids = {stop_tok}
    try:
        assert gen(llm, temperature=0, max_tokens=20).outputs[0].token_ids == full[: full.index(stop_tok) + 1]
        assert gen(llm, temperature=0, max_tokens=20, ignore_eos=True).outputs[0].token_ids == full
        m = gen(llm, temperature=0, max_tokens=20, min_tokens=full.index(stop_tok) + 2).outputs[0].token_ids
        assert len(m) >= full.index(stop_tok) + 2 and stop_tok not in m[: full.index(stop_tok) + 2]
    finally:
        eng.eos_ids = saved


def test_max_tokens_and_length(llm):
    out = gen(llm, temperature=0, max_tokens=7, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_logprobs_and_prompt_logprobs(llm):
    import math

    out = gen(llm, temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert lp[tok].logprob <= 0 and lp[tok].rank == 1  # greedy takes the top token
        assert len([v for v in lp.values() if v.rank]) == 3
    assert math.isclose(c.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)))
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tok in lp and lp[tok].logprob <= 0


def test_skip_special_tokens(llm):
    tok = llm.get_tokenizer()
    special = tok.convert_tokens_to_ids("<|im_start|>")
    # Force the special token with a logit bias through stop-free greedy on a crafted prompt is not
    # reliable on a random model, so detokenize directly through the engine's detokenizer path.
    from pagedlm.tokenizer import IncrementalDetokenizer

    d1 = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    d2 = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    ids = tok("Hello")["input_ids"] + [special] + tok(" world")["input_ids"]
    t1 = "".join(d1.add(i) for i in ids)
    t2 = "".join(d2.add(i) for i in ids)
    assert "<|im_start|>" not in t1 and "<|im_start|>" in t2


def test_incremental_detokenizer_never_splits_utf8(llm):
    from pagedlm.tokenizer import IncrementalDetokenizer

    tok = llm.get_tokenizer()
    text = "café 日本語 🙂 naïve"
    ids = tok(text)["input_ids"]
    d = IncrementalDetokenizer(tok, [])
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---- bad requests fail alone ---------------------------------------------------------------

def test_prompt_longer_than_max_model_len_rejected(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_model_len=32)
    with pytest.raises(RequestRejectedError, match="max_model_len is 32"):
        llm.generate({"prompt_token_ids": list(range(5, 45))}, use_tqdm=False)
    ok = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=100, ignore_eos=True),
                      use_tqdm=False)[0]
    assert len(ok.prompt_token_ids) + len(ok.outputs[0].token_ids) == 32
    assert ok.outputs[0].finish_reason == "length"


def test_prompt_larger_than_cache_rejected(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", block_size=4, num_kv_blocks=4)  # 16 tokens of cache
    with pytest.raises(RequestRejectedError, match="16"):
        llm.generate({"prompt_token_ids": list(range(5, 25))}, use_tqdm=False)


def test_abort_and_unknown_id(tiny_llama_dir):
    from pagedlm import LLMEngine

    eng = LLMEngine(model=tiny_llama_dir, dtype="float32")
    with pytest.raises(KeyError, match="nope"):
        eng.abort_request("nope")
    eng.add_request("a", None, SamplingParams(max_tokens=50, ignore_eos=True), prompt_token_ids=[5, 6, 7])
    eng.add_request("b", None, SamplingParams(max_tokens=5, ignore_eos=True), prompt_token_ids=[8, 9])
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a", None, SamplingParams(), prompt_token_ids=[1])
    eng.step()
    eng.abort_request("a")
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["b"] and len(done[0].outputs[0].token_ids) == 5
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_metrics_and_timings(llm):
    out = gen(llm, temperature=0, max_tokens=8, ignore_eos=True)
    m = out.metrics
    assert m.ttft > 0 and m.queue_time >= 0 and m.decode_time > 0 and m.decode_tokens_per_s > 0
    assert m.num_generated_tokens == 8
    em = llm.engine.get_metrics()
    assert em["num_requests_running"] == 0 and em["kv_cache_usage"] == 0.0


def test_generation_config_eos_ids(tiny_llama_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11]}))
    llm = LLM(str(d), dtype="float32")
    assert {7, 11} <= llm.engine.eos_ids


def test_kv_pool_capped_by_what_can_be_used(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=2, max_model_len=64, block_size=16)
    assert llm.engine.num_kv_blocks == 2 * 64 // 16
    assert "8 blocks" in llm.engine.cache_report()


def test_streamed_deltas_never_show_a_stop_string(tiny_llama_dir):
    """Deltas concatenate to the final text, which excludes the stop string, at every step."""
    from pagedlm import LLMEngine

    eng = LLMEngine(model=tiny_llama_dir, dtype="float32")
    full_params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    eng.add_request("full", None, full_params, prompt_token_ids=[5, 6, 7])
    full = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            full = o.outputs[0].text
    for stop in (full[4:9], full[10:12] + "\u2603"):  # a real stop, and one whose prefix appears
        eng.add_request("s", None, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                        prompt_token_ids=[5, 6, 7])
        streamed, final = "", None
        while eng.has_unfinished_requests():
            for o in eng.step():
                streamed += o.outputs[0].text_delta
                assert stop not in streamed and final is None
                assert o.outputs[0].text.startswith(streamed)
                if o.finished:
                    final = o.outputs[0].text
        assert streamed == final
        assert final == (full[: full.index(stop)] if stop in full else full)


def test_greedy_tokens_are_argmax_ties_and_non_finite_included():
    """The greedy path takes ``max(dim=-1).indices`` (faster than torch's CPU argmax): the same
    index as ``argmax`` on every row, the first of tied maxima, inf and NaN as argmax treats them."""
    import torch

    from pagedlm.model.layers.sampler import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for rows in (1, 3, 64):
        x = torch.randint(0, 4, (rows, 2000), generator=g).float()  # many ties
        assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
        y = torch.randn(rows, 49152, generator=g)
        assert torch.equal(greedy_tokens(y), y.argmax(dim=-1))
    z = torch.randn(3, 100, generator=g)
    z[0, [7, 9]] = float("inf")
    z[1, [5, 8]] = float("nan")
    z[2, :] = -float("inf")
    assert greedy_tokens(z).tolist() == z.argmax(dim=-1).tolist() == [7, 5, 0]
