"""The engine-state snapshot (``pagedlm/engine/state.py``) and its HTTP API (``pagedlm/server/ui.py``)
against the block manager itself: under random load with shared prefixes, chunked prefill,
preemption and aborts the four block counts equal what the block manager's own structures say,
and nothing drifts once every request has ended (all blocks free or cached)."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest

from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.engine.state import block_counts
from pagedlm.sampling_params import SamplingParams
from pagedlm.server.app import ServerConfig, build_app
from pagedlm.server.ui import StateFeed
from tests.server_fixtures import ServerThread, tiny_model_dir

API_KEY = "sk-state"


def direct_counts(engine: LLMEngine) -> dict[str, int]:
    """The counts from the block manager's free queue, prefix-cache dict and the live sequences'
    block tables (not from the ref counts the snapshot reads)."""
    bm = engine.block_manager
    holders: dict[int, int] = {}
    for seq in engine.live_sequences():
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    cached_free = sum(1 for bid in bm.cached.values() if bid in bm.free_queue)
    return {"free": bm.num_free_blocks - cached_free, "cached": cached_free,
            "used": sum(1 for n in holders.values() if n == 1), "shared": sum(1 for n in holders.values() if n >= 2)}


def check_snapshot(engine: LLMEngine, snap: dict) -> None:
    bm = engine.block_manager
    bm.check_invariants(engine.live_sequences())
    assert snap["counts"] == direct_counts(engine)
    assert sum(snap["counts"].values()) == bm.num_blocks == snap["num_blocks"]
    assert snap["counts"] == block_counts(snap["blocks"]["ref"], snap["blocks"]["cached"])
    live = engine.live_sequences()
    assert [(s["request_id"], s["index"], s["blocks"]) for s in snap["sequences"]] == \
        [(s.request_id, s.index, s.block_table) for s in live]
    assert snap["queues"]["running"] == len(engine.scheduler.running)
    assert snap["queues"]["waiting"] + snap["queues"]["preempted"] == len(live) - len(engine.scheduler.running)
    assert snap["queues"]["preempted"] == sum(1 for s in live if s.num_preemptions and s not in engine.scheduler.running)
    json.dumps(snap, allow_nan=False)  # valid JSON: no NaN (the hit rate before any query is null)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapshot_equals_block_manager_under_random_load(tiny_llama_dir, seed):
    rng = random.Random(seed)
    # 40 blocks of 4 tokens for up to 8 sequences of up to ~70 tokens: preemption; a 24-token step
    # budget: chunked prefill; a few shared prefixes: shared and cached blocks.
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", block_size=4, num_kv_blocks=40,
                                    max_num_batched_tokens=24, max_num_seqs=8, seed=seed))
    prefixes = [[rng.randrange(3, 300) for _ in range(rng.randint(8, 24))] for _ in range(3)]
    seen = dict.fromkeys(("cached", "used", "shared"), 0)
    n_added = 0
    for _ in range(160):
        if rng.random() < 0.35 and n_added < 40:
            prompt = rng.choice(prefixes) + [rng.randrange(3, 300) for _ in range(rng.randint(1, 12))]
            n = 2 if rng.random() < 0.2 else 1
            engine.add_request(f"r{n_added}", None, SamplingParams(max_tokens=rng.randint(1, 30), n=n, ignore_eos=True,
                                                                   temperature=0), prompt_token_ids=prompt)
            n_added += 1
        if engine.requests and rng.random() < 0.08:
            engine.abort_request(rng.choice(sorted(engine.requests)))
        if engine.has_unfinished_requests():
            engine.step()
        snap = engine.snapshot_state()
        check_snapshot(engine, snap)
        for k in seen:
            seen[k] += snap["counts"][k] > 0
    while engine.has_unfinished_requests():
        engine.step()
        check_snapshot(engine, engine.snapshot_state())
    # The load exercised every state, so the comparison above was not vacuous.
    assert all(seen.values()), seen
    assert engine.scheduler.num_preemptions > 0
    # No drift: every block is free or cached, and the cached ones are exactly the prefix cache's.
    snap = engine.snapshot_state()
    assert snap["counts"]["used"] == snap["counts"]["shared"] == 0
    assert snap["counts"]["cached"] == len(engine.block_manager.cached) > 0
    assert snap["counts"]["free"] + snap["counts"]["cached"] == engine.num_kv_blocks
    assert snap["sequences"] == [] and snap["queues"] == {"running": 0, "waiting": 0, "preempted": 0}


def test_snapshot_without_blocks_and_block_detail(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", block_size=4, num_kv_blocks=32))
    prompt = list(range(10, 30))  # 5 full blocks
    for rid in ("a", "b"):
        engine.add_request(rid, None, SamplingParams(max_tokens=8, ignore_eos=True), prompt_token_ids=prompt)
        engine.step()  # "a" fills the prefix cache, then "b" shares it
    snap = engine.snapshot_state(include_blocks=False)
    assert "blocks" not in snap and snap["counts"] == direct_counts(engine)
    assert snap["counts"]["shared"] == 4  # the last prompt token is never served from the cache
    from pagedlm.engine.state import block_detail

    shared = engine.requests["b"].seqs[0].block_table[1]
    d = block_detail(engine, shared)
    assert d["state"] == "shared" and d["ref_count"] == 2 and d["cached"]
    assert sorted(o["request_id"] for o in d["owners"]) == ["a", "b"] and d["owners"][0]["position"] == 1
    assert d["token_ids"] == prompt[4:8]
    assert d["text"] == engine.tokenizer.decode(prompt[4:8], skip_special_tokens=False)
    with pytest.raises(ValueError, match="block_id 32 is outside the pool"):
        block_detail(engine, 32)
    while engine.has_unfinished_requests():
        engine.step()
    d = block_detail(engine, shared)  # freed but cached: the tokens come from its prefix-cache key
    assert d["state"] == "cached" and d["owners"] == [] and d["token_ids"] == prompt[4:8]


# ---- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_dir(tmp_path_factory), dtype="float32", block_size=8,
                                    num_kv_blocks=96, max_num_seqs=16, max_num_batched_tokens=64, seed=0))
    aeng = AsyncLLMEngine(engine)
    app = build_app(aeng, ServerConfig(served_model_name="tiny", api_key=API_KEY))
    with ServerThread(app, aeng) as srv:
        srv.engine, srv.aeng = engine, aeng
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
            srv.http = http
            yield srv


def test_http_state_is_consistent_under_load_and_exact_when_idle(served):
    http, engine = served.http, served.engine
    rng = random.Random(0)
    prefixes = ["".join(rng.choice("abcdefgh ") for _ in range(60)) for _ in range(2)]
    errors: list[str] = []

    def client(i: int) -> None:
        r = random.Random(i)
        body = {"prompt": r.choice(prefixes) + str(i), "max_tokens": r.randint(8, 60), "ignore_eos": True,
                "temperature": 0}
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            resp = c.post("/v1/completions", json=body)
            if resp.status_code != 200:
                errors.append(resp.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    snaps = []
    while any(t.is_alive() for t in threads):
        snaps.append(http.get("/v1/engine/state").json())
    for t in threads:
        t.join()
    assert not errors
    busy = [s for s in snaps if s["sequences"]]
    assert busy, "no snapshot saw a running request"
    for s in snaps:
        # Taken between two steps: the counts, the per-block arrays and the block tables agree.
        ref = s["blocks"]["ref"]
        assert s["counts"] == block_counts(ref, s["blocks"]["cached"])
        holders = [0] * s["num_blocks"]
        for seq in s["sequences"]:
            for b in seq["blocks"]:
                holders[b] += 1
        assert holders == ref
    assert any(s["counts"]["shared"] for s in busy)
    # Idle: the API equals the block manager exactly, with nothing left used.
    s = http.get("/v1/engine/state").json()
    assert s["counts"] == direct_counts(engine)
    assert s["counts"]["used"] == s["counts"]["shared"] == 0 and s["sequences"] == []
    assert s["counts"]["free"] + s["counts"]["cached"] == engine.num_kv_blocks
    assert s["counts"]["cached"] == len(engine.block_manager.cached) > 0


def test_state_stream_sends_snapshots(served):
    with served.http.stream("GET", "/v1/engine/state/stream", params={"interval_ms": 100, "blocks": "false"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break
    assert all("blocks" not in e and sum(e["counts"].values()) == e["num_blocks"] for e in events)
    assert events[0]["time"] < events[2]["time"]


def test_state_feed_shares_one_snapshot_between_views(served):
    feed = StateFeed(served.aeng)

    async def two_views():
        return await asyncio.gather(feed.latest(True, 60.0), feed.latest(True, 60.0))

    a, b = asyncio.run(two_views())
    assert a == b and feed.snapshots_taken == 1
    asyncio.run(feed.latest(False, 60.0))  # a different shape is a different snapshot
    assert feed.snapshots_taken == 2
    asyncio.run(feed.latest(True, 0.0))  # too old for this caller: a fresh one
    assert feed.snapshots_taken == 3


@pytest.mark.parametrize("path", ["/v1/engine/state", "/v1/engine/state/stream", "/v1/engine/blocks/0"])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_engine_routes_need_the_key(served, path, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(served.url + path, headers=headers, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path, param, needle", [
    ("/v1/engine/state?blocks=maybe", "blocks", "valid boolean"),
    ("/v1/engine/state/stream?interval_ms=5", "interval_ms", "greater than or equal to 100"),
    ("/v1/engine/state/stream?interval_ms=fast", "interval_ms", "valid integer"),
    ("/v1/engine/state/stream?interval_ms=100000", "interval_ms", "less than or equal to 10000"),
    ("/v1/engine/blocks/x", "block_id", "valid integer"),
    ("/v1/engine/blocks/-1", "block_id", "greater than or equal to 0"),
    ("/v1/engine/blocks/96", None, "block_id 96 is outside the pool [0, 96)"),
])
def test_engine_routes_reject_malformed_parameters(served, path, param, needle):
    r = served.http.get(path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"]


def test_page_and_static_files_are_served_without_a_key(served):
    r = httpx.get(served.url + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "/ui/app.js" in r.text
    for name, kind in (("app.js", "javascript"), ("markdown.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{served.url}/ui/{name}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], name
    assert httpx.get(served.url + "/ui/nope.js", timeout=10).status_code == 404
