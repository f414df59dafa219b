"""Streams are built from the engine's deltas: under load, the concatenated stream equals the
non-streamed answer, for every feature that shapes the stream (stop strings and their holdback,
n > 1, several prompts, echo, logprobs, tool calls in each tool_choice mode).

A slow event loop makes ``RequestStream`` skip outputs (it then concatenates their deltas); the
test counts those merges so that it cannot pass without exercising them. Also: the one
exception -> OpenAI error mapping (``server/errors.py``) that streams and routes share.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from pagedlm.engine import async_engine as async_engine_mod
from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.sampling_params import SamplingParams
from pagedlm.server import serving
from pagedlm.server.app import ServerConfig, build_app
from tests.server_fixtures import ServerThread, tiny_model_dir
from tests.structured_cases import SCHEMAS

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Once upon a time", "Hello world", "Paris is the capital of"]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS["tool_args"]}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}
HERMES = 'Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
BARE = '[{"name": "get_time", "arguments": {"tz": "CET"}}, {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=2048, max_num_seqs=64,
                                    seed=0, max_model_len=1024))
    aeng = AsyncLLMEngine(engine)
    with ServerThread(build_app(aeng, ServerConfig(served_model_name=MODEL)), aeng) as srv:
        srv.engine = engine
        yield srv


# ---- reducing a response to what a client ends up with ----------------------------------------
def _choice_state() -> dict:
    # "top": the top-logprob tokens (exact); "values": the logprob values (batch-dependent in the
    # last digits: compared approximately).
    return {"text": "", "finish": None, "stop": None, "tokens": [], "top": [], "values": [], "offsets": [],
            "calls": {}}


def _add_logprobs(st: dict, lp: dict | None) -> None:
    if not lp:
        return
    if "content" in lp:  # chat
        for t in lp["content"]:
            st["tokens"].append(t["token"])
            st["top"].append([x["token"] for x in t["top_logprobs"]])
            st["values"] += [t["logprob"]] + [x["logprob"] for x in t["top_logprobs"]]
    else:
        for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            st["tokens"].append(tok)
            st["top"].append(sorted(top))
            st["values"] += [value] + [top[k] for k in sorted(top)]
        st["offsets"] += lp["text_offset"]


def _reduce(path: str, body: dict) -> dict[int, dict]:
    """A non-streamed response, per choice index."""
    out = {}
    for ch in body["choices"]:
        st = out[ch["index"]] = _choice_state()
        st["finish"], st["stop"] = ch["finish_reason"], ch.get("stop_reason")
        _add_logprobs(st, ch.get("logprobs"))
        if path.endswith("chat/completions"):
            st["text"] = ch["message"]["content"] or ""
            st["calls"] = {k: (c["function"]["name"], c["function"]["arguments"])
                           for k, c in enumerate(ch["message"].get("tool_calls") or [])}
        else:
            st["text"] = ch["text"]
    return out


def _reduce_stream(path: str, events: list[dict]) -> dict[int, dict]:
    """The chunks of a streamed response, concatenated per choice index."""
    out: dict[int, dict] = {}
    for ev in events:
        for ch in ev["choices"]:
            st = out.setdefault(ch["index"], _choice_state())
            assert st["finish"] is None, f"choice {ch['index']} got a chunk after its finish_reason"
            st["finish"] = ch["finish_reason"]
            st["stop"] = ch.get("stop_reason") if ch["finish_reason"] else None
            _add_logprobs(st, ch.get("logprobs"))
            if path.endswith("chat/completions"):
                st["text"] += ch["delta"].get("content") or ""
                for d in ch["delta"].get("tool_calls") or []:
                    name, args = st["calls"].get(d["index"], ("", ""))
                    fn = d.get("function") or {}
                    st["calls"][d["index"]] = (name + (fn.get("name") or ""), args + (fn.get("arguments") or ""))
            else:
                st["text"] += ch["text"]
    return out


async def _stream(client: httpx.AsyncClient, path: str, body: dict) -> list[dict]:
    events = []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return events
            ev = json.loads(data)
            assert "error" not in ev, ev
            events.append(ev)
    raise AssertionError("the stream ended without [DONE]")


def _requests(full: list[str]) -> list[tuple[str, dict]]:
    """Requests covering what shapes a stream; stop strings come from the greedy texts ``full``."""
    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    base = {"model": MODEL, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    reqs: list[tuple[str, dict]] = []
    for p, text in zip(PROMPTS, full, strict=True):
        mid = len(text) // 2
        reqs += [
            (cmpl, {**base, "prompt": p, "stop": [text[mid:mid + 3]]}),  # cut in the middle
            # Never matches, but its first two characters hold text back until the next token.
            (cmpl, {**base, "prompt": p, "stop": [text[mid - 4:mid - 2] + "\x00", text[-2:] + "\x01"]}),
            (cmpl, {**base, "prompt": p, "n": 2, "temperature": 0.8, "seed": 5, "stop": [text[mid:mid + 2]],
                    "include_stop_str_in_output": True}),
            (cmpl, {**base, "prompt": p, "logprobs": 2, "stop": [text[mid + 2:mid + 4]]}),
        ]
    reqs += [
        (cmpl, {**base, "prompt": PROMPTS[:2], "n": 2, "echo": True}),
        (cmpl, {**base, "prompt": [[1, 2, 3, 4], [5, 6, 7]], "logprobs": 1}),
        (chat, {**base, "messages": MSGS, "stop": [full[0][:1]], "n": 2, "seed": 3, "temperature": 0.7}),
        (chat, {**base, "messages": MSGS, "logprobs": True, "top_logprobs": 2}),
        (chat, {**base, "messages": MSGS, "max_tokens": 120, "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        (chat, {**base, "messages": MSGS, "max_tokens": 160, "tools": [WEATHER, TIME], "tool_choice": "required",
                "n": 2, "seed": 1, "temperature": 0.7}),
        (chat, {**base, "messages": MSGS, "max_tokens": 60, "tools": [WEATHER, TIME],
                "guided_regex": re.escape(HERMES)}),
        # auto, bare JSON calls: whole, and cut by max_tokens inside the second call's arguments
        (chat, {**base, "messages": MSGS, "max_tokens": 160, "tools": [WEATHER, TIME], "guided_regex": re.escape(BARE)}),
        (chat, {**base, "messages": MSGS, "max_tokens": 85, "tools": [WEATHER, TIME], "guided_regex": re.escape(BARE)}),
    ]
    return reqs


def test_streams_under_load_equal_the_non_streamed_answers(server, monkeypatch):
    merges = 0
    merge = async_engine_mod._merge

    def counting_merge(old, new):
        nonlocal merges
        merges += 1
        return merge(old, new)

    def slow_sse(obj) -> str:
        time.sleep(0.002)  # a busy event loop: the engine thread runs ahead of the streams
        return sse(obj)

    sse = serving.sse

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            full = [(await client.post("/v1/completions", json={
                "model": MODEL, "prompt": p, "temperature": 0, "max_tokens": 24, "ignore_eos": True})).json()
                    ["choices"][0]["text"] for p in PROMPTS]
            reqs = _requests(full) * 2  # each twice, for more concurrent streams
            expected = [_reduce(path, (await client.post(path, json=body)).json()) for path, body in reqs]
            monkeypatch.setattr(async_engine_mod, "_merge", counting_merge)
            monkeypatch.setattr(serving, "sse", slow_sse)
            streamed = await asyncio.wait_for(
                asyncio.gather(*(_stream(client, path, body) for path, body in reqs)), 300)
            return reqs, expected, streamed

    reqs, expected, streamed = asyncio.run(main())
    assert merges > 0, "the consumers never fell behind: the test did not exercise merged deltas"
    stops = calls = cut_calls = 0
    for (path, body), want, events in zip(reqs, expected, streamed, strict=True):
        got = _reduce_stream(path, events)
        # Tool call arguments: the same text (as generated, streamed as they grow), also when cut.
        for st in want.values():
            st["values"] = pytest.approx(st["values"], abs=1e-4)
        assert got == want, repr((path, body, got, want))
        stops += sum(isinstance(st["stop"], str) for st in got.values())
        calls += sum(len(st["calls"]) for st in got.values())
        cut_calls += sum(st["finish"] == "length" and len(st["calls"]) == 2 for st in got.values())
        if body.get("echo"):  # the prompts come first, in a chunk of their own
            assert [c["text"] for c in events[0]["choices"]] == [p for p in body["prompt"] for _ in range(2)]
    assert stops >= 8  # stop strings did cut texts
    assert calls >= 14  # and tool calls were streamed (named, required n=2, auto x3: twice each)
    assert cut_calls == 2  # the cut bare reply: its second call with the arguments generated so far
    assert not server.engine.requests


def test_request_stream_merges_skipped_deltas(model_dir):
    """A consumer that falls behind gets fewer outputs, whose deltas still add up to the text."""
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=256, max_num_seqs=8, seed=0))
    aeng = AsyncLLMEngine(engine)
    aeng.start()
    params = SamplingParams(n=2, max_tokens=32, ignore_eos=True, temperature=0.8, seed=1, stop=["e "])

    async def one(i: int, delay: float):
        texts, ids, seen = ["", ""], [[], []], 0
        async for out in aeng.generate(f"r{i}", PROMPTS[i % 4], params):
            seen += 1
            for c in out.outputs:
                texts[c.index] += c.text_delta
                ids[c.index] += c.token_ids_delta
            await asyncio.sleep(delay)
        return out, texts, ids, seen

    async def main():
        return await asyncio.gather(*(one(i, 0.05 if i % 2 else 0.0) for i in range(6)))

    try:
        results = asyncio.run(main())
    finally:
        aeng.shutdown()
    for final, texts, ids, _ in results:
        assert texts == [c.text for c in final.outputs]
        assert ids == [c.token_ids for c in final.outputs]
    slow = results[1::2]  # these skipped outputs: fewer of them than tokens
    assert sum(seen for *_, seen in slow) < sum(len(c.token_ids) for r in slow for c in r[0].outputs) / 2


def test_one_error_mapping_before_and_during_generation():
    from pagedlm.engine.async_engine import EngineOverloadedError, RequestAbortedError
    from pagedlm.errors import EngineDeadError, RequestFailedError, RequestRejectedError
    from pagedlm.server.errors import APIError, api_error

    def fields(e, **kw):
        a = api_error(e, **kw)
        return a.status, a.type, a.param, a.code, a.message

    # Refusals before the engine took the request: the client's fault names the field.
    assert fields(RequestRejectedError("prompt is too long"), prompt_param="messages") == (
        400, "invalid_request_error", "messages", "context_length_exceeded", "prompt is too long")
    assert fields(ValueError("temperature must be >= 0")) == (
        400, "invalid_request_error", "temperature", "invalid_value", "temperature must be >= 0")
    assert fields(EngineOverloadedError("full"))[:4] == (503, "server_overloaded", None, "overloaded")
    assert fields(EngineDeadError("stopping")) == (503, "service_unavailable", None, "shutting_down", "stopping")
    # While generating: an abort is "request aborted", a ValueError is the server's bug.
    assert fields(RequestAbortedError("gone"), generating=True)[::4] == (503, "request aborted: gone")
    assert fields(RequestFailedError("request failed: x"), generating=True)[:4] == (
        500, "internal_error", None, "request_failed")
    assert fields(ValueError("bad"), generating=True) == (500, "internal_error", None, None,
                                                          "internal error: ValueError: bad")
    e = APIError(418, "teapot")
    assert api_error(e) is e
