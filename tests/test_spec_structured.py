"""Speculative decoding of structured-output requests: each verification row is masked by the
grammar after the proposals before it, so greedy output is plain constrained decoding's, token
for token, sampled output follows its distribution, and rejected proposals leave the grammar
where plain decoding leaves it."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from pagedlm import LLM, SamplingParams, StructuredOutputsParams
from pagedlm.engine.engine import LLMEngine
from pagedlm.engine.spec_decode import Proposal, lookup
from tests import test_spec_decode as spec_tests
from tests.structured_cases import CHOICES, REGEXES, SCHEMAS
from tests.test_spec_decode import NGRAM, _chi2_two_sample, _outputs, _run

tiny_target, tiny_draft = spec_tests.tiny_target, spec_tests.tiny_draft  # the same fixtures

# Repetitive languages: n-gram lookup finds matches in the output itself.
WORDS = r"(ab|cd|abc|dab)( (ab|cd|abc|dab)){12}"
GRAMMARS = [
    StructuredOutputsParams(json=SCHEMAS["array_of_objects"]),
    StructuredOutputsParams(json=SCHEMAS["nested_object"]),
    StructuredOutputsParams(regex=WORDS),
    StructuredOutputsParams(regex=REGEXES["word_list"]),
    StructuredOutputsParams(choice=CHOICES),
    StructuredOutputsParams(json_object=True),
]


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(4, 12))] * 2 for _ in range(n)]


def _params(i: int, **kw) -> SamplingParams:
    """Constrained (every grammar) and unconstrained requests, interleaved."""
    g = GRAMMARS[i // 2 % len(GRAMMARS)] if i % 2 == 0 else None
    return SamplingParams(max_tokens=28, temperature=0, ignore_eos=g is None, structured_outputs=g, **kw)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_constrained_equals_plain_in_a_mixed_batch(tiny_target, tiny_draft, method):
    """Constrained and unconstrained requests in one batch, a small pool (preemptions replay the
    grammar), chunked prefill: token for token what plain decoding gives, with proposals
    accepted for the constrained ones."""
    kw = dict(dtype="float32", num_kv_blocks=40, block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
    n = 2 * len(GRAMMARS)
    prompts, params = _prompts(n), [_params(i) for i in range(n)]
    want = _run(LLMEngine(model=tiny_target, **kw), prompts, params)
    cfg = dict(NGRAM) if method == "ngram" else {"method": "draft_model", "num_speculative_tokens": 3,
                                                 "model": tiny_draft}
    spec = LLMEngine(model=tiny_target, speculative_config=cfg, **kw)
    got = _run(spec, prompts, params)
    assert _outputs(got) == _outputs(want)
    assert spec.scheduler.num_preemptions > 0
    constrained = [got[f"r{i}"].metrics.spec_decode for i in range(0, n, 2)]
    assert sum(s.num_accepted_tokens for s in constrained) > 0
    assert sum(s.num_draft_tokens - s.num_accepted_tokens for s in constrained) > 0  # and rejected
    for i in range(0, n, 2):
        if params[i].structured_outputs.json is not None and got[f"r{i}"].outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(got[f"r{i}"].outputs[0].text), params[i].structured_outputs.json)
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


class _ScriptedProposer:
    """Proposals mostly invalid for the grammar: n-gram lookups and random tokens."""

    def __init__(self, vocab: int):
        self.rng, self.vocab = random.Random(5), vocab

    def propose(self, seqs, engine):
        out = {}
        for seq, k in seqs:
            toks = lookup(seq.token_ids, 1, 3, k) if self.rng.random() < 0.5 else []
            out[seq.seq_id] = Proposal(toks or [self.rng.randrange(self.vocab) for _ in range(k)])
        return out

    def release(self, live_ids):
        pass


def _fresh_mask(engine: LLMEngine, seq) -> list[int]:
    """The next-token mask of a new matcher fed the sequence's output: where plain decoding is."""
    m = engine.grammars.compiled(seq.params.structured_outputs).deep_copy()
    assert m.consume_tokens(seq.token_ids[seq.num_prompt_tokens:])
    return engine.grammars.fill([m])[0].tolist()


def test_rejected_proposals_leave_the_grammar_where_plain_decoding_does(tiny_target):
    """After every step, each constrained sequence's matcher allows exactly what a new matcher
    fed its output allows; outputs equal plain decoding's."""
    kw = dict(dtype="float32", num_kv_blocks=256, block_size=4)
    n = 2 * len(GRAMMARS)
    prompts, params = _prompts(n), [_params(i) for i in range(n)]
    want = _run(LLMEngine(model=tiny_target, **kw), prompts, params)
    spec = LLMEngine(model=tiny_target, speculative_config=NGRAM, **kw)
    spec.spec.proposer = _ScriptedProposer(spec.model_config.vocab_size)
    spec.spec.policy = None
    for i, (p, sp) in enumerate(zip(prompts, params)):
        spec.add_request(f"r{i}", None, sp, prompt_token_ids=p)
    done, checked = {}, 0
    while spec.has_unfinished_requests():
        for o in spec.step():
            if o.finished:
                done[o.request_id] = o
        for seq in spec.scheduler.running:
            if seq.grammar is not None and not seq.is_finished:
                assert spec.grammars.fill([seq.grammar])[0].tolist() == _fresh_mask(spec, seq)
                checked += 1
    assert _outputs(done) == _outputs(want) and checked > 20
    m = spec.get_metrics()
    assert m["spec_decode_num_accepted_tokens"] > 0 and m["spec_decode_num_drafts"] > 0


