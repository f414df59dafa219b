"""Client disconnects against a real ``pagedlm serve`` (issue 23's fault target): streaming
requests whose clients leave at random points, then a check that the server let go of all of them.

Each request (completions or chat, streamed; a few with n = 2) gets one plan:

* ``before_headers``: the client gives up after a random few milliseconds, usually before the
  response headers came (the request may not even have reached the engine);
* ``before_first_token``: the client closes as soon as the headers came, before reading any
  token (with more clients than ``--max-num-seqs`` slots, many are still waiting in the queue);
* ``mid_stream``: the client reads a random number of token chunks, then closes;
* ``complete``: the client reads to ``[DONE]`` (the control: a finish reason must come).

The run keeps ``--concurrency`` requests open at once until ``--streams`` were sent. Afterwards it
waits (bounded) for the engine to empty and checks, from ``/v1/engine/state`` and ``/metrics``:
no request running or waiting, no KV block in use (``kv_cache_usage_perc`` 0, ``counts.used`` and
``counts.shared`` 0), ``/health`` 200; and that no request got an unexpected status, an error
event or hung. It prints what ended how, e.g. ``mid_stream: left mid-stream: 71`` or
``mid_stream: finished first: 3`` (the reply was shorter than the planned leave point).

    python benchmarks/disconnect_soak.py                              # a tiny random Llama, 200 streams
    python benchmarks/disconnect_soak.py --engine-core process --concurrency 32
    python benchmarks/disconnect_soak.py --model default              # the bundled SmolLM2
    python benchmarks/disconnect_soak.py --model ./my-hf-dir --streams 500

A lighter version (40 streams, thread and process cores) runs in tests/test_disconnect_soak.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import finish_report  # noqa: E402
from benchmarks.serve_bench import wait_listening  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps keys and values in small "
         "blocks so that many requests share one cache and continuous batching lets new ones join").split()
PLANS = ("before_headers", "before_first_token", "mid_stream", "complete")


@dataclass
class DisconnectConfig:
    streams: int = 200
    concurrency: int = 24
    seed: int = 0
    max_tokens: tuple[int, int] = (8, 64)
    prompt_words: tuple[int, int] = (1, 40)
    mix: dict[str, float] = field(default_factory=lambda: {"before_headers": 0.15, "before_first_token": 0.2,
                                                           "mid_stream": 0.45, "complete": 0.2})
    p_chat: float = 0.3
    p_n2: float = 0.1
    before_headers_ms: tuple[float, float] = (0.0, 30.0)
    request_timeout_s: float = 120.0
    settle_timeout_s: float = 30.0


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # "plan: outcome"
    problems: list[str] = field(default_factory=list)

    def ended(self, plan: str, outcome: str) -> None:
        self.outcomes[f"{plan}: {outcome}"] += 1

    def bad(self, plan: str, what: str) -> None:
        self.ended(plan, "PROBLEM")
        if len(self.problems) < 50:
            self.problems.append(f"{plan}: {what}")


def _request(rng: random.Random, cfg: DisconnectConfig, plan: str) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*cfg.prompt_words)))
    body: dict = {"stream": True, "max_tokens": rng.randint(*cfg.max_tokens), "temperature": rng.choice([0.0, 0.8]),
                  "ignore_eos": plan != "complete" or rng.random() < 0.5}
    if rng.random() < cfg.p_n2:
        body["n"] = 2
    if rng.random() < cfg.p_chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def _has_token(event: dict) -> bool:
    """Whether a chunk carries generated text (a chat stream starts with a role-only delta)."""
    for c in event.get("choices", []):
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
    return False


async def _one(http: httpx.AsyncClient, cfg: DisconnectConfig, rng: random.Random, plan: str, tally: Tally) -> None:
    path, body = _request(rng, cfg, plan)
    tally.sent[plan] += 1
    progress = {"headers": False, "tokens": 0}
    # A chunk may carry several tokens (a slow reader gets them merged): leave within the first half.
    leave_after = rng.randint(1, max(1, body["max_tokens"] // 2)) if plan == "mid_stream" else None

    async def run() -> str:
        async with http.stream("POST", path, json=body) as r:
            progress["headers"] = True
            if r.status_code != 200:
                await r.aread()
                return f"PROBLEM status {r.status_code}: {r.text[:200]}"
            if plan == "before_first_token":
                return "left before the first token"  # closing the response disconnects
            events: list[str] = []
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if events[-1] == "[DONE]":
                    break
                event = json.loads(events[-1])
                if "error" in event:
                    return f"PROBLEM error event: {events[-1][:200]}"
                if _has_token(event):
                    progress["tokens"] += 1
                    if leave_after is not None and progress["tokens"] >= leave_after:
                        return "left mid-stream"
            if not events or events[-1] != "[DONE]":
                return "PROBLEM stream ended without [DONE]"
            finals = [c.get("finish_reason") for e in events[:-1] for c in json.loads(e).get("choices", [])
                      if c.get("finish_reason")]
            if len(finals) != body.get("n", 1) or not all(f in ("length", "stop") for f in finals):
                return f"PROBLEM finish reasons {finals}"
            return "completed" if plan == "complete" else "finished first"

    try:
        if plan == "before_headers":
            try:
                outcome = await asyncio.wait_for(run(), timeout=rng.uniform(*cfg.before_headers_ms) / 1000)
            except asyncio.TimeoutError:
                outcome = ("left before the headers" if not progress["headers"] else
                           "left before the first token" if not progress["tokens"] else "left mid-stream")
        else:
            outcome = await asyncio.wait_for(run(), timeout=cfg.request_timeout_s)
    except asyncio.TimeoutError:
        outcome = f"PROBLEM hung: no end within {cfg.request_timeout_s:.0f} s"
    except httpx.HTTPError as e:
        outcome = f"PROBLEM lost: {type(e).__name__}: {e}"
    if outcome.startswith("PROBLEM "):
        tally.bad(plan, outcome[8:])
    else:
        tally.ended(plan, outcome)


async def _load(url: str, cfg: DisconnectConfig, tally: Tally) -> None:
    rng = random.Random(cfg.seed)
    plans, weights = zip(*cfg.mix.items())
    gate = asyncio.Semaphore(cfg.concurrency)
    limits = httpx.Limits(max_connections=cfg.concurrency * 2, max_keepalive_connections=0)

    async def gated(plan: str, r: random.Random) -> None:
        async with gate:
            await _one(http, cfg, r, plan, tally)

    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits) as http:
        await asyncio.gather(*(gated(rng.choices(plans, weights)[0], random.Random(rng.random()))
                               for _ in range(cfg.streams)))


def _metrics(url: str) -> dict[str, float]:
    """``vllm:``/``pagedlm:`` samples summed over their labels, and per label set for
    ``request_success_total``."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("vllm:", "pagedlm:")):
            key, value = line.rsplit(" ", 1)
            name = key.split("{")[0]
            if name == "vllm:request_success_total":
                name = f"{name}[{key.split('finished_reason=')[1].split(chr(34))[1]}]"
            out[name] = out.get(name, 0.0) + float(value)
    return out


