"""The serving benchmark's workload without a server: C clients in a closed loop, each sending its
next request the moment its last one ends, straight into ``LLMEngine`` (no HTTP, no process
boundary). What `serve_bench.py --concurrency C` would measure if serving cost nothing.

    python benchmarks/closed_loop.py [--concurrency 32] [--requests 128] [--input-words 64] [--max-tokens 64]

Same prompts as serve_bench.py (random words, fixed seed), greedy, ignore_eos; one warm-up wave
first. Prints output tok/s and the step-time distribution; fails if a request ends short.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.serve_bench import make_prompt  # noqa: E402


def run(engine, rng: random.Random, concurrency: int, total: int, words: int, max_tokens: int) -> dict:
    from pagedlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sent = done = tokens = 0

    def send() -> None:
        nonlocal sent
        engine.add_request(f"c{sent}-{time.monotonic_ns()}", make_prompt(rng, words), params)
        sent += 1

    for _ in range(min(concurrency, total)):
        send()
    steps: list[float] = []
    t0 = time.perf_counter()
    while done < total:
        ts = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - ts)
        for o in outs:
            if getattr(o, "finished", False):
                n = len(o.outputs[0].token_ids)
                if n != max_tokens:
                    raise SystemExit(f"a request ended with {n} of {max_tokens} tokens")
                done += 1
                tokens += n
                if sent < total:
                    send()
    wall = time.perf_counter() - t0
    steps.sort()
    return {"concurrency": concurrency, "requests": total, "wall_s": round(wall, 2),
            "output_tok_per_s": round(tokens / wall, 1), "steps": len(steps),
            "step_p50_ms": round(1e3 * steps[len(steps) // 2], 1), "step_max_ms": round(1e3 * steps[-1], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="default: 4 x concurrency")
    ap.add_argument("--input-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    from pagedlm import LLM

    engine = LLM().engine
    rng = random.Random(0)
    run(engine, rng, args.concurrency, args.concurrency, args.input_words, args.max_tokens)  # warm-up wave
    print(run(engine, rng, args.concurrency, args.requests or 4 * args.concurrency, args.input_words,
              args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