def test_grammar_walk_masks_and_rollback(tiny_target):
    """Each row of a walk is the mask after that many tokens; closing it restores the matcher."""
    engine = LLMEngine(model=tiny_target, dtype="float32", num_kv_blocks=16)
    g = engine.structured_outputs()
    template = g.compiled(StructuredOutputsParams(regex=WORDS))
    tokens = engine.encode("ab cd abc")
    tokens = tokens[1:] if tokens and tokens[0] == engine.tokenizer.bos_token_id else tokens
    m = template.deep_copy()
    before = g.fill([m])[0].clone()
    masks = g.masks_along(m, tokens)
    assert masks.shape[0] == len(tokens) + 1
    for i in range(len(tokens) + 1):
        fresh = template.deep_copy()
        assert fresh.consume_tokens(tokens[:i])
        assert masks[i].tolist() == g.fill([fresh])[0].tolist()
    assert g.fill([m])[0].tolist() == before.tolist() and m.consume_tokens(tokens)
    walk = g.walk(template.deep_copy(), 3)
    with pytest.raises(ValueError, match="not allowed"):
        walk.push(engine.encode("zzz")[-1])
    walk.close()


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_constrained_tokens_follow_the_masked_distribution(tiny_target, tiny_draft, method):
    """Seeded sampled requests under a regex, with and without speculation: per position and
    for consecutive pairs, the token frequencies agree (chi-square, p > 1e-3)."""
    n = 600
    regex = r"(ab|cd|abc|dab)( (ab|cd|abc|dab)){5}"
    sps = [SamplingParams(max_tokens=24, temperature=1.0, seed=100 + i, structured_outputs={"regex": regex})
           for i in range(n)]
    prompt = [_prompts(1)[0]]
    kw = dict(dtype="float32", num_kv_blocks=2048, block_size=4, max_num_seqs=128, max_num_batched_tokens=4096)
    plain = _run(LLMEngine(model=tiny_target, **kw), prompt * n, sps)
    cfg = dict(NGRAM, num_speculative_tokens=3) if method == "ngram" else {
        "method": "draft_model", "num_speculative_tokens": 3, "model": tiny_draft}
    spec_engine = LLMEngine(model=tiny_target, speculative_config=cfg, **kw)
    spec = _run(spec_engine, prompt * n, sps)
    m = spec_engine.get_metrics()
    accepted, proposed = m["spec_decode_num_accepted_tokens"], m["spec_decode_num_draft_tokens"]
    assert accepted >= 50 and proposed - accepted >= 50, m
    assert all(o.outputs[0].finish_reason == "stop" and re.fullmatch(regex, o.outputs[0].text) for o in spec.values())
    for pos in range(1, 6):
        a = [tuple(plain[f"r{i}"].outputs[0].token_ids[pos:pos + 1]) for i in range(n)]
        b = [tuple(spec[f"r{i}"].outputs[0].token_ids[pos:pos + 1]) for i in range(n)]
        assert _chi2_two_sample([str(x) for x in a], [str(x) for x in b]) > 1e-3, pos
    a = [str(tuple(plain[f"r{i}"].outputs[0].token_ids[1:3])) for i in range(n)]
    b = [str(tuple(spec[f"r{i}"].outputs[0].token_ids[1:3])) for i in range(n)]
    common = {x for x in set(a) | set(b) if a.count(x) + b.count(x) >= 20}
    assert _chi2_two_sample([x if x in common else "" for x in a], [x if x in common else "" for x in b]) > 1e-3


SMOL_SCHEMA = {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"], "additionalProperties": False}}


def test_greedy_constrained_identical_on_smollm2(smollm2, smollm2_llm):
    """The real model in float32, n-gram lookup: a JSON schema, a regex and a choice give plain
    constrained greedy decoding's tokens, with proposals accepted."""
    prompts = ["List three people with their ages as JSON: Alice 30, Bob 25, Carol 41.",
               "Count from one to six in words, separated by commas:", "Is the sky blue? Answer:"]
    sps = [SamplingParams(max_tokens=48, temperature=0, structured_outputs={"json": SMOL_SCHEMA}),
           SamplingParams(max_tokens=32, temperature=0, structured_outputs={"regex": r"[a-z]+(, [a-z]+){5}"}),
           SamplingParams(max_tokens=8, temperature=0, structured_outputs={"choice": ["yes", "no", "maybe"]})]
    want = smollm2_llm.generate(prompts, sps, use_tqdm=False)
    llm = LLM(smollm2, dtype="float32", kv_cache_memory=64 << 20, quantization="none", speculative_config=NGRAM)
    got = llm.generate(prompts, sps, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
    jsonschema.validate(json.loads(got[0].outputs[0].text), SMOL_SCHEMA)
    assert got[0].metrics.spec_decode.num_accepted_tokens > 0, got[0].metrics.spec_decode