def settle(url: str, timeout_s: float) -> tuple[dict, float]:
    """Wait until the engine is empty: no sequence, no block in use (aborts of clients that left
    land a step later). Returns (the last engine state, seconds waited)."""
    t0 = time.monotonic()
    while True:
        state = httpx.get(url + "/v1/engine/state?blocks=false", timeout=30).json()
        empty = (not any(state["queues"].values()) and not state["sequences"]
                 and state["counts"]["used"] == 0 and state["counts"]["shared"] == 0)
        if empty or time.monotonic() - t0 > timeout_s:
            return state, time.monotonic() - t0
        time.sleep(0.1)


def run_disconnects(url: str, cfg: DisconnectConfig) -> dict:
    """Send the streams, settle, and report what ended how and what the server holds after."""
    tally = Tally()
    t0 = time.monotonic()
    asyncio.run(_load(url, cfg, tally))
    wall = time.monotonic() - t0
    state, waited = settle(url, cfg.settle_timeout_s)
    m = _metrics(url)
    health = httpx.get(url + "/health", timeout=30)
    return {
        "streams": sum(tally.sent.values()), "concurrency": cfg.concurrency, "duration_s": round(wall, 2),
        "sent": dict(tally.sent), "outcomes": dict(sorted(tally.outcomes.items())),
        "problems": sum(v for k, v in tally.outcomes.items() if k.endswith(": PROBLEM")),
        "problem_samples": tally.problems[:20],
        "settle_s": round(waited, 2),
        "after": {"queues": state["queues"], "sequences": len(state["sequences"]), "counts": state["counts"],
                  "num_requests_running": m.get("vllm:num_requests_running", -1),
                  "num_requests_waiting": m.get("vllm:num_requests_waiting", -1),
                  "kv_cache_usage_perc": m.get("vllm:kv_cache_usage_perc", -1)},
        "server_finished": {k.split("[")[1][:-1]: v for k, v in m.items() if k.startswith("vllm:request_success_total[")},
        "health": health.status_code,
    }


