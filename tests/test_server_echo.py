"""/v1/completions with ``echo`` and ``logprobs``: the prompt scored, as evaluation harnesses
(lm-eval's local-completions) use it to rank choices, checked against the offline ``LLM``'s
``prompt_logprobs`` on the tiny model. The server's budget is 16 tokens a step, so the prompts
here are prefilled in several chunks."""

from __future__ import annotations

import time

import pytest

from pagedlm import LLM, SamplingParams
from tests.server_fixtures import serve_engine, tiny_model_dir

MODEL = "tiny"
CONTEXT = "Question: which city is the capital of France, and which river runs through it? Answer:"
CHOICES = [" Paris, on the Seine.", " Berlin, on the Spree.", " Rome."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_engine(model_dir, MODEL, dtype="float32", num_kv_blocks=256, max_num_seqs=8, seed=0,
                      max_model_len=512, max_num_batched_tokens=16) as srv:
        yield srv


def ids_of(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_scores_equal_offline_prompt_logprobs(model_dir, client, http):
    """lm-eval's log-likelihood request (token-id prompts, echo, logprobs 1, max_tokens 0 or
    1): the continuation's logprobs summed equal the offline LLM's prompt_logprobs of the same
    tokens, and is_greedy reads the same from top_logprobs."""
    ctx = ids_of(http, CONTEXT)
    prompts = [ctx + ids_of(http, c) for c in CHOICES]
    assert all(len(p) > 16 for p in prompts)  # several prefill chunks each
    offline = LLM(model_dir, dtype="float32", num_kv_blocks=256, max_num_batched_tokens=2048).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=0),
        use_tqdm=False)
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, prompts))
    sums = []
    for choice, ids, want in zip(r.choices, prompts, offline, strict=True):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and choice.text == http.post(
            "/detokenize", json={"tokens": ids}).json()["prompt"]
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(ids))]
        ref = [want.prompt_logprobs[k][ids[k]].logprob for k in range(1, len(ids))]
        assert lp.token_logprobs[1:] == pytest.approx(ref, abs=1e-4)
        cont = lp.token_logprobs[len(ctx):]
        assert sum(cont) == pytest.approx(sum(ref[len(ctx) - 1:]), abs=1e-3)
        sums.append(sum(cont))
        greedy = all(t == max(top.values()) for t, top in zip(cont, lp.top_logprobs[len(ctx):], strict=True))
        want_greedy = all(e[ids[k]].logprob == max(v.logprob for v in e.values())
                          for k, e in enumerate(want.prompt_logprobs) if k >= len(ctx))
        assert greedy == want_greedy
        # max_tokens 1 (what lm-eval sends): the same prompt entries, then the generated token's
        one = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                        temperature=0).choices[0]
        assert one.logprobs.token_logprobs[:-1] == pytest.approx(lp.token_logprobs, abs=1e-5)
        assert one.logprobs.tokens[:-1] == lp.tokens and one.text.startswith(choice.text)
        tok = want.outputs[0].token_ids[0]
        assert one.logprobs.token_logprobs[-1] == pytest.approx(want.outputs[0].logprobs[0][tok].logprob, abs=1e-4)
    assert len(set(sums)) == len(CHOICES)  # the choices are told apart


def test_echo_logprobs_prompt_then_completion_streamed_or_not(client):
    """Text prompts, n = 2, a completion after the prompt: each choice's logprobs are the
    prompt's then its own tokens', and the stream sends the same, the prompt in its own chunk."""
    kw = dict(model=MODEL, prompt=[CONTEXT, "Hello there"], echo=True, logprobs=2, max_tokens=5, temperature=0, n=2)
    r = client.completions.create(**kw)
    plain = client.completions.create(**{**kw, "echo": False})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, p in zip(r.choices, plain.choices, strict=True):
        prompt = CONTEXT if c.index < 2 else "Hello there"
        assert c.text == prompt + p.text
        n_prompt = len(c.logprobs.tokens) - len(p.logprobs.tokens)
        assert "".join(c.logprobs.tokens[:n_prompt]) == prompt  # byte-level BPE: tokens spell the prompt
        assert c.logprobs.tokens[n_prompt:] == p.logprobs.tokens
        assert c.logprobs.token_logprobs[n_prompt:] == pytest.approx(p.logprobs.token_logprobs, abs=1e-4)
        assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
        assert all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs[1:])
        assert c.logprobs.text_offset[n_prompt] == len(prompt)
    assert r.choices[0].logprobs.token_logprobs[:20] == r.choices[1].logprobs.token_logprobs[:20]  # one prompt
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    got = {i: {"text": "", "tokens": [], "token_logprobs": [], "text_offset": [], "first": None} for i in range(4)}
    for ch in chunks:
        for c in ch.choices:
            g = got[c.index]
            if g["first"] is None:
                g["first"] = c.text
            g["text"] += c.text
            if c.logprobs:
                for k in ("tokens", "token_logprobs", "text_offset"):
                    g[k] += getattr(c.logprobs, k)
    for c in r.choices:
        g = got[c.index]
        assert g["first"] == (CONTEXT if c.index < 2 else "Hello there")  # the prompt's chunk first
        assert g["text"] == c.text and g["tokens"] == c.logprobs.tokens and g["text_offset"] == c.logprobs.text_offset
        assert g["token_logprobs"] == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_max_tokens_0_streamed(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", echo=True, logprobs=0, max_tokens=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert texts == [("Hello there", None), ("", "length")]
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[0] is None and len(first.tokens) == chunks[-1].usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 0
    # without logprobs the prompt goes out at once, as before
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", echo=True, max_tokens=0, stream=True))
    assert [(c.choices[0].text, c.choices[0].logprobs) for c in chunks if c.choices] == [("Hello there", None),
                                                                                         ("", None)]
    r = client.completions.create(model=MODEL, prompt="Hello there", echo=True, max_tokens=0)
    assert r.choices[0].text == "Hello there" and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


def test_every_block_is_free_after(server):
    deadline = time.monotonic() + 5
    while server.engine.requests or server.engine.block_manager.num_free_blocks != server.engine.num_kv_blocks:
        assert time.monotonic() < deadline, "blocks still held"
        time.sleep(0.02)
