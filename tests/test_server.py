"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 (free port),
the tiny random Llama from ``server_fixtures``, and the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.server.app import ServerConfig, build_app
from tests.server_fixtures import ServerThread, tiny_model_dir

API_KEY = "sk-test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 512
PROMPTS = [f"The quick brown fox number {i} jumps over" for i in range(32)]


def _engine(model_dir: str, **kw) -> LLMEngine:
    cfg = dict(model=model_dir, dtype="float32", kv_cache_memory=4 << 20, max_num_seqs=64, seed=0)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The in-process engine (a thread); ``PAGEDLM_TEST_ENGINE_CORE=process`` runs the same tests
    against the engine core in its own process (``serve``'s default)."""
    model = tiny_model_dir(tmp_path_factory)
    if os.environ.get("PAGEDLM_TEST_ENGINE_CORE") == "process":
        from pagedlm.engine.core_process import CoreEngineClient

        aeng = CoreEngineClient(dict(model=model, dtype="float32", kv_cache_memory=4 << 20, max_num_seqs=64, seed=0,
                                     max_model_len=MAX_MODEL_LEN))
    else:
        aeng = AsyncLLMEngine(_engine(model, max_model_len=MAX_MODEL_LEN))
    app = build_app(aeng, ServerConfig(served_model_name=MODEL, api_key=API_KEY, max_body_bytes=64 * 1024))
    with ServerThread(app, aeng) as srv:
        srv.engine = aeng.engine
        yield srv
    assert not any(t.name == "pagedlm-engine" for t in threading.enumerate())


def assert_all_blocks_free(http: httpx.Client) -> None:
    """Every KV block free and no request left in the engine (read through the engine view)."""
    state = http.get("/v1/engine/state", params={"blocks": False}).json()
    assert state["metrics"]["num_free_blocks"] == state["num_blocks"]
    assert not any(state["queues"].values()) and not state["sequences"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


def scrape(http: httpx.Client) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def wait_idle(http: httpx.Client, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(http)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: {m}")
        time.sleep(0.02)


def greedy(client, prompt: str, **kw) -> str:
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)
    return r.choices[0].text


# ---- endpoints ---------------------------------------------------------------------------------
def test_models_health_and_metrics_names(server, client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "decode_buckets": None}  # eager server
    m = scrape(http)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):
        assert name in m, name
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/tokenizer_info"):
        assert path in schema["paths"]
    assert "CompletionRequest" in schema["components"]["schemas"]


def test_tokenizer_info_is_the_tokenizers_own_configuration(server, http):
    """GET /tokenizer_info, as vLLM's: the configuration the tokenizer was loaded with, its chat
    template and class; nothing it does not hold (no file paths, no unknown model_max_length)."""
    tok = server.engine.tokenizer
    r = http.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template and info["chat_template"]
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|endoftext|>"
    assert info["added_tokens_decoder"]["2"] == "<|im_end|>" == tok.convert_ids_to_tokens(2)
    assert not {"vocab_file", "merges_file", "tokenizer_file", "model_max_length"} & set(info)
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # behind the API key, as /tokenize


def test_tokenizer_config_keeps_what_json_can_say():
    from tokenizers import AddedToken

    from pagedlm.server.serving_tokenization import tokenizer_config

    class Tok:
        chat_template = None
        init_kwargs = {"eos_token": AddedToken("</s>", special=True), "model_max_length": 4096,
                       "vocab_file": "/srv/models/vocab.json", "extra_ids": (1, 2), "odd": object(),
                       "added_tokens_decoder": {0: AddedToken("<unk>"), 1: {"content": "<s>", "x": object()}}}

    assert tokenizer_config(Tok()) == {"eos_token": "</s>", "model_max_length": 4096, "extra_ids": [1, 2],
                                       "added_tokens_decoder": {"0": "<unk>", "1": {"content": "<s>"}},
                                       "tokenizer_class": "Tok"}

    class Built(Tok):  # a tokenizer built from GGUF metadata: its own added tokens, none in init_kwargs
        added_tokens_decoder = {5: AddedToken("<x>")}

    assert tokenizer_config(Built())["added_tokens_decoder"] == {"5": "<x>"}


def test_completion_usage_timings_and_stream_match(client, http):
    before = scrape(http)
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"])
    assert r.usage.completion_tokens == 12 or c.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["prompt_n"] == r.usage.prompt_tokens and t["predicted_n"] == r.usage.completion_tokens
    assert t["ttft_ms"] > 0 and t["queue_ms"] >= 0
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 1
    after = scrape(http)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 2 * r.usage.completion_tokens
    assert after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] == 2
    assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]