def check(report: dict) -> list[str]:
    """What the run requires; an empty list means it passed."""
    fails = []
    if report["problems"]:
        fails.append(f"{report['problems']} requests got an error, an unexpected status or hung: "
                     f"{report['problem_samples']}")
    a = report["after"]
    if any(a["queues"].values()) or a["sequences"] or a["num_requests_running"] or a["num_requests_waiting"]:
        fails.append(f"requests left in the engine: queues {a['queues']}, {a['sequences']} sequences, metrics "
                     f"running {a['num_requests_running']} waiting {a['num_requests_waiting']}")
    if a["kv_cache_usage_perc"] != 0 or a["counts"]["used"] or a["counts"]["shared"]:
        fails.append(f"KV blocks still in use: kv_cache_usage_perc {a['kv_cache_usage_perc']}, counts {a['counts']}")
    if report["health"] != 200:
        fails.append(f"/health answered {report['health']}")
    return fails


def launch(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "pagedlm.cli", "serve", "--model", model, "--port", "0", "--log-level", "error",
           "--shutdown-timeout", "5", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PAGEDLM_API_KEY": ""})
    return proc, wait_listening(proc, 600)


def tiny_model() -> str:
    """The tests' tiny random Llama (tests/helpers.py), in a temporary directory."""
    from tests.helpers import save_tiny

    return save_tiny("llama", tempfile.mkdtemp(prefix="disconnect-tiny-"), max_position_embeddings=2048)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model path, or 'default' for the bundled SmolLM2 (default: a tiny random Llama)")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    ap.add_argument("--max-num-seqs", type=int, default=8,
                    help="the server's batch limit (below --concurrency, so some clients leave while queued)")
    ap.add_argument("--engine-core", choices=["auto", "process", "thread"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    tiny = args.model is None
    model = tiny_model() if tiny else args.model
    if model == "default":
        from pagedlm.loader.source import resolve_model

        model = resolve_model(None)[0]
    proc, url = launch(model, ["--max-model-len", "1024", "--kv-cache-memory", "64M", "--max-num-seqs",
                               str(args.max_num_seqs), "--engine-core", args.engine_core]
                       + (["--dtype", "float32"] if tiny else []))
    try:
        cfg = DisconnectConfig(streams=args.streams, concurrency=args.concurrency, seed=args.seed,
                               max_tokens=(min(8, args.max_tokens), args.max_tokens))
        report = run_disconnects(url, cfg)
    finally:
        proc.terminate()
        code = proc.wait(60)
    return finish_report(report, code, args.json, check,
                         f"{report['streams']} streams at concurrency {report['concurrency']} in {report['duration_s']} s; "
                         f"engine empty {report['settle_s']} s after the last; KV usage 0; /health 200",
                         "disconnect soak")


if __name__ == "__main__":
    sys.exit(main())
