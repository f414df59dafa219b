"""Load beyond the batch limit, with the engine core in a thread and in a process (issue 23):
requests beyond ``max_num_seqs`` queue and all succeed with the answers they get alone; beyond
``--max-waiting`` waiting sequences a new request (streamed or not) is refused at once with a 503
and an OpenAI-style error body, and the server serves again once the queue has room."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.core_process import CoreEngineClient
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.server.app import ServerConfig, build_app
from tests.server_fixtures import ServerThread, tiny_model_dir

SLOTS, MAX_WAITING = 2, 6  # a burst of MAX_WAITING fits even before any is scheduled
CONFIG = dict(dtype="float32", num_kv_blocks=512, max_num_seqs=SLOTS, seed=0, max_model_len=2048)


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    if request.param == "thread":
        aeng = AsyncLLMEngine(LLMEngine(EngineConfig(model=model, **CONFIG)), max_waiting=MAX_WAITING)
    else:
        aeng = CoreEngineClient({"model": model, **CONFIG}, max_waiting=MAX_WAITING)
    with ServerThread(build_app(aeng, ServerConfig(served_model_name="tiny")), aeng) as srv:
        yield srv.url


def _complete(url: str, i: int, max_tokens: int = 24) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": f"request number {i}", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_beyond_the_batch_limit_requests_queue_and_none_fails(server):
    alone = [_complete(server, i)["choices"][0]["text"] for i in range(MAX_WAITING)]
    seen_waiting = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen_waiting.append(httpx.get(server + "/v1/engine/state?blocks=false").json()["queues"]["waiting"])
            time.sleep(0.01)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(MAX_WAITING) as pool:  # three times the slots, all at once
            answers = list(pool.map(lambda i: _complete(server, i, 24), range(MAX_WAITING)))
    finally:
        done.set()
        watcher.join()
    assert [a["choices"][0]["text"] for a in answers] == alone
    assert all(a["choices"][0]["finish_reason"] == "length" and a["usage"]["completion_tokens"] == 24
               for a in answers)
    assert max(seen_waiting) >= 1, "nothing ever waited: the test did not load the server beyond its slots"


def test_beyond_max_waiting_the_server_answers_503_at_once(server):
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            long = {"model": "tiny", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}

            async def hold(i: int) -> None:  # streams until cancelled (then the client leaves)
                async with http.stream("POST", "/v1/completions", json={**long, "prompt": f"story {i}"}) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        pass

            holders: list[asyncio.Task] = []

            async def until(queues: dict) -> None:
                deadline = time.monotonic() + 20
                while (q := (await http.get("/v1/engine/state?blocks=false")).json()["queues"]) != queues:
                    assert time.monotonic() < deadline, q
                    assert not any(h.done() for h in holders), [h.exception() for h in holders if h.done()]
                    await asyncio.sleep(0.02)

            # The slots fill first (sequences added in one go all count as waiting until a step).
            holders += [asyncio.create_task(hold(i)) for i in range(SLOTS)]
            await until({"running": SLOTS, "waiting": 0, "preempted": 0})
            holders += [asyncio.create_task(hold(SLOTS + i)) for i in range(MAX_WAITING)]
            await until({"running": SLOTS, "waiting": MAX_WAITING, "preempted": 0})
            for stream in (False, True):
                t0 = time.monotonic()
                r = await http.post("/v1/completions", json={**long, "prompt": "one more", "max_tokens": 4,
                                                             "stream": stream})
                assert time.monotonic() - t0 < 1.0, "the refusal should not wait for a slot"
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert err["type"] == "server_overloaded" and err["code"] == "overloaded" and err["param"] is None
                assert f"--max-waiting {MAX_WAITING}" in err["message"], err
            assert (await http.get("/health")).status_code == 200  # overloaded is not unhealthy
            for h in holders:
                h.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            deadline = time.monotonic() + 10
            while (s := (await http.get("/v1/engine/state?blocks=false")).json())["counts"]["used"] or any(
                    s["queues"].values()):
                assert time.monotonic() < deadline, s["queues"]
                await asyncio.sleep(0.02)
            r = await http.post("/v1/completions", json={**long, "prompt": "one more", "max_tokens": 4,
                                                         "stream": False})
            assert r.status_code == 200, r.text

    asyncio.run(scenario())
