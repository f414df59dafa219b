"""Speculative decoding (engine/spec_decode.py): exact greedy output, exact sampling
distribution, no trace of rejected tokens in the block manager, metrics, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedlm import LLM, SamplingParams
from pagedlm.engine import spec_decode
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.engine.spec_decode import AdaptivePolicy, Proposal, SpeculativeConfig, lookup, lookup_match
from tests.helpers import save_tiny
from tests.server_fixtures import _sharpen_lm_head

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    """Tiny Llama, lm_head sharpened so that greedy choices are far from float ties."""
    path = save_tiny("llama", str(tmp_path_factory.mktemp("spec_target")))
    _sharpen_lm_head(path)
    return path


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory) -> str:
    """The target with noise on its head: agrees with it often, not always (same tokenizer)."""
    import os

    from safetensors.torch import load_file, save_file

    path = save_tiny("llama", str(tmp_path_factory.mktemp("spec_draft")))
    _sharpen_lm_head(path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    w = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = w + 0.7 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    save_file(tensors, f, metadata={"format": "pt"})
    return path


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, object]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", None, sp, prompt_token_ids=p)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def _outputs(done) -> dict:
    return {rid: [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for rid, o in done.items()}


# ---- n-gram lookup ---------------------------------------------------------------------------
def test_lookup_takes_latest_longest_match():
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(toks, 1, 3, 3) == [7, 8, 5]  # "2 3" last followed by 7 (the latest match)
    assert lookup(toks, 3, 3, 3) == []  # "5 2 3" never occurred before
    assert lookup([4, 4, 4], 1, 2, 5) == [4]  # overlapping match at the end
    assert lookup([1, 2, 3], 1, 3, 2) == []
    assert lookup([5], 1, 1, 2) == []
    # longest n first: "1 2" matches at the start (-> 3), while "2" alone matches later (-> 6)
    assert lookup([1, 2, 3, 2, 6, 1, 2], 1, 2, 1) == [3]
    assert lookup([1, 2, 3, 2, 6, 1, 2], 1, 1, 1) == [6]
    assert lookup_match(toks, 1, 3, 3) == ([7, 8, 5], 2)
    assert lookup_match(toks, 3, 3, 3) == ([], 0)


# ---- how much to verify (AdaptivePolicy) ------------------------------------------------------
BUCKETS = [1, 2, 4, 8]


def _policy(seconds: dict[int, float] | None) -> AdaptivePolicy:
    return AdaptivePolicy(lambda: None if seconds is None else (BUCKETS, seconds))


def test_policy_without_measured_costs_verifies_everything():
    assert _policy(None).choose(1, [(7, 2, 5)]) == {7: 5}
    # the bucket that verifying everything needs (8) is not measured yet: verify all, so it will be
    assert _policy({1: 1.0, 2: 1.0}).choose(1, [(7, 2, 5)]) == {7: 5}


def test_policy_weighs_expected_tokens_against_measured_rows():
    # free rows: any chance of acceptance pays for every proposal
    assert _policy({b: 1.0 for b in BUCKETS}).choose(1, [(7, 1, 7)]) == {7: 7}
    # cost proportional to rows: a proposal (accepted with a < 1) never pays for its row
    assert _policy({b: float(b) for b in BUCKETS}).choose(1, [(7, 1, 7)]) == {7: 0}
    # a CPU-like cost curve: at the prior acceptance (1/2) one proposal pays in bucket 2 ...
    cpu = {1: 1.0, 2: 1.2, 4: 1.7, 8: 2.6}
    assert _policy(cpu).choose(1, [(7, 1, 7)]) == {7: 1}
    # ... and k is capped by the proposal: 3 rows fall in bucket 4, costed as such
    p = _policy(cpu)
    for _ in range(30):  # kind 4 (a 4-token match) always accepted; kind 1 never
        p.observe(7, 4, 3, 3)
        p.observe(7, 1, 3, 0)
    assert p.acceptance(7, 4) > 0.95 and p.acceptance(7, 1) < 0.05
    assert p.choose(1, [(7, 4, 7)]) == {7: 7}
    assert p.choose(1, [(7, 1, 7)]) == {7: 0}
    # engine-wide counts are a new sequence's prior, its own outcomes take over
    assert p.acceptance(8, 4) > 0.9
    for _ in range(20):
        p.observe(8, 4, 3, 0)
    assert p.acceptance(8, 4) < 0.2
    p.release({7})
    assert p.acceptance(8, 4) == p.acceptance(99, 4) > 0.5  # forgotten: back to the engine-wide rate


def test_policy_spends_rows_on_the_likeliest_sequences_first():
    p = _policy({1: 1.0, 2: 1.05, 4: 1.2, 8: 2.4})
    for _ in range(30):
        p.observe(1, 3, 2, 2)
        p.observe(2, 1, 2, 0)
    # three decoding sequences (3 rows, bucket 4): one more row still fits bucket 4 and pays for
    # the likely sequence 1; more rows would cross into bucket 8, which costs double.
    assert p.choose(3, [(1, 3, 4), (2, 1, 4)]) == {1: 1, 2: 0}


def test_adaptive_policy_keeps_greedy_output(tiny_target, monkeypatch):
    """Whatever the policy verifies (here: a cost table that makes it verify 0 to 4 of the
    proposals, changing with the sequences' outcomes), greedy output is plain decoding's."""
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4)
    prompts = _mixed_prompts(6, seed=3)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    want = _run(LLMEngine(model=tiny_target, **kw), prompts, params)
    monkeypatch.setattr(spec_decode, "step_cost_table",
                        lambda runner, host=0.0: ([1, 2, 4, 8], {1: 1.0, 2: 1.15, 4: 1.45, 8: 2.2}))
    spec = LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw)
    verified = []
    choose = spec.spec.policy.choose
    monkeypatch.setattr(spec.spec.policy, "choose", lambda *a: verified.append(choose(*a)) or verified[-1])
    got = _run(spec, prompts, params)
    assert _outputs(got) == _outputs(want)
    counts = {k for step in verified for k in step.values()}
    assert 0 in counts and len(counts - {0}) >= 1, counts  # it both dropped and kept proposals
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


# ---- greedy: token for token ------------------------------------------------------------------
REPEAT = [5, 6, 7, 8, 9, 10, 11, 12] * 3


def _mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        if i % 2 == 0:  # repetitive: the n-gram proposer finds matches
            unit = [rng.randrange(3, 300) for _ in range(rng.randint(3, 7))]
            prompts.append(unit * rng.randint(2, 6))
        else:
            prompts.append([rng.randrange(3, 300) for _ in range(rng.randint(5, 60))])
    return prompts


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_mixed_batch_with_preemption_and_chunked_prefill(tiny_target, tiny_draft, method):
    kw = dict(dtype="float32", num_kv_blocks=24, block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
    prompts = _mixed_prompts(10)
    params = [SamplingParams(max_tokens=12 + 3 * (i % 4), temperature=0, ignore_eos=i % 3 == 0) for i in range(10)]
    plain = LLMEngine(model=tiny_target, **kw)
    want = _run(plain, prompts, params)
    spec_cfg = dict(NGRAM) if method == "ngram" else {"method": "draft_model", "num_speculative_tokens": 3,
                                                       "model": tiny_draft}
    spec = LLMEngine(model=tiny_target, speculative_config=spec_cfg, **kw)
    got = _run(spec, prompts, params)
    assert _outputs(got) == _outputs(want)
    m = spec.get_metrics()
    assert spec.scheduler.num_preemptions > 0  # the pool is small: speculation met preemption
    assert m["spec_decode_num_drafts"] > 0 and 0 < m["spec_decode_num_accepted_tokens"] < m["spec_decode_num_draft_tokens"]
    assert sum(m["spec_decode_num_accepted_tokens_per_pos"]) == m["spec_decode_num_accepted_tokens"]
    per_req = [o.metrics.spec_decode for o in got.values()]
    assert sum(s.num_draft_tokens for s in per_req) == m["spec_decode_num_draft_tokens"]
    assert sum(s.num_accepted_tokens for s in per_req) == m["spec_decode_num_accepted_tokens"]
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_stops_hold_inside_accepted_runs(tiny_target):
    """Stop ids, stop strings and max_tokens cut a run where plain decoding would stop."""
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=4)
    plain = LLMEngine(model=tiny_target, **kw)
    prompt = [REPEAT]
    free_run = _run(plain, prompt, [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)])["r0"].outputs[0]
    toks, text = free_run.token_ids, free_run.text
    cases = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 2, 5, 7, 13)]
    # A stop id and a stop string first met late in the output, after runs were accepted.
    late_tok = next(t for i, t in enumerate(toks) if i >= 10 and t not in toks[:i])
    late_str = next(text[i:i + 2] for i in range(len(text) // 2, len(text)) if text.find(text[i:i + 2]) == i)
    cases.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[late_tok]))
    cases.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[late_str]))
    cases.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[late_str],
                                include_stop_str_in_output=True))
    cases.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, min_tokens=6,
                                stop_token_ids=[toks[2]]))
    spec = LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw)
    for sp in cases:
        want = _run(plain, prompt, [sp])
        before = spec.get_metrics()["spec_decode_num_accepted_tokens"]
        got = _run(spec, prompt, [sp])
        assert _outputs(got) == _outputs(want), sp
        assert spec.get_metrics()["spec_decode_num_accepted_tokens"] > before or sp.max_tokens <= 2, sp


def test_max_model_len_caps_proposals(tiny_target):
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=30)
    sp = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    want = _run(LLMEngine(model=tiny_target, **kw), [REPEAT], [sp])
    got = _run(LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw), [REPEAT], [sp])
    assert _outputs(got) == _outputs(want)
    assert len(got["r0"].outputs[0].token_ids) == 30 - len(REPEAT)


REPETITIVE_TEXT = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
                   "Rewrite the two functions above exactly:\n\ndef add(a, b):\n")


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_identical_on_smollm2(smollm2, smollm2_llm, method):
    """The real model in float32: token for token what plain greedy decoding gives."""
    prompts = [REPETITIVE_TEXT]
    sp = SamplingParams(max_tokens=20, temperature=0)
    want = smollm2_llm.generate(prompts, sp, use_tqdm=False)
    # The draft is the same file quantized to int4 (its own GGUF precision): a close but different model.
    cfg = dict(NGRAM) if method == "ngram" else {"method": "draft_model", "num_speculative_tokens": 3,
                                                 "model": smollm2, "quantization": "auto"}
    llm = LLM(smollm2, dtype="float32", kv_cache_memory=64 << 20, quantization="none", speculative_config=cfg)
    got = llm.generate(prompts, sp, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
    stats = got[0].metrics.spec_decode
    assert stats.num_accepted_tokens > 0, stats


# ---- sampling: the target distribution, exactly ---------------------------------------------
def _chi2_two_sample(a: list[int], b: list[int]) -> float:
    """p-value of the chi-square test that two samples of categories share one distribution."""
    cats = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(c) for c in cats], dtype=torch.float64)
    cb = torch.tensor([b.count(c) for c in cats], dtype=torch.float64)
    na, nb = ca.sum(), cb.sum()
    tot = ca + cb
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())
    df = len(cats) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> tuple[str, str]:
    """Target and draft with a 12-token vocabulary (no tokenizer): a few thousand samples give
    every token's frequency to a percent or so."""
    target = save_tiny("llama", str(tmp_path_factory.mktemp("sv_target")), with_tokenizer=False, vocab_size=12)
    draft = save_tiny("llama", str(tmp_path_factory.mktemp("sv_draft")), with_tokenizer=False, vocab_size=12,
                      num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    return target, draft


@pytest.mark.parametrize("method,params", [
    ("ngram", dict(temperature=1.0)),
    ("ngram", dict(temperature=0.7, top_k=6, top_p=0.9)),
    ("draft_model", dict(temperature=1.3, min_p=0.02, repetition_penalty=1.3)),
])
def test_sampled_tokens_follow_the_target_distribution(small_vocab, method, params):
    target, draft = small_vocab
    n, out_len = 1000, 4
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # n-gram lookup proposes 3 1 2 ...
    sps = [SamplingParams(max_tokens=out_len, ignore_eos=True, seed=1000 + i, **params) for i in range(n)]
    kw = dict(dtype="float32", num_kv_blocks=2048, block_size=4, max_num_seqs=128, max_num_batched_tokens=4096)
    plain = _run(LLMEngine(model=target, **kw), [prompt] * n, sps)
    cfg = dict(NGRAM, num_speculative_tokens=3) if method == "ngram" else {
        "method": "draft_model", "num_speculative_tokens": 3, "model": draft}
    spec_engine = LLMEngine(model=target, speculative_config=cfg, **kw)
    spec = _run(spec_engine, [prompt] * n, sps)
    m = spec_engine.get_metrics()
    # Proposals were made and both accepted and rejected often: the test exercises both branches.
    accepted, proposed = m["spec_decode_num_accepted_tokens"], m["spec_decode_num_draft_tokens"]
    assert accepted >= 50 and proposed - accepted >= 50, m
    for pos in range(1, out_len):  # position 0 comes from the prompt's forward, before any proposal
        a = [plain[f"r{i}"].outputs[0].token_ids[pos] for i in range(n)]
        b = [spec[f"r{i}"].outputs[0].token_ids[pos] for i in range(n)]
        assert _chi2_two_sample(a, b) > 1e-3, (pos, method, params)
    # Pairs of consecutive tokens, the joint law a wrong residual would distort first.
    a = [tuple(plain[f"r{i}"].outputs[0].token_ids[1:3]) for i in range(n)]
    b = [tuple(spec[f"r{i}"].outputs[0].token_ids[1:3]) for i in range(n)]
    common = {x for x in set(a) | set(b) if a.count(x) + b.count(x) >= 20}  # sparse cells pooled
    a = [x if x in common else None for x in a]
    b = [x if x in common else None for x in b]
    assert _chi2_two_sample([str(x) for x in a], [str(x) for x in b]) > 1e-3


def test_chi2_helper_detects_a_different_distribution():
    """The statistic has power at this sample size: a 9-point shift is caught."""
    rng = random.Random(0)
    a = [0 if rng.random() < 0.5 else 1 for _ in range(1000)]
    b = [0 if rng.random() < 0.41 else 1 for _ in range(1000)]
    assert _chi2_two_sample(a, b) < 1e-3
    c = [0 if rng.random() < 0.5 else 1 for _ in range(1000)]
    assert _chi2_two_sample(a, c) > 1e-3


# ---- no trace of rejected tokens in the block manager ----------------------------------------
class ScriptedProposer:
    """Proposals from a script: a mix of n-gram lookups and random tokens (mostly rejected)."""

    def __init__(self, rng: random.Random, vocab: int):
        self.rng, self.vocab = rng, vocab

    def propose(self, seqs, engine):
        out = {}
        for seq, k in seqs:
            k = self.rng.randint(1, k)
            toks = lookup(seq.token_ids, 1, 3, k) if self.rng.random() < 0.6 else []
            toks = toks or [self.rng.randrange(self.vocab) for _ in range(k)]
            out[seq.seq_id] = Proposal(toks)
        return out

    def release(self, live_ids):
        pass


def _cache_content(bm) -> set:
    """The prefix cache as the set of token prefixes its blocks hold (content ids differ by run)."""
    by_content = {b.content_id: b for b in bm.blocks if b.key is not None}
    out = set()
    for b in by_content.values():
        chain, cur = [], b
        while cur is not None:
            chain.append(cur.key[1])
            cur = by_content.get(cur.key[0])
        out.add(tuple(reversed(chain)))
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), num_blocks=st.sampled_from([12, 200]), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(4, 24), k=st.integers(1, 5))
def test_rejected_tokens_leave_no_trace(tiny_target, seed, num_blocks, block_size, budget, k):
    rng = random.Random(seed)
    max_len = min(64, num_blocks * block_size)
    prompts = [[rng.randrange(3, 40) for _ in range(rng.randint(1, 10))] * rng.randint(1, 3) for _ in range(5)]
    prompts[1] = prompts[0][:5] + prompts[1]  # shared prefixes for the prefix cache
    prompts = [p[:max_len - 2] for p in prompts]
    params = [SamplingParams(max_tokens=rng.randint(1, 14), temperature=0, ignore_eos=True) for _ in prompts]
    kw = dict(dtype="float32", num_kv_blocks=num_blocks, block_size=block_size, max_num_seqs=3,
              max_num_batched_tokens=budget, max_model_len=max_len)
    plain = LLMEngine(model=tiny_target, **kw)
    want = _run(plain, prompts, params)
    spec = LLMEngine(model=tiny_target, speculative_config={"num_speculative_tokens": k}, **kw)
    spec.spec.proposer = ScriptedProposer(rng, 40)
    bm = spec.block_manager
    for i, (p, sp) in enumerate(zip(prompts, params)):
        spec.add_request(f"r{i}", None, sp, prompt_token_ids=p)
    got = {}
    while spec.has_unfinished_requests():
        for o in spec.step():
            if o.finished:
                got[o.request_id] = o
        live = spec.live_sequences()
        bm.check_invariants(live)
        for s in live:
            # no block past the computed tokens' (a plain step leaves none either)
            assert len(s.block_table) == bm.blocks_needed(s.num_computed_tokens), s
            assert not s.spec_tokens
        for key, bid in bm.cached.items():  # only accepted tokens were ever hashed
            assert key == bm.blocks[bid].key
    assert _outputs(got) == _outputs(want)
    assert bm.num_free_blocks == bm.num_blocks == plain.block_manager.num_free_blocks
    if spec.scheduler.num_preemptions == 0 and plain.scheduler.num_preemptions == 0 and num_blocks == 200:
        assert _cache_content(bm) == _cache_content(plain.block_manager)


