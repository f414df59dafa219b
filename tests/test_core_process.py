"""The engine core in its own process (engine/core_process.py) behind the unchanged server: the
same answers as the in-process engine, aborts that free blocks, and a core that dies seen at once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.core_process import CoreEngineClient
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.server.app import ServerConfig, build_app
from tests.server_fixtures import ServerThread, launch_serve, stop_serve, tiny_model_dir

CONFIG = dict(dtype="float32", kv_cache_memory=4 << 20, max_num_seqs=16, seed=0, max_model_len=512)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(tmp_path_factory)


def _serve(aeng):
    return ServerThread(build_app(aeng, ServerConfig(served_model_name="tiny")), aeng)


@pytest.fixture(scope="module")
def both(model_dir):
    """(in-process server URL, core-process server URL, the core client)."""
    core = CoreEngineClient({"model": model_dir, **CONFIG})
    local = AsyncLLMEngine(LLMEngine(EngineConfig(model=model_dir, **CONFIG)))
    with _serve(local) as a, _serve(core) as b:
        yield a.url, b.url, core
    assert core.process.poll() is not None  # stopped with its server


def _strip(resp: dict) -> dict:
    return {k: v for k, v in resp.items() if k not in ("id", "created", "timings")}


REQUESTS = [
    ("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0}),
    ("/v1/completions", {"prompt": ["one two", "three four five"], "max_tokens": 12, "temperature": 0.9,
                         "seed": 7, "n": 2, "logprobs": 2}),
    ("/v1/completions", {"prompt": "Count: 1 2 3", "max_tokens": 30, "temperature": 0, "stop": [" 7"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16,
                              "temperature": 0, "logprobs": True, "top_logprobs": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a person"}], "max_tokens": 40,
                              "temperature": 0,
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "p", "schema": SCHEMA}}}),
    # Prompt logprobs cross once, with the request's first delta; stop strings in chat, n > 1.
    ("/v1/completions", {"prompt": "The quick brown fox jumps over", "max_tokens": 4, "temperature": 0, "echo": True,
                         "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0.9,
                              "seed": 3, "n": 3, "stop": ["e", "a"], "logprobs": True, "top_logprobs": 2}),
]


@pytest.mark.parametrize("path,body", REQUESTS, ids=[f"{i}" for i in range(len(REQUESTS))])
def test_the_core_process_answers_as_the_in_process_engine(both, path, body):
    local, remote, _ = both
    answers = [httpx.post(url + path, json={"model": "tiny", **body}, timeout=60) for url in (local, remote)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    # Logprobs to float32 rounding: a batch may be stepped in other groupings in the two servers
    # (timing), and a GEMM of other rows rounds differently in the last bits.
    _same(_strip(answers[0].json()), _strip(answers[1].json()))


def _same(a, b, where: str = "") -> None:
    """Equal, floats to a relative 1e-4 (logprobs; everything else exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_streams_match_too(both):
    local, remote, _ = both
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0, "stream": True}
    texts = []
    for url in (local, remote):
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        texts.append("".join(c["choices"][0]["text"] for c in chunks))
    assert texts[0] == texts[1] and texts[0]


def test_bad_requests_get_the_same_errors(both):
    local, remote, _ = both
    for body in ({"prompt": [1, 2, 10**6], "max_tokens": 4}, {"prompt": "x", "max_tokens": -1},
                 {"prompt": "x", "logit_bias": {"999999": 5}},
                 {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                     "type": "nope"}}}}):
        answers = [httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=30)
                   for url in (local, remote)]
        assert answers[0].status_code == answers[1].status_code and 400 <= answers[0].status_code < 500
        assert answers[0].json() == answers[1].json()


def test_engine_view_metrics_and_health_come_from_the_core(both):
    local, remote, core = both
    health = httpx.get(remote + "/health").json()
    assert health == httpx.get(local + "/health").json() and health["status"] == "ok"
    state = httpx.get(remote + "/v1/engine/state").json()
    assert state["num_blocks"] == core.engine.num_kv_blocks
    assert httpx.get(remote + "/v1/engine/blocks/0").status_code == 200
    metrics = httpx.get(remote + "/metrics").text  # the core's counters reach /metrics
    generated = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                 if s.name == "vllm:generation_tokens_total"]
    assert generated and generated[0] > 0


