"""Loopback load generator for any OpenAI-compatible server (pagedlm, vLLM, llama.cpp's llama-server).

Sends streaming /v1/completions requests at a fixed concurrency (closed loop) or a Poisson
request rate (open loop) and reports request and token throughput, TTFT, ITL and end-to-end
latency (p50 / p99). ITL is the gap between streamed chunks (one token per chunk unless the
server merges them, as vLLM's benchmark also measures it).

    # start pagedlm itself (default model), run concurrency 1, 8 and 32, stop it
    python benchmarks/serve_bench.py --launch --concurrency 1 8 32
    # against a server that is already up (any engine)
    python benchmarks/serve_bench.py --url http://127.0.0.1:8080 --model NAME --concurrency 8
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --request-rate 4 --num-prompts 64

Every run is bounded: --num-prompts requests, a per-request --timeout and a --max-duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps keys and values in small "
         "blocks so that many requests share one cache and continuous batching lets new ones join every step").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_request(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> Result:
    t0 = time.perf_counter()
    res = Result(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):  # the request failed mid-stream: not a completed request
                    res.error = f"error event: {obj['error'].get('message', obj['error'])}"
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                if not obj.get("choices") or not obj["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.e2e = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = last is not None and res.output_tokens >= body["max_tokens"]  # ignore_eos: all of them
        if not res.ok:
            res.error = ("no tokens streamed" if last is None
                         else f"{res.output_tokens} of {body['max_tokens']} tokens produced")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, model: str | None, api_key: str | None, prompts: list[str], max_tokens: int,
                   concurrency: int | None, rate: float | None, timeout: float, max_duration: float,
                   seed: int) -> tuple[list[Result], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=256)
    rng = random.Random(seed)

    def body(p: str) -> dict:
        b = {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
             "stream_options": {"include_usage": True}}
        if model:
            b["model"] = model
        return b

    async with httpx.AsyncClient(headers=headers, limits=limits) as client:
        endpoint = url.rstrip("/") + "/v1/completions"
        t0 = time.perf_counter()
        if concurrency:
            queue = list(prompts)
            results: list[Result] = []

            async def worker():
                while queue:
                    p = queue.pop()
                    results.append(await one_request(client, endpoint, body(p), timeout))

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), max_duration)
        else:
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(one_request(client, endpoint, body(p), timeout)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.wait_for(asyncio.gather(*tasks), max_duration)
        return list(results), time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(label: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    s = {
        "run": label, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3, "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "e2e_p50_s": pct(e2e, 0.5), "e2e_mean_s": statistics.fmean(e2e) if e2e else float("nan"),
    }
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        s["errors"] = errors[:3]
    return s


def launch_pagedlm(args, extra: list[str] | tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start ``pagedlm serve`` for a run (``extra``: more serve options); returns (process, URL)."""
    cmd = [sys.executable, "-m", "pagedlm.cli", "serve", "--port", "0", "--log-level", "warning",
           "--dtype", args.dtype, "--max-num-seqs", str(max(args.concurrency or [64])),
           "--quantization", args.quantization]
    # Compile every decode bucket before listening, so no run measures a compile stall.
    cmd += ["--enforce-eager"] if args.enforce_eager else ["--compile-at-startup"]
    if args.model_path:
        cmd += ["--model", args.model_path]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # A cold inductor cache compiles each bucket (~1 min each).
    return proc, wait_listening(proc, 1800, echo="KV cache:")


def wait_listening(proc: subprocess.Popen, timeout_s: float, echo: str | None = None) -> str:
    """Read a starting ``pagedlm serve``'s stderr until it listens; returns its URL (stderr is
    drained in the background from then on). ``echo``: print lines containing it."""
    deadline = time.monotonic() + timeout_s
    while True:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"pagedlm serve exited during start-up (rc {proc.returncode})")
        if echo and echo in line:
            print(line.strip(), file=sys.stderr)
        if "listening on " in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return line.split("listening on ")[1].strip()
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"pagedlm serve did not start within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="server base URL (default: --launch one)")
    ap.add_argument("--launch", action="store_true", help="start 'pagedlm serve' on a free port for the run")
    ap.add_argument("--model-path", default=None, help="with --launch: the model (default: bundled SmolLM2)")
    ap.add_argument("--dtype", default="auto", help="with --launch: the dtype (default auto)")
    ap.add_argument("--quantization", default="auto", help="with --launch: the quantization (default auto)")
    ap.add_argument("--enforce-eager", action="store_true", help="with --launch: do not compile the decode step")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="with --launch: one more 'pagedlm serve' argument (repeat), e.g. --serve-arg=--engine-core "
                         "--serve-arg=thread")
    ap.add_argument("--model", default=None, help="the 'model' field to send (default: omitted)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--concurrency", type=int, nargs="*", default=None, help="closed loop: clients in flight")
    ap.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    ap.add_argument("--num-prompts", type=int, default=None, help="requests per run (default 4 x concurrency, min 8)")
    ap.add_argument("--input-words", type=int, default=64, help="prompt length in words")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--max-duration", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = ap.parse_args(argv)
    if args.request_rate is None and not args.concurrency:
        args.concurrency = [1]
    if args.url is None and not args.launch:
        ap.error("give --url of a running server or --launch")

    proc = None
    url = args.url
    if args.launch:
        proc, url = launch_pagedlm(args, args.serve_arg)
    failed = 0  # requests that failed or produced fewer tokens than asked, over every run
    try:
        runs = [("rate", args.request_rate)] if args.request_rate else [("concurrency", c) for c in args.concurrency]
        rng = random.Random(args.seed)
        # Warm up (first-call allocations, tokenizer caches) outside the measurement.
        asyncio.run(run_load(url, args.model, args.api_key, [make_prompt(rng, args.input_words)], 4, 1, None,
                             args.timeout, args.max_duration, args.seed))
        for kind, value in runs:
            n = args.num_prompts or max(8, 4 * int(value if kind == "concurrency" else 8))
            prompts = [make_prompt(rng, args.input_words) for _ in range(n)]
            results, wall = asyncio.run(run_load(
                url, args.model, args.api_key, prompts, args.max_tokens,
                value if kind == "concurrency" else None, value if kind == "rate" else None,
                args.timeout, args.max_duration, args.seed))
            s = summarize(f"{kind}={value}", results, wall)
            failed += s["failed"]
            if args.json:
                print(json.dumps(s))
            else:
                print(f"{s['run']:>16}: {s['requests']} req ({s['failed']} failed) in {s['wall_s']:.1f} s | "
                      f"{s['req_per_s']:.2f} req/s, {s['output_tok_per_s']:.1f} out tok/s | "
                      f"TTFT p50 {s['ttft_p50_ms']:.0f} ms p99 {s['ttft_p99_ms']:.0f} ms | "
                      f"ITL p50 {s['itl_p50_ms']:.1f} ms p99 {s['itl_p99_ms']:.1f} ms", flush=True)
                for e in s.get("errors", []):
                    print(f"{'':>18}error: {e}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if failed:
        print(f"serve_bench: FAILED: {failed} request(s) failed or came back short", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