def test_cache_content_is_what_a_plain_run_caches(tiny_target):
    """A plain run's cache has content, and a speculative run registers exactly the same blocks."""
    kw = dict(dtype="float32", num_kv_blocks=200, block_size=2)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = LLMEngine(model=tiny_target, **kw)
    _run(plain, [REPEAT], [sp])
    spec = LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw)
    _run(spec, [REPEAT], [sp])
    assert spec.get_metrics()["spec_decode_num_accepted_tokens"] > 0
    content = _cache_content(plain.block_manager)
    assert len(content) == (len(REPEAT) + 30 - 1) // 2
    assert _cache_content(spec.block_manager) == content


# ---- metrics ---------------------------------------------------------------------------------
def test_prometheus_metrics(tiny_target):
    from pagedlm.server.metrics import ServerMetrics

    spec = LLMEngine(model=tiny_target, dtype="float32", num_kv_blocks=64, speculative_config=NGRAM)
    _run(spec, [REPEAT], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)])
    m = spec.get_metrics()
    text = ServerMetrics("tiny").render(m).decode()
    assert f'vllm:spec_decode_num_drafts_total{{model_name="tiny"}} {float(m["spec_decode_num_drafts"])}' in text
    assert f'vllm:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(m["spec_decode_num_draft_tokens"])}' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="tiny"}' in text
    for pos, n in enumerate(m["spec_decode_num_accepted_tokens_per_pos"]):
        assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="{pos}"}} {float(n)}' in text
    assert len(m["spec_decode_num_accepted_tokens_per_pos"]) == 4
    plain = LLMEngine(model=tiny_target, dtype="float32", num_kv_blocks=8)
    assert "spec_decode" not in ServerMetrics("tiny").render(plain.get_metrics()).decode()


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,num,match", [
    ({"method": "ngram", "num_speculative_tokens": 0}, None, "num_speculative_tokens must be an integer in"),
    ({"method": "ngram", "num_speculative_tokens": 17}, None, "got 17"),
    (None, -1, "got -1"),
    ({"method": "ngram", "num_speculative_tokens": True}, None, "got True"),
    ({"method": "eagle", "num_speculative_tokens": 2}, None, "unknown speculative method 'eagle'"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, None, "prompt_lookup_min"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 0}, None, "prompt_lookup_min must be a positive"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, None, "needs 'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "/nonexistent/x"}, None, "does not exist"),
    ({"method": "ngram", "k": 2}, None, "unknown speculative_config field"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, None, "adaptive must be true or false"),
    ('{"method": "ngram", ', None, "not valid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
])
def test_bad_speculative_config(cfg, num, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(speculative_config=cfg, num_speculative_tokens=num)


def test_speculative_config_forms():
    assert EngineConfig().speculative_config is None
    c = EngineConfig(num_speculative_tokens=5).speculative_config
    assert (c.method, c.num_speculative_tokens) == ("ngram", 5)
    c = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}',
                     num_speculative_tokens=6).speculative_config
    assert c.num_speculative_tokens == 6
    assert EngineConfig(speculative_config=SpeculativeConfig(num_speculative_tokens=2)).speculative_config == c.__class__(
        num_speculative_tokens=2)
    with pytest.raises(TypeError, match="speculative_config must be"):
        EngineConfig(speculative_config=3)
    with pytest.raises(ValueError, match="single-process"):
        EngineConfig(num_speculative_tokens=2, tensor_parallel_size=2)