def test_a_client_that_leaves_frees_its_blocks_in_the_core(both):
    _, remote, core = both
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", remote + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token, then hang up
    deadline = time.monotonic() + 10
    while True:
        m = httpx.get(remote + "/v1/engine/state?blocks=false").json()
        if m["metrics"]["num_free_blocks"] == m["num_blocks"] and not any(m["queues"].values()):
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


# ---- detokenization and stop strings on the server's side of the core process -------------------

def _post(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def two_token_stop(both) -> tuple[str, str]:
    """(prompt, stop string) where the stop string spans two of the greedy reply's tokens: the
    last character of one and the first of the next, inside no single token's text."""
    local = both[0]
    for prompt in ("Count: 1 2 3", "Once upon a time", "The quick brown fox", "Hello world"):
        r = _post(local, {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "logprobs": 1})
        full, tokens = r["choices"][0]["text"], r["choices"][0]["logprobs"]["tokens"]
        pieces = [t for t in tokens if t]
        for a, b in zip(pieces, pieces[1:]):
            stop = a[-1] + b[0]
            if "\ufffd" in a + b or any(stop in t for t in tokens):
                continue
            if 0 < full.find(stop) < len(full) - 4:  # some text before it, and some cut after it
                return prompt, stop
    pytest.fail("no stop string spanning two tokens found in the tiny model's greedy replies")


def _stop_bodies(prompt: str, stop: str) -> list[dict]:
    base = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    return [base, {**base, "include_stop_str_in_output": True}, {**base, "logprobs": 3},
            {**base, "n": 2, "logprobs": 1},  # greedy n=2: both samples stop at the same token
            {**base, "max_tokens": 400}]  # the core would go on for 400 tokens


def test_stop_strings_answer_as_the_in_process_engine(both, two_token_stop):
    """Stop strings are found on the server's side of a core process: the same text, tokens,
    finish and stop reasons, logprobs and usage as the in-process engine."""
    local, remote, _ = both
    prompt, stop = two_token_stop
    for body in _stop_bodies(*two_token_stop):
        a, b = _post(local, body), _post(remote, body)
        assert all(c["finish_reason"] == "stop" and c["stop_reason"] == stop for c in a["choices"]), a
        kept = body.get("include_stop_str_in_output", False)
        full = _post(local, {**body, "stop": None, "n": 1, "max_tokens": 48, "logprobs": None})["choices"][0]["text"]
        assert a["choices"][0]["text"] == full[:full.find(stop) + (len(stop) if kept else 0)]
        _same(_strip(a), _strip(b), str(body))
    # Streamed: the same chunks' text, and the stop string never shown.
    texts = []
    for url in (local, remote):
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "tiny", "stream": True, **_stop_bodies(*two_token_stop)[0]}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        texts.append(("".join(c["choices"][0]["text"] for c in chunks),
                      [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]))
    assert texts[0] == texts[1] and texts[0][1] == ["stop"] and stop not in texts[0][0]


def test_a_stop_in_one_sample_while_its_siblings_go_on(both):
    """n=3 seeded samples with logprobs: a stop string that ends one sample early (the core
    finishes that sequence alone) while the others run to their length."""
    local, remote, _ = both
    body = {"prompt": "one two", "max_tokens": 24, "temperature": 0.8, "seed": 5, "n": 3, "logprobs": 2,
            "ignore_eos": True}
    texts = [c["text"] for c in _post(local, body)["choices"]]
    stop = next(texts[0][i:i + 2] for i in range(2, len(texts[0]) - 2)
                if texts[0][i:i + 2] not in texts[1] and "\ufffd" not in texts[0][i:i + 2])
    body["stop"] = [stop]
    a, b = _post(local, body), _post(remote, body)
    reasons = sorted(c["finish_reason"] for c in a["choices"])
    assert "stop" in reasons and "length" in reasons, a
    _same(_strip(a), _strip(b))


