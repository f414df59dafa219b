"""Data-parallel replicas behind one server (``--data-parallel-size``): 64 concurrent requests
all complete, each identical to a solo run; a repeated prefix goes to the replica that holds it
(counted, and that replica's prefix cache is hit); metrics carry one sample per replica."""

from __future__ import annotations

import random
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedlm import SamplingParams
from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.server.app import ServerConfig, build_app
from pagedlm.server.replicas import PrefixIndex, ReplicaRouter
from tests.server_fixtures import ServerThread, tiny_model_dir

ENGINE = dict(dtype="float32", num_kv_blocks=512, block_size=4, max_num_seqs=32, max_model_len=256, seed=0)


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(10, 300) for _ in range(rng.randint(2, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_prefix_index_matches_leading_full_blocks():
    idx = PrefixIndex(block_size=4, capacity=3)
    a = list(range(10))
    idx.add(idx.chain(a))  # two full blocks
    assert idx.match(idx.chain(a[:8] + [99, 98, 97, 96])) == 2
    assert idx.match(idx.chain([0, 1, 2, 3, 9, 9, 9, 9])) == 1
    assert idx.match(idx.chain([1, 1, 2, 3])) == 0
    idx.add(idx.chain([50, 51, 52, 53, 54, 55, 56, 57]))  # capacity 3: the oldest block goes
    assert idx.match(idx.chain(a)) == 0


@pytest.mark.timeout(300)
def test_two_replicas_serve_64_concurrent_requests_like_solo_runs_and_route_prefixes(model_dir):
    prompts = _prompts(64)
    solo_engine = LLMEngine(EngineConfig(model=model_dir, **ENGINE))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    solo = []
    for p in prompts:
        solo_engine.add_request("solo", None, params, prompt_token_ids=p)
        while solo_engine.has_unfinished_requests():
            solo += [o.outputs[0].text for o in solo_engine.step() if o.finished]

    replicas = [AsyncLLMEngine(LLMEngine(EngineConfig(model=model_dir, **ENGINE))) for _ in range(2)]
    router = ReplicaRouter(replicas)
    app = build_app(router, ServerConfig(served_model_name="tiny"))
    got: dict[int, httpx.Response] = {}
    with ServerThread(app, router) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        def ask(i):
            got[i] = http.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 10, "temperature": 0,
                                                        "ignore_eos": True})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got[i].status_code for i in range(64)] == [200] * 64
        assert [got[i].json()["choices"][0]["text"] for i in range(64)] == solo
        served = [r.engine.stats["prompt_tokens"] for r in replicas]
        assert all(n > 0 for n in served), served  # both replicas took work (least loaded)

        # A long shared prefix: the first request lands somewhere; the next 6 follow it there.
        prefix = [(7 * j) % 290 + 10 for j in range(40)]
        r = http.post("/v1/completions", json={"prompt": prefix + [1], "max_tokens": 2})
        assert r.status_code == 200
        holder = max(range(2), key=lambda i: router.indexes[i].match(router.indexes[i].chain(prefix)))
        hits_before = replicas[holder].engine.block_manager.prefix_hits
        for k in range(6):
            assert http.post("/v1/completions", json={"prompt": prefix + [k + 2, k + 3], "max_tokens": 2}).status_code == 200
        assert router.routed[holder]["prefix"] >= 6
        assert replicas[holder].engine.block_manager.prefix_hits - hits_before >= 6 * 40 // 4 * 4
        metrics = {}
        for fam in text_string_to_metric_families(http.get("/metrics").text):
            for s in fam.samples:
                metrics[(s.name, s.labels.get("engine"), s.labels.get("reason"))] = s.value
        assert metrics[("pagedlm:routed_requests_total", str(holder), "prefix")] >= 6
        assert {e for (n, e, _) in metrics if n == "vllm:num_requests_running"} == {"0", "1"}
        assert all(metrics[("vllm:kv_cache_usage_perc", str(i), None)] == 0.0 for i in range(2))