def test_draft_vocab_mismatch(tiny_target, tmp_path):
    other = save_tiny("llama", str(tmp_path / "other"), with_tokenizer=False, vocab_size=200)
    with pytest.raises(ValueError, match="vocabulary of 200 tokens, the target model 384"):
        LLMEngine(model=tiny_target, dtype="float32", num_kv_blocks=8,
                  speculative_config={"method": "draft_model", "num_speculative_tokens": 2, "model": other})


def test_draft_tokenizer_mismatch(tiny_target, tmp_path):
    from tests.helpers import train_tokenizer

    other = save_tiny("llama", str(tmp_path / "other"))
    tok = train_tokenizer(vocab_size=300)  # same size class, different merges and ids
    tok.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="different tokenizer"):
        LLMEngine(model=tiny_target, dtype="float32", num_kv_blocks=8,
                  speculative_config={"method": "draft_model", "num_speculative_tokens": 2, "model": other})


def test_cli_rejects_bad_speculation(tiny_target, capsys):
    from pagedlm.cli import main

    assert main(["generate", "hi", "--model", tiny_target, "--num-speculative-tokens", "40"]) == 2
    assert "num_speculative_tokens must be an integer in [1, 16], got 40" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", tiny_target, "--speculative-config", '{"method": "medusa"}']) == 2
    assert "unknown speculative method 'medusa'" in capsys.readouterr().err