def test_token_id_prompts_and_lists(client, http):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    text = greedy(client, "Hello world", max_tokens=6)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == text
    r = client.completions.create(model=MODEL, prompt=["Hello world", "Paris is"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in r2.choices] == [text, text]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"


def test_chat_matches_template_and_streams(client, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant"
    # The chat prompt is the template rendered and tokenized without extra special tokens.
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert same.choices[0].text == msg.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].model_extra["timings"]["predicted_n"] == r.usage.completion_tokens


def test_n2_seed_and_sampling_extras(client):
    kw = dict(model=MODEL, prompt="One two three", max_tokens=8, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert 2 <= a.usage.completion_tokens <= 16
    r = client.completions.create(**kw, extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                                   "min_tokens": 8, "ignore_eos": True})
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_completion_tokens=6, n=2, seed=3, stream=True))
    done = {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
    assert set(done) == {0, 1}


def test_stop_strings_cut_in_both_modes(client):
    full = greedy(client, "Hello world", max_tokens=24, extra_body={"ignore_eos": True})
    # A stop string from the middle of the greedy text, spanning a token boundary if possible.
    start = len(full) // 2
    stop = full[start:start + 3]
    assert len(stop) == 3
    expected = full[:full.find(stop)]
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text or "\ufffd" in r.choices[0].text
    for top, tok_lp in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and tok_lp <= 0
        assert max(top.values()) == pytest.approx(tok_lp, abs=1e-5)  # greedy: the sampled token is the top one
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
               for t in content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, stream=True))
    streamed = [t.logprob for ch in chunks for c_ in ch.choices if c_.logprobs for t in c_.logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in content])


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200


# ---- load, disconnects, faults -----------------------------------------------------------------
def test_32_concurrent_streams_complete_and_free_everything(server, client, http):
    expected = [greedy(client, p, max_tokens=24) for p in PROMPTS]
    threads_before = {t.ident for t in threading.enumerate()}

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
        text, reason, usage = [], None, 0
        async for ch in stream:
            if ch.choices:
                text.append(ch.choices[0].text)
                reason = ch.choices[0].finish_reason or reason
            if ch.usage:
                usage = ch.usage.completion_tokens
        return "".join(text), reason, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, p) for p in PROMPTS)), 60)

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected
    assert all(r[1] in ("stop", "length") and r[2] >= 1 for r in results)
    m = wait_idle(http)
    assert_all_blocks_free(http)
    assert m["vllm:num_preemptions_total"] >= 0
    new_threads = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert not new_threads, new_threads


def test_stream_disconnect_aborts_and_frees_blocks(server, http):
    before = wait_idle(http)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
    # The server notices the closed connection, aborts the request and frees its blocks.
    after = wait_idle(http, timeout=5)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 400
    assert_all_blocks_free(http)


def test_blocking_request_disconnect_aborts(server, http):
    before = wait_idle(http)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.3)
    after = wait_idle(http, timeout=5)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 440


