"""Fault isolation: a request that fails inside a step (prepare, model forward, NaN logits,
sampling) ends with finish_reason "error" while the 31 others of its batch finish exactly as they
do alone; KV blocks all come back. The server turns a failed request into an error for that
request only, and a dead rank into errors naming the rank and a 503 /health."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import httpx
import pytest
import torch

from pagedlm import SamplingParams
from pagedlm.engine.async_engine import AsyncLLMEngine
from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.engine.faults import FaultInjector, InjectedFault, find_failing
from pagedlm.server.app import ServerConfig, build_app
from tests.server_fixtures import ServerThread, tiny_model_dir

POISON = 7  # a token id only the victim's prompt contains
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _engine(model_dir: str, **kw) -> LLMEngine:
    cfg = dict(model=model_dir, dtype="float32", num_kv_blocks=512, block_size=4, max_num_seqs=32, seed=0)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def _prompts(n: int = 32, victim: int = 11) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.choice([t for t in range(10, 300)]) for _ in range(rng.randint(3, 20))] for _ in range(n)]
    prompts[victim][len(prompts[victim]) // 2] = POISON
    return prompts


def _run(engine: LLMEngine, prompts: list[list[int]], params=PARAMS) -> dict[str, object]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=p)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():  # a step never raises for one request's fault
            if out.finished:
                done[out.request_id] = out
        steps += 1
        assert steps < 1000
    return done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def solo(model_dir):
    """Each prompt's greedy tokens, run alone."""
    eng = _engine(model_dir)
    out = []
    for p in _prompts():
        eng.add_request("solo", None, PARAMS, prompt_token_ids=p)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out.append(o.outputs[0].token_ids)
    return out


def _fail_after(stage: str, tokens: int):
    """A hook failing the poisoned request at ``stage`` once it has ``tokens`` output tokens."""
    def hook(st, seq):
        if st == stage and POISON in seq.token_ids[:seq.num_prompt_tokens] and seq.num_output_tokens >= tokens:
            raise InjectedFault(f"boom at {st}")
    return hook


def _poison_forward(engine: LLMEngine):
    """The model itself raises whenever the poison token is among the batch's prompt rows (a
    kernel failure); decode rows (the first ``num_decodes``) may hold it as a generated token."""
    model = engine.runner.model
    forward = model.forward

    def bad(input_ids, positions, meta, *a, **kw):
        if (input_ids[meta.num_decodes:] == POISON).any():
            raise RuntimeError("kernel exploded")
        return forward(input_ids, positions, meta, *a, **kw)
    model.forward = bad


def _nan_logits(engine: LLMEngine):
    """The victim's logits row becomes NaN from its 4th output token on."""
    runner = engine.runner
    execute = runner.execute

    def bad(inputs):
        logits = execute(inputs).clone()  # an inference tensor: edited as a copy
        for seq, i in inputs.samples:
            if POISON in seq.token_ids[:seq.num_prompt_tokens] and seq.num_output_tokens >= 4:
                logits[i] = float("nan")
        return logits
    runner.execute = bad


