"""What the live engine view costs.

    # per call: LLMEngine.snapshot_state() (the engine thread's share) and its JSON encoding,
    # with 4,096 KV blocks and 64 decoding sequences; then GET /v1/engine/state over loopback
    python benchmarks/ui_bench.py snapshot
    # serve throughput at concurrency 32 with the view closed vs open (a client reading
    # /v1/engine/state/stream at the page's rate, four snapshots a second with the block arrays),
    # alternating closed / open runs on one server
    python benchmarks/ui_bench.py throughput --pairs 3
    # the page in headless Chromium (Debian's chromium, Playwright) following 64 concurrent
    # streams on a pool of 4,369 blocks: time to draw the grid and to render a whole update
    python benchmarks/ui_bench.py draw

All use the default model (bundled SmolLM2) unless --model-path is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_bench import launch_pagedlm, make_prompt, run_load, summarize  # noqa: E402

PAGE_INTERVAL_MS = 250  # pagedlm/server/static/app.js STATE_INTERVAL_MS


def time_calls(fn, n: int) -> tuple[float, float]:
    """(median, p99) seconds per call over ``n`` calls."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return statistics.median(ts), ts[int(0.99 * (n - 1))]


def bench_snapshot(args) -> None:
    from pagedlm.engine.engine import EngineConfig, LLMEngine
    from pagedlm.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model_path, num_kv_blocks=args.blocks, max_num_seqs=args.seqs,
                                    enforce_eager=True, quantization="none"))
    rng = random.Random(0)
    shared = [rng.randrange(100, 40000) for _ in range(48)]  # a common prefix: shared blocks too
    for i in range(args.seqs):
        prompt = shared + [rng.randrange(100, 40000) for _ in range(16 + i % 48)]
        engine.add_request(f"req-{i}", None, SamplingParams(max_tokens=10_000, ignore_eos=True), prompt_token_ids=prompt)
    while len(engine.scheduler.running) < args.seqs or engine.scheduler.waiting:
        engine.step()
    for _ in range(4):
        engine.step()
    snap = engine.snapshot_state()
    counts = snap["counts"]
    print(f"{engine.num_kv_blocks} blocks x {snap['block_size']} tokens, {len(snap['sequences'])} sequences "
          f"({counts}); one decode step takes {time_calls(engine.step, 5)[0] * 1e3:.1f} ms here")
    rows = []
    for label, fn in (
        ("snapshot_state() with block arrays (engine thread)", lambda: engine.snapshot_state(True)),
        ("snapshot_state(include_blocks=False)", lambda: engine.snapshot_state(False)),
        ("json.dumps of the full snapshot (event loop)", lambda: json.dumps(snap, separators=(",", ":"))),
    ):
        med, p99 = time_calls(fn, args.calls)
        rows.append((label, med, p99))
    size = len(json.dumps(snap, separators=(",", ":")))
    print("\n| per call | median | p99 |\n|---|---:|---:|")
    for label, med, p99 in rows:
        print(f"| {label} | {med * 1e6:,.0f} µs | {p99 * 1e6:,.0f} µs |")
    print(f"\nfull snapshot: {size:,} bytes of JSON; at the page's {1000 // PAGE_INTERVAL_MS} updates a second the "
          f"engine thread spends {rows[0][1] * 1000 / PAGE_INTERVAL_MS * 100:.2f}% of its time on snapshots")
    engine.shutdown()