def test_cli_generate_with_speculation(tiny_target):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "pagedlm.cli", "generate", "Hello world! Hello world! Hello", "--model",
            tiny_target, "--max-tokens", "12", "--dtype", "float32", "--kv-cache-memory", "4M"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = lambda extra: subprocess.run(args + extra, capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    plain = run([])
    spec = run(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and plain.stdout.strip()


def test_logprobs_of_verified_runs(tiny_target):
    """Requests asking for logprobs speculate too: every token of a verified run reports the
    logprob, rank and top logprobs of its own verification row, equal to plain decoding's."""
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=4)
    sps = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2),
           SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=16, temperature=0.8, seed=5, ignore_eos=True, logprobs=0)]
    prompts = [REPEAT, REPEAT[3:], REPEAT[1:]]
    want = _run(LLMEngine(model=tiny_target, **kw), prompts[:2], sps[:2])
    spec = LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw)
    got = _run(spec, prompts, sps)
    assert _outputs({k: got[k] for k in want}) == _outputs(want)
    g_out, w_out = got["r0"].outputs[0], want["r0"].outputs[0]
    assert len(g_out.logprobs) == len(g_out.token_ids) == 16
    for g, w in zip(g_out.logprobs, w_out.logprobs):  # batch shapes differ: float noise
        assert {t: lp.rank for t, lp in g.items()} == {t: lp.rank for t, lp in w.items()}
        assert all(math.isclose(g[t].logprob, w[t].logprob, rel_tol=1e-4, abs_tol=1e-5) for t in g)
    assert got["r0"].metrics.spec_decode.num_accepted_tokens > 0  # it did speculate
    assert math.isclose(g_out.cumulative_logprob, w_out.cumulative_logprob, rel_tol=1e-4)
    # sampled: each kept token has its own entry, and the cumulative logprob is their sum
    s_out = got["r2"].outputs[0]
    assert got["r2"].metrics.spec_decode.num_drafts > 0
    assert len(s_out.logprobs) == len(s_out.token_ids) == 16
    assert all(t in e and e[t].rank >= 1 for t, e in zip(s_out.token_ids, s_out.logprobs))
    assert math.isclose(s_out.cumulative_logprob, sum(e[t].logprob for t, e in zip(s_out.token_ids, s_out.logprobs)),
                        rel_tol=1e-6, abs_tol=1e-6)