def _scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_a_stop_string_frees_the_blocks_in_the_core_while_others_go_on(both, two_token_stop):
    """A request ended by a stop string on the server's side leaves the core at once (its KV
    blocks freed, the tokens generated past the stop not counted) while long requests go on;
    every answer is the in-process engine's."""
    local, remote, core = both
    prompt, stop = two_token_stop
    stopped = {"prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    long = {"max_tokens": 440, "temperature": 0, "ignore_eos": True}
    from concurrent.futures import ThreadPoolExecutor

    answers = {}
    for url in (local, remote):
        before = _scrape(url)["vllm:generation_tokens_total"]
        with ThreadPoolExecutor(3) as pool:
            longs = [pool.submit(_post, url, {**long, "prompt": f"story {i}"}) for i in range(3)]
            deadline = time.monotonic() + 30
            while httpx.get(url + "/v1/engine/state?blocks=false").json()["queues"]["running"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            short = _post(url, stopped)
            # The core heard of the stop before this call (one pipe, in order): the request is gone.
            state = httpx.get(url + "/v1/engine/state?blocks=false").json()
            assert not [s for s in state["sequences"] if s["request_id"].startswith(short["id"])]
            assert state["queues"]["running"] == 3, "the long requests should still be running"
            answers[url] = [short] + [f.result() for f in longs]
        generated = _scrape(url)["vllm:generation_tokens_total"] - before
        assert generated == sum(a["usage"]["completion_tokens"] for a in answers[url])
    assert answers[local][0]["choices"][0]["finish_reason"] == "stop"
    _same([_strip(a) for a in answers[local]], [_strip(a) for a in answers[remote]])
    m = httpx.get(remote + "/v1/engine/state?blocks=false").json()
    assert m["metrics"]["num_free_blocks"] == m["num_blocks"] == core.engine.num_kv_blocks
    assert not m["sequences"]


def test_a_killed_core_fails_requests_and_health_at_once(model_dir):
    died: list[str] = []
    core = CoreEngineClient({"model": model_dir, **CONFIG}, on_death=died.append)
    with _serve(core) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                for _ in client.completions.create(model="tiny", prompt="hi", max_tokens=1000, stream=True,
                                                   extra_body={"ignore_eos": True}):
                    pass
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)
        os.kill(core.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() - t0 < 1.0, "health did not turn 503 within a second"
            time.sleep(0.02)
        t.join(10)
        assert not t.is_alive()
        assert died and "exit code -9" in died[0]
        after = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert after.status_code == 503 and "engine" in after.json()["error"]["message"]
    assert errors  # the stream in flight ended with the error, not silently


def test_serve_runs_the_core_in_a_process_and_exits_nonzero_when_it_dies(model_dir):
    proc, url = launch_serve(model_dir, "--max-model-len", "256", "--kv-cache-memory", "4M", "--engine-core", "process")
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200
        import psutil

        cores = [c for c in psutil.Process(proc.pid).children() if "pagedlm.engine.core_process" in " ".join(c.cmdline())]
        assert len(cores) == 1
        cores[0].kill()
        proc.wait(15)
        assert proc.returncode == 1
    finally:
        if proc.poll() is None:
            stop_serve(proc)


def test_data_parallel_core_processes_behind_one_server(model_dir):
    from pagedlm.server.replicas import ReplicaRouter

    cores = [CoreEngineClient({"model": model_dir, **CONFIG}, threads=1) for _ in range(2)]
    router = ReplicaRouter(cores)
    with _serve(router) as srv:
        body = {"model": "tiny", "max_tokens": 8, "temperature": 0}
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> str:  # in flight together: the least loaded replica takes the next
            return httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": 48, "prompt": f"prompt {i}"},
                              timeout=60).json()["choices"][0]["text"]
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(one, range(6)))
        assert all(texts)
        metrics = httpx.get(srv.url + "/metrics").text
        served = {s.labels.get("engine"): s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                  if s.name == "vllm:prompt_tokens_total"}
        assert set(served) == {"0", "1"} and all(v > 0 for v in served.values())  # both replicas served
    assert all(c.process.poll() is not None for c in cores)


# ---- restarting a core that died (serve --restart-core N) -------------------------------------------

def _stream_events(url: str, body: dict, events: list[str]) -> None:
    """Stream a completion, appending each SSE ``data:`` payload to ``events`` as it comes."""
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "stream": True, **body},
                      timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])