CASES = {
    "prepare-at-prefill": (lambda e: setattr(e, "fault_injector", _fail_after("prepare", 0)), 0, "boom at prepare"),
    "prepare-mid-decode": (lambda e: setattr(e, "fault_injector", _fail_after("prepare", 5)), 5, "boom at prepare"),
    "sample-mid-decode": (lambda e: setattr(e, "fault_injector", _fail_after("sample", 3)), 3, "boom at sample"),
    "model-forward": (_poison_forward, 0, "kernel exploded"),
    "nan-logits": (_nan_logits, 4, "NaN or inf logits"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_failing_request_does_not_disturb_31_others(model_dir, solo, case):
    install, tokens_before_error, message = CASES[case]
    eng = _engine(model_dir)
    install(eng)
    done = _run(eng, _prompts())
    assert len(done) == 32
    victim = done.pop("r11")
    assert victim.finished and victim.outputs[0].finish_reason == "error"
    assert message in victim.error
    assert len(victim.outputs[0].token_ids) == tokens_before_error
    assert victim.outputs[0].token_ids == solo[11][:tokens_before_error]
    for rid, out in done.items():
        assert out.error is None and out.outputs[0].finish_reason == "length", rid
        assert out.outputs[0].token_ids == solo[int(rid[1:])], rid
    assert eng.block_manager.usage() == 0.0 and not eng.requests and not eng.has_unfinished_requests()
    assert eng.stats["failed_requests"] == 1


def test_n_samples_of_a_failing_request_all_end_with_the_error(model_dir):
    eng = _engine(model_dir)
    eng.fault_injector = _fail_after("sample", 2)
    prompts = _prompts(4, victim=1)
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=6, ignore_eos=True)
    done = _run(eng, prompts, params)
    assert [c.finish_reason for c in done["r1"].outputs] == ["error"] * 3
    assert all(c.finish_reason == "length" for rid in ("r0", "r2", "r3") for c in done[rid].outputs)
    assert eng.block_manager.usage() == 0.0


def test_find_failing_bisects_to_the_culprits():
    calls = []

    def trial(items):
        calls.append(list(items))
        if {3, 12} & set(items):
            raise ValueError("bad")

    found = find_failing(list(range(16)), trial, ValueError("bad"))
    assert sorted(i for i, _ in found) == [3, 12]
    assert len(calls) < 16  # fewer trials than one per item


def test_fault_injector_from_env(monkeypatch):
    monkeypatch.setenv("PAGEDLM_FAULT_INJECT", json.dumps({"token": 5, "stage": "sample"}))
    inj = FaultInjector.from_env()
    assert (inj.token, inj.stage) == (5, "sample")
    monkeypatch.setenv("PAGEDLM_FAULT_INJECT", "{bad")
    with pytest.raises(ValueError, match="PAGEDLM_FAULT_INJECT"):
        FaultInjector.from_env()
    with pytest.raises(ValueError, match="stage"):
        FaultInjector(5, "everywhere")


# ---- the server ------------------------------------------------------------------------------
def test_server_fails_only_the_faulty_request(model_dir):
    eng = _engine(model_dir, max_model_len=512)
    eng.fault_injector = FaultInjector(POISON, "sample")
    aeng = AsyncLLMEngine(eng)
    app = build_app(aeng, ServerConfig(served_model_name="tiny"))
    prompts = _prompts(8, victim=3)
    results: dict[int, httpx.Response] = {}
    streamed: list[str] = []
    with ServerThread(app, aeng) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        def call(i):
            results[i] = http.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 8, "ignore_eos": True})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        with http.stream("POST", "/v1/completions", json={"prompt": prompts[3], "max_tokens": 8,
                                                          "stream": True}) as r:
            assert r.status_code == 200
            streamed = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        for t in threads:
            t.join(30)
        assert http.get("/health").status_code == 200  # a failed request is not a sick server
        metrics = http.get("/metrics").text
    bad = results.pop(3)
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["code"] == "request_failed" and "injected fault at sample" in err["message"]
    assert all(r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
               for r in results.values())
    assert streamed[-1] == "[DONE]"
    assert json.loads(streamed[-2])["error"]["code"] == "request_failed"
    assert 'finished_reason="error"' in metrics
    assert eng.block_manager.usage() == 0.0


@pytest.mark.timeout(180)
def test_dead_rank_fails_in_flight_requests_by_name_and_health_says_so(tmp_path):
    from tests.helpers import save_tiny

    path = save_tiny("llama", str(tmp_path), max_position_embeddings=2048)
    eng = _engine(path, tensor_parallel_size=2, extra={"distributed": {"timeout_s": 30, "start_timeout_s": 60}})
    aeng = AsyncLLMEngine(eng)
    app = build_app(aeng, ServerConfig(served_model_name="tiny"))
    lines: list[str] = []
    with ServerThread(app, aeng) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/health").status_code == 200

        def read():
            body = {"prompt": [5, 6, 8], "max_tokens": 1500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
                lines.extend(r.iter_lines())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 20
        while not any(line.startswith("data: {") for line in lines):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(eng.runner.pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        reader.join(20)
        assert not reader.is_alive() and time.monotonic() - t0 < 10
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "request_failed" and "worker rank 1" in err["message"]
        h = http.get("/health")
        assert h.status_code == 503 and "worker rank 1" in h.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503 and "worker rank 1" in r.json()["error"]["message"]
    assert not any(p.is_alive() for p in eng.runner._workers.procs)
    assert eng.block_manager.usage() == 0.0
    assert torch.get_num_threads() >= 1