def http_snapshot_cost(url: str, calls: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        c.get("/v1/engine/state")
        med, p99 = time_calls(lambda: c.get("/v1/engine/state").raise_for_status(), calls)
    print(f"GET /v1/engine/state over loopback (idle server): median {med * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class ViewClient:
    """Reads the state stream as the page does (and parses each event) until stopped."""

    def __init__(self, url: str):
        self.url = url
        self.events = 0
        self.bytes = 0
        self.stop = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url + "/v1/engine/state/stream",
                              params={"interval_ms": PAGE_INTERVAL_MS}, timeout=60) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        json.loads(line[6:])
                        self.events += 1
                        self.bytes += len(line)
                    if self.stop.is_set():
                        return
        except httpx.HTTPError as e:
            self.error = repr(e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def bench_throughput(args) -> None:
    launch = argparse.Namespace(dtype="auto", quantization="auto", enforce_eager=args.enforce_eager,
                                model_path=args.model_path, concurrency=[args.concurrency])
    proc, url = launch_pagedlm(launch)
    try:
        http_snapshot_cost(url, 200)
        rng = random.Random(0)
        n = args.num_prompts or 4 * args.concurrency

        def one_run(label: str) -> dict:
            prompts = [make_prompt(rng, args.input_words) for _ in range(n)]
            view = ViewClient(url) if label == "open" else None
            cpu0 = cpu_seconds(proc.pid)
            results, wall = asyncio.run(run_load(url, None, None, prompts, args.max_tokens, args.concurrency, None,
                                                 300.0, 900.0, 0))
            s = summarize(label, results, wall)
            # The server's own CPU time per output token: far less sensitive than wall-clock
            # throughput to other jobs on the machine, and it counts everything the view adds.
            s["server_cpu_ms_per_token"] = (cpu_seconds(proc.pid) - cpu0) * 1e3 / max(1, sum(
                r.output_tokens for r in results if r.ok))
            if view is not None:
                view.close()
                assert view.error is None, view.error
                s["view_events_per_s"] = view.events / wall
                s["view_kib_per_s"] = view.bytes / wall / 1024
            print(json.dumps(s), flush=True)
            return s

        one_run("warm-up")
        runs = {"closed": [], "open": []}
        for i in range(args.pairs):
            # Alternate the order so a drift in the machine's load does not favour one side.
            for label in (("closed", "open") if i % 2 == 0 else ("open", "closed")):
                runs[label].append(one_run(label))
        print("\n| view | runs | output tok/s (each) | mean | server CPU ms / token (each) | TTFT p50 ms (mean) | "
              "ITL p50 ms (mean) |\n|---|---:|---|---:|---|---:|---:|")
        means = {}
        for label, rs in runs.items():
            tps = [r["output_tok_per_s"] for r in rs]
            means[label] = statistics.fmean(tps)
            cpu = ", ".join(f"{r['server_cpu_ms_per_token']:.2f}" for r in rs)
            print(f"| {label} | {len(rs)} | {', '.join(f'{x:.1f}' for x in tps)} | {means[label]:.1f} | {cpu} | "
                  f"{statistics.fmean(r['ttft_p50_ms'] for r in rs):.0f} | "
                  f"{statistics.fmean(r['itl_p50_ms'] for r in rs):.1f} |")
        ev = statistics.fmean(r["view_events_per_s"] for r in runs["open"])
        kib = statistics.fmean(r["view_kib_per_s"] for r in runs["open"])
        # Other load on the machine drifts over minutes: the ratio within each back-to-back pair
        # is the figure that cancels it.
        ratios = sorted(o["output_tok_per_s"] / c["output_tok_per_s"] for o, c in zip(runs["open"], runs["closed"]))
        print(f"\nview open: {ev:.1f} snapshots/s received ({kib:.0f} KiB/s); throughput open / closed: "
              f"mean of runs {means['open'] / means['closed']:.3f}, per pair median {statistics.median(ratios):.3f} "
              f"(range {ratios[0]:.3f} .. {ratios[-1]:.3f})")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def bench_draw(args) -> None:
    import shutil

    from playwright.sync_api import sync_playwright

    launch = argparse.Namespace(dtype="float32", quantization="none", enforce_eager=True, model_path=args.model_path,
                                concurrency=[args.concurrency])
    extra = ["--kv-cache-memory", args.kv_cache_memory]
    proc, url = launch_pagedlm(launch, extra)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            page.wait_for_function("window.pagedlmView.updates > 0")
            rng = random.Random(0)
            prompts = [make_prompt(rng, args.input_words) for _ in range(args.concurrency)]
            load = threading.Thread(target=lambda: asyncio.run(run_load(
                url, None, None, prompts, args.max_tokens, args.concurrency, None, 600.0, 900.0, 0)))
            load.start()
            page.wait_for_function(f"window.pagedlmView.state.queues.running >= {args.concurrency}", timeout=300_000)
            page.evaluate("window.pagedlmView.drawMs.length = 0; window.pagedlmView.updateMs.length = 0")
            t0 = time.monotonic()
            rtt = []
            while time.monotonic() - t0 < args.seconds:
                t = time.perf_counter()
                page.evaluate("1")  # a round trip through the page's main thread
                rtt.append(time.perf_counter() - t)
                time.sleep(0.05)
            view = page.evaluate("(() => { const v = window.pagedlmView; return {draw: v.drawMs, update: v.updateMs,"
                                 " blocks: v.state.num_blocks, running: v.state.queues.running}; })()")
            load.join()
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"{view['blocks']} blocks, {view['running']} running at the end, {len(view['update'])} updates in "
          f"{args.seconds:.0f} s\n\n| per update | median | p99 | max |\n|---|---:|---:|---:|")
    for label, xs in (("draw the block grid (canvas)", view["draw"]),
                      ("render the whole update (counts, grid, queues, plots)", view["update"]),
                      ("page main-thread round trip (evaluate)", [x * 1e3 for x in rtt])):
        xs = sorted(xs)
        print(f"| {label} | {statistics.median(xs):.1f} ms | {xs[int(0.99 * (len(xs) - 1))]:.1f} ms | {xs[-1]:.1f} ms |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("snapshot", help="per-call cost of a snapshot")
    s.add_argument("--blocks", type=int, default=4096)
    s.add_argument("--seqs", type=int, default=64)
    s.add_argument("--calls", type=int, default=300)
    t = sub.add_parser("throughput", help="serve throughput with the view closed vs open")
    t.add_argument("--concurrency", type=int, default=32)
    t.add_argument("--pairs", type=int, default=3, help="closed/open run pairs")
    t.add_argument("--max-tokens", type=int, default=32)
    t.add_argument("--num-prompts", type=int, default=None, help="requests per run (default 4 x concurrency)")
    t.add_argument("--input-words", type=int, default=64)
    t.add_argument("--enforce-eager", action="store_true")
    d = sub.add_parser("draw", help="the page's drawing cost under 64 concurrent streams")
    d.add_argument("--concurrency", type=int, default=64)
    d.add_argument("--kv-cache-memory", default="3G", help="pool size (default: 4,369 blocks of SmolLM2 in float32)")
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--input-words", type=int, default=64)
    d.add_argument("--seconds", type=float, default=20.0, help="how long to sample the page")
    for p in (s, t, d):
        p.add_argument("--model-path", default=None, help="the model (default: bundled SmolLM2)")
    args = ap.parse_args(argv)
    {"snapshot": bench_snapshot, "throughput": bench_throughput, "draw": bench_draw}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
