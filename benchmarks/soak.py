"""Soak test of a real ``pagedlm serve``: Poisson arrivals of requests with random prompt and
output lengths, mixed with client disconnects mid-stream, client-side aborts (a non-streamed
call given up early), bad requests and injected faults, for a fixed time. Then it checks that
nothing was lost or leaked:

* every request got its expected outcome: completed (200, a finish reason, ``[DONE]``), 4xx for
  a bad one, an error result for an injected fault; none hung past ``--request-timeout``;
* no 5xx other than the injected faults;
* afterwards the engine is empty: no running or waiting sequence, KV cache usage 0;
* the server's RSS, thread count and open fds, sampled idle after a warm-up and idle at the
  end, are flat (RSS within 5 %).

Faults are injected by the server's test hook (``PAGEDLM_FAULT_INJECT``): requests whose prompt
holds the poison token fail inside a step while the rest of their batch goes on.

    python benchmarks/soak.py --tiny --duration 180 --rate 8        # a tiny random model
    python benchmarks/soak.py --duration 300 --rate 1               # the default model (SmolLM2)
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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import finish_report  # noqa: E402
from benchmarks.serve_bench import wait_listening  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps keys and values in small "
         "blocks so that many requests share one cache and continuous batching lets new ones join").split()
KINDS = ("ok", "disconnect", "abort", "bad", "fault")


@dataclass
class SoakConfig:
    duration_s: float = 30.0
    warmup_s: float = 8.0
    rate: float = 6.0  # requests per second (Poisson)
    seed: int = 0
    prompt_len: tuple[int, int] = (1, 48)
    max_tokens: tuple[int, int] = (1, 48)
    mix: dict[str, float] = field(default_factory=lambda: {"ok": 0.6, "disconnect": 0.12, "abort": 0.1,
                                                           "bad": 0.1, "fault": 0.08})
    p_stream: float = 0.5
    request_timeout_s: float = 120.0
    poison: int = 0  # the fault injector's token (the server's PAGEDLM_FAULT_INJECT)
    vocab_size: int = 0
    max_model_len: int = 0


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    problems: list[str] = field(default_factory=list)  # lost / hung / unexpected status

    def bad(self, kind: str, what: str) -> None:
        self.outcomes[(kind, "PROBLEM")] += 1
        if len(self.problems) < 50:
            self.problems.append(f"{kind}: {what}")


def _body(cfg: SoakConfig, rng: random.Random, kind: str) -> tuple[dict | bytes, bool]:
    stream = kind == "disconnect" or (kind in ("ok", "fault") and rng.random() < cfg.p_stream)
    n = rng.randint(*cfg.prompt_len)
    if kind == "fault":
        ids = [rng.randrange(10, cfg.poison) for _ in range(n)]
        ids[rng.randrange(n)] = cfg.poison
        prompt: object = ids
    elif rng.random() < 0.5:
        prompt = " ".join(rng.choice(WORDS) for _ in range(n))
    else:
        prompt = [rng.randrange(10, cfg.poison) for _ in range(n)]
    body = {"prompt": prompt, "max_tokens": rng.randint(*cfg.max_tokens), "stream": stream,
            "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5}
    if kind == "disconnect":
        body["max_tokens"] = cfg.max_tokens[1] * 4  # long enough to leave in the middle
    if kind == "bad":
        choice = rng.randrange(5)
        if choice == 0:
            return b'{"prompt": "unterminated', False
        if choice == 1:
            body["max_tokens"] = -1
        elif choice == 2:
            body["prompt"] = [cfg.vocab_size + 5]
        elif choice == 3:
            body["prompt"] = [11] * (cfg.max_model_len + 1)
        else:
            body["temperature"] = "hot"
        body["stream"] = False
    return body, stream


async def _one(http: httpx.AsyncClient, cfg: SoakConfig, rng: random.Random, kind: str, tally: Tally) -> None:
    body, stream = _body(cfg, rng, kind)
    tally.sent[kind] += 1
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    try:
        if kind == "abort":  # give up on a non-streamed call early: the server must abort it
            try:
                await asyncio.wait_for(http.post("/v1/completions", **kw), timeout=rng.uniform(0.01, 0.3))
                tally.outcomes[(kind, "finished first")] += 1
            except asyncio.TimeoutError:
                tally.outcomes[(kind, "aborted")] += 1
            return
        if not stream:
            r = await asyncio.wait_for(http.post("/v1/completions", **kw), timeout=cfg.request_timeout_s)
            _check_status(kind, r.status_code, r.json(), tally)
            return
        await asyncio.wait_for(_stream(http, kw, kind, rng, tally), timeout=cfg.request_timeout_s)
    except asyncio.TimeoutError:
        tally.bad(kind, f"hung: no answer within {cfg.request_timeout_s:.0f} s")
    except httpx.HTTPError as e:
        tally.bad(kind, f"lost: {type(e).__name__}: {e}")


def _check_status(kind: str, status: int, body: dict, tally: Tally) -> None:
    if kind == "ok" and status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop"):
        tally.outcomes[(kind, "completed")] += 1
    elif kind == "bad" and 400 <= status < 500:
        tally.outcomes[(kind, f"{status}")] += 1
    elif kind == "fault" and status == 500 and body["error"]["code"] == "request_failed":
        tally.outcomes[(kind, "error result")] += 1
    else:
        tally.bad(kind, f"unexpected status {status}: {json.dumps(body)[:200]}")


async def _stream(http: httpx.AsyncClient, kw: dict, kind: str, rng: random.Random, tally: Tally) -> None:
    leave_after = rng.randint(1, 4) if kind == "disconnect" else None
    events = []
    async with http.stream("POST", "/v1/completions", **kw) as r:
        if r.status_code != 200:
            tally.bad(kind, f"stream status {r.status_code}")
            return
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if leave_after is not None and len(events) >= leave_after:
                    tally.outcomes[(kind, "left mid-stream")] += 1
                    return  # closing the response disconnects
    if leave_after is not None:
        tally.outcomes[(kind, "finished first")] += 1
        return
    if not events or events[-1] != "[DONE]":
        tally.bad(kind, "stream ended without [DONE]")
        return
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if kind == "fault":
        ok = last.get("error", {}).get("code") == "request_failed"
    else:
        ok = bool(last.get("choices")) and last["choices"][-1]["finish_reason"] in ("length", "stop")
    if ok:
        tally.outcomes[(kind, "error result" if kind == "fault" else "completed")] += 1
    else:
        tally.bad(kind, f"stream ended with {events[-2][:200]}")


async def _load(url: str, cfg: SoakConfig, seconds: float, rng: random.Random, tally: Tally) -> None:
    kinds, weights = zip(*cfg.mix.items())
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)  # no fds kept between calls
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits) as http:
        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            tasks.append(asyncio.ensure_future(_one(http, cfg, random.Random(rng.random()), kind, tally)))
            await asyncio.sleep(rng.expovariate(cfg.rate))
        await asyncio.gather(*tasks)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and "{" in line:
            name = line.split("{")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _settle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """Wait until the engine is empty (aborts of disconnected clients land a step later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _metrics(url)
        if (m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0) or \
                time.monotonic() > deadline:
            time.sleep(0.5)
            return _metrics(url)
        time.sleep(0.2)


def _resources(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    return {"rss_mib": p.memory_info().rss / 2**20, "threads": p.num_threads(), "fds": p.num_fds()}


def _idle_resources(pid: int) -> dict[str, float]:
    """Idle figures: the least of a few samples over 2 s (the socket of the last /metrics call
    may still be closing; a leak stays)."""
    samples = []
    for _ in range(5):
        time.sleep(0.4)
        samples.append(_resources(pid))
    return {k: min(s[k] for s in samples) for k in samples[0]}


def run_soak(url: str, pid: int, cfg: SoakConfig) -> dict:
    """Warm up, sample idle resources, run the load, settle, sample again; return the report."""
    rng = random.Random(cfg.seed)
    warm = Tally()
    asyncio.run(_load(url, cfg, cfg.warmup_s, rng, warm))
    _settle(url)
    before = _idle_resources(pid)
    tally = Tally()
    peak = dict(before)
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            for k, v in _resources(pid).items():
                peak[k] = max(peak[k], v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    asyncio.run(_load(url, cfg, cfg.duration_s, rng, tally))
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    m = _settle(url)
    after = _idle_resources(pid)
    problems = sum(v for (k, o), v in tally.outcomes.items() if o == "PROBLEM") + \
        sum(v for (k, o), v in warm.outcomes.items() if o == "PROBLEM")
    unexpected_5xx = sum(1 for p in tally.problems + warm.problems if "status 5" in p)
    return {
        "duration_s": round(wall, 1), "requests": sum(tally.sent.values()), "sent": dict(tally.sent),
        "outcomes": {f"{k}: {o}": v for (k, o), v in sorted(tally.outcomes.items())},
        "problems": problems, "problem_samples": (warm.problems + tally.problems)[:20],
        "unexpected_5xx": unexpected_5xx,
        "running_after": m.get("vllm:num_requests_running", -1), "waiting_after": m.get("vllm:num_requests_waiting", -1),
        "kv_usage_after": m.get("vllm:kv_cache_usage_perc", -1),
        "generation_tokens": m.get("vllm:generation_tokens_total", m.get("vllm:generation_tokens", 0)),
        "before": before, "after": after, "peak": peak,
        "rss_growth": (after["rss_mib"] - before["rss_mib"]) / before["rss_mib"],
    }


def check(report: dict) -> list[str]:
    """What the soak requires; an empty list means it passed."""
    fails = []
    if report["problems"]:
        fails.append(f"{report['problems']} lost / hung / unexpected requests: {report['problem_samples']}")
    if report["unexpected_5xx"]:
        fails.append(f"{report['unexpected_5xx']} 5xx besides the injected faults")
    if report["running_after"] or report["waiting_after"] or report["kv_usage_after"]:
        fails.append(f"engine not empty after the load: running {report['running_after']}, waiting "
                     f"{report['waiting_after']}, KV usage {report['kv_usage_after']}")
    if abs(report["rss_growth"]) > 0.05:
        fails.append(f"RSS moved {report['rss_growth']:+.1%} (limit 5 %)")
    for k in ("threads", "fds"):
        if report["after"][k] > report["before"][k]:
            fails.append(f"{k} grew: {report['before'][k]} -> {report['after'][k]}")
    return fails


def launch(model: str, poison: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "pagedlm.cli", "serve", "--model", model, "--port", "0", "--log-level", "error",
           "--shutdown-timeout", "5", *extra]
    env = {**os.environ, "PAGEDLM_FAULT_INJECT": json.dumps({"token": poison, "stage": "prepare"})}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    return proc, wait_listening(proc, 600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama (tests/helpers.py) instead")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load after the warm-up")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    model = args.model
    if args.tiny:
        from tests.helpers import save_tiny

        model = save_tiny("llama", tempfile.mkdtemp(prefix="soak-tiny-"), max_position_embeddings=2048)
    from pagedlm.engine.engine import resolve_model

    _, _, mcfg = resolve_model(model)
    max_model_len = 1024
    poison = mcfg.vocab_size - 1
    proc, url = launch(model if model else resolve_model(None)[0], poison,
                       ["--max-model-len", str(max_model_len), "--kv-cache-memory", "64M", "--enforce-eager"]
                       + (["--dtype", "float32"] if args.tiny else []))
    try:
        cfg = SoakConfig(duration_s=args.duration, warmup_s=args.warmup, rate=args.rate, seed=args.seed,
                         max_tokens=(1, args.max_tokens), poison=poison, vocab_size=mcfg.vocab_size,
                         max_model_len=max_model_len)
        report = run_soak(url, proc.pid, cfg)
    finally:
        proc.terminate()
        code = proc.wait(60)
    return finish_report(report, code, args.json, check,
                         f"{report['requests']} requests in {report['duration_s']} s; "
                         f"RSS {report['before']['rss_mib']:.0f} -> {report['after']['rss_mib']:.0f} MiB "
                         f"({report['rss_growth']:+.2%}); threads {report['before']['threads']} -> "
                         f"{report['after']['threads']}; fds {report['before']['fds']} -> {report['after']['fds']}", "soak")


if __name__ == "__main__":
    sys.exit(main())