def test_compiled_verification_rows(tiny_target, monkeypatch):
    """Verification rows through the compiled decode step (1 + k decode rows over one block
    table, padded to a bucket) give plain eager decoding's tokens."""
    monkeypatch.delenv("PAGEDLM_ENFORCE_EAGER", raising=False)
    kw = dict(dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = [REPEAT, REPEAT[2:] + [40, 41], [50, 51, 52] * 4]
    sps = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)]
    want = _run(LLMEngine(model=tiny_target, enforce_eager=True, **kw), prompts[:2], sps[:2])
    # adaptive=False: every proposal is verified (the policy would drop them where the measured
    # rows do not pay, and this test is about the rows).
    spec = LLMEngine(model=tiny_target, enforce_eager=False,
                     speculative_config=dict(NGRAM, num_speculative_tokens=3, adaptive=False), **kw)
    compiled = spec.runner.compiled
    verified = []
    prepare = compiled.prepare

    def counting_prepare(out, *lora):
        step = prepare(out, *lora)
        if step is not None:
            verified.extend(len(s.spec_tokens) for s, _ in out.scheduled if s.spec_tokens)
        return step

    monkeypatch.setattr(compiled, "prepare", counting_prepare)
    got = _run(spec, prompts[:2], sps[:2])
    assert _outputs(got) == _outputs(want)
    assert verified and not compiled.failed
    # A sampled request next to them: it runs, stays within the budget and frees its blocks.
    spec_all = _run(spec, prompts, sps)
    assert [len(spec_all[f"r{i}"].outputs[0].token_ids) for i in range(3)] == [16, 9, 20]
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_adaptive_policy_adds_verification_buckets(tiny_target, monkeypatch):
    """With the adaptive policy, 1 + j verification rows get buckets of 3 and 6 (no padding to
    4 and 8); without it (and without speculation) the buckets are the powers of two."""
    monkeypatch.delenv("PAGEDLM_ENFORCE_EAGER", raising=False)
    kw = dict(dtype="float32", num_kv_blocks=16, block_size=4, max_num_seqs=8, enforce_eager=False)
    sizes = lambda cfg: LLMEngine(model=tiny_target, speculative_config=cfg, **kw).runner.compiled.sizes  # noqa: E731
    assert sizes(dict(NGRAM, num_speculative_tokens=7)) == [1, 2, 3, 4, 6, 8]
    assert sizes(dict(NGRAM, num_speculative_tokens=2)) == [1, 2, 3, 4, 8]
    assert sizes(dict(NGRAM, num_speculative_tokens=7, adaptive=False)) == [1, 2, 4, 8]
    assert sizes(None) == [1, 2, 4, 8]


def test_draft_steps_put_decode_rows_first(tiny_target, tiny_draft, monkeypatch):
    """The draft model's forwards order one-token rows before longer ones, as the scheduler does:
    the attention backend computes a step's first rows as its decodes (mixed in any order, a
    draft's rows read the wrong queries and came out wrong, even NaN)."""
    kw = dict(dtype="float32", num_kv_blocks=512, block_size=4, max_num_seqs=16)
    prompts = _mixed_prompts(16, seed=4)
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) for _ in prompts]
    spec = LLMEngine(model=tiny_target, speculative_config={"method": "draft_model", "num_speculative_tokens": 3,
                                                            "model": tiny_draft}, **kw)
    runner = spec.spec.proposer.runner
    prepare, mixed = runner.prepare, []

    def checked(sched):
        counts = [n for _, n in sched.scheduled]
        mixed.append(min(counts) == 1 < max(counts))
        assert counts == sorted(counts, key=lambda n: n > 1), counts
        return prepare(sched)

    monkeypatch.setattr(runner, "prepare", checked)
    got = _run(spec, prompts, params)
    assert _outputs(got) == _outputs(_run(LLMEngine(model=tiny_target, **kw), prompts, params))
    assert sum(mixed) > 0  # steps did mix one-token and longer rows