def _wait_health(url: str, status: int, within: float) -> float:
    t0 = time.monotonic()
    while (code := httpx.get(url + "/health").status_code) != status:
        assert time.monotonic() - t0 < within, f"/health stayed {code}, wanted {status} within {within} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_killed_core_is_restarted_when_configured(model_dir):
    """kill -9 of the core mid-stream with one restart allowed: the stream ends with an error
    naming the cause, /health is 503 while the new core loads and 200 after, the next request is
    answered by the new core (as before the kill), the restart is counted in /metrics; a second
    kill, with no restart left, is the end (on_death)."""
    died: list[str] = []
    core = CoreEngineClient({"model": model_dir, **CONFIG}, on_death=died.append, restarts=1)
    with _serve(core) as srv:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
        before = httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        first_pid = core.process.pid
        events: list[str] = []
        t = threading.Thread(target=_stream_events, args=(srv.url, {"prompt": "hi", "max_tokens": 1000,
                                                                    "ignore_eos": True}, events))
        t.start()
        deadline = time.monotonic() + 10
        while len(events) < 2:  # streaming
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        os.kill(first_pid, signal.SIGKILL)
        _wait_health(srv.url, 503, within=1.0)
        health = httpx.get(srv.url + "/health").json()["error"]["message"]
        assert "exit code -9" in health and "restarting" in health, health
        t.join(10)
        assert not t.is_alive()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "request_failed" and "engine core process exited (exit code -9)" in error["message"]
        during = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        if during.status_code != 200:  # still loading (a 200 means the new core was already up)
            assert during.status_code == 503 and "restarting" in during.json()["error"]["message"]
        _wait_health(srv.url, 200, within=60)
        assert core.process.pid != first_pid and core.restarts == 1 and not died
        after = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == before
        assert _scrape(srv.url)["pagedlm:engine_core_restarts_total"] == 1
        m = httpx.get(srv.url + "/v1/engine/state?blocks=false").json()
        assert m["metrics"]["num_free_blocks"] == m["num_blocks"] and not m["sequences"]
        # No restart left: the second death is final.
        os.kill(core.process.pid, signal.SIGKILL)
        _wait_health(srv.url, 503, within=1.0)
        deadline = time.monotonic() + 5
        while not died:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "exit code -9" in died[0] and core.restarts == 1
        assert "restarting" not in httpx.get(srv.url + "/health").json()["error"]["message"]


def test_restart_core_needs_a_core_process(model_dir):
    from pagedlm.cli import main

    assert main(["serve", "--model", model_dir, "--engine-core", "thread", "--restart-core", "1"]) == 2


def test_serve_restart_core_restarts_then_exits_nonzero_when_none_is_left(model_dir):
    import psutil

    proc, url = launch_serve(model_dir, "--max-model-len", "256", "--kv-cache-memory", "4M", "--engine-core", "auto",
                             "--restart-core", "1")  # auto: a process, as restarting needs one

    def the_core() -> psutil.Process:
        cores = [c for c in psutil.Process(proc.pid).children()
                 if "pagedlm.engine.core_process" in " ".join(c.cmdline())]
        assert len(cores) == 1
        return cores[0]
    try:
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        first = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        the_core().kill()
        _wait_health(url, 503, within=1.0)
        _wait_health(url, 200, within=60)
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"] == first
        assert _scrape(url)["pagedlm:engine_core_restarts_total"] == 1
        the_core().kill()  # none left
        proc.wait(15)
        assert proc.returncode == 1
        time.sleep(0.2)  # the last lines through the drain thread
        out = "".join(proc.stderr_lines)
        assert "pagedlm serve: the engine core process exited (exit code -9)" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            stop_serve(proc)


def test_a_restart_that_fails_is_the_end(model_dir):
    """A core that cannot start again (here: its model gone) ends the client as if no restart
    were allowed, naming both causes."""
    died: list[str] = []
    core = CoreEngineClient({"model": model_dir, **CONFIG}, on_death=died.append, restarts=1)
    try:
        core.start()
        core._spawn_args = ({**core._spawn_args[0], "model": model_dir + "-gone"}, *core._spawn_args[1:])
        os.kill(core.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not died:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert died[0].startswith("the engine core process exited (exit code -9); restart 1 of 1 failed: "), died
        assert core.health_error() == f"the engine is dead: {died[0]}" and core.restarts == 1
    finally:
        core.shutdown()