LONG_IDS = [5] * (MAX_MODEL_LEN + 10)
BAD_INPUTS = [
    # (path, body, status, param, code)
    ("/v1/completions", b'{"prompt": "hi", ', 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 400, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 400, "model",
     "model_not_found"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "n": 100}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported"),
    ("/v1/completions", {"prompt": [10**6]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": LONG_IDS}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello " * 600}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None, None),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens", None),
    ("/v1/completions", {"prompt": "x" * (70 * 1024)}, 413, None, "request_too_large"),
    ("/v1/nothing", {"prompt": "hi"}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD_INPUTS)
def test_bad_input_gets_openai_error_and_server_keeps_serving(client, http, path, body, status, param, code):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None


def test_chunked_body_over_limit_is_413(http):
    def gen():
        for _ in range(80):
            yield b"x" * 1024

    r = http.post("/v1/completions", content=gen(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_overload_503_then_recovers(tmp_path_factory):
    engine = _engine(tiny_model_dir(tmp_path_factory), max_num_seqs=1)
    aeng = AsyncLLMEngine(engine, max_waiting=1)
    app = build_app(aeng, ServerConfig(served_model_name=MODEL))
    with ServerThread(app, aeng) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        long = {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as a:
            a_lines = a.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(line for line in a_lines if line.startswith("data: "))  # A is running
            b_result = {}
            b = threading.Thread(target=lambda: b_result.update(
                r=http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})))
            b.start()
            deadline = time.monotonic() + 10
            while scrape(http)["vllm:num_requests_waiting"] < 1:  # B waits for A's slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "overloaded" and "max-waiting" in r.json()["error"]["message"]
        b.join(30)  # closing A aborted it, so B runs
        assert b_result["r"].status_code == 200
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).status_code == 200


def test_shutdown_aborts_streams_and_stops_threads(tmp_path_factory):
    engine = _engine(tiny_model_dir(tmp_path_factory))
    aeng = AsyncLLMEngine(engine)
    app = build_app(aeng, ServerConfig(served_model_name=MODEL))
    threads_before = set(threading.enumerate())
    srv = ServerThread(app, aeng).start()
    lines: list[str] = []

    def read():
        body = {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while not any(line.startswith("data: {") for line in lines):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    srv.stop()
    reader.join(10)
    assert not reader.is_alive()
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.num_kv_blocks
    assert set(threading.enumerate()) <= threads_before  # the engine and server threads are gone
    assert not aeng.is_running


@pytest.mark.parametrize("shutdown_timeout, finish", [(60, "length"), (0.3, "abort")])
def test_cli_serve_sigterm_drains_then_exits_zero(tmp_path_factory, shutdown_timeout, finish):
    """SIGTERM: new requests get 503 at once (the listener stays open), the running stream goes
    on to its end within --shutdown-timeout (else it is aborted), then the process exits 0."""
    model = tiny_model_dir(tmp_path_factory)
    cmd = [sys.executable, "-m", "pagedlm.cli", "serve", "--model", model, "--dtype", "float32",
           "--kv-cache-memory", "4M", "--port", "0", "--api-key", "k", "--log-level", "warning",
           "--shutdown-timeout", str(shutdown_timeout)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PAGEDLM_API_KEY": ""})
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited during start-up"
            if "listening on " in line:
                url = line.split("listening on ")[1].strip()
            assert time.monotonic() < deadline
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/v1/models").status_code == 401
        h = {"Authorization": "Bearer k"}
        during: dict[str, httpx.Response] = {}
        with httpx.stream("POST", url + "/v1/completions", headers=h, timeout=30,
                          json={"prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
                        if finish == "length":  # while draining: refused, not dropped
                            time.sleep(0.2)
                            during["new"] = httpx.post(url + "/v1/completions", headers=h, timeout=10,
                                                       json={"prompt": "Hi", "max_tokens": 2})
                            during["health"] = httpx.get(url + "/health", timeout=10)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        assert last["finish_reason"] == finish
        if finish == "length":
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
            assert len(text) > 0 and during["new"].status_code == 503 and during["health"].status_code == 503
            assert "shutting down" in during["new"].json()["error"]["message"]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
