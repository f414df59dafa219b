"""What compiling the decode step costs and what it buys, per way of compiling it (issue 22).

For each bucket: the time until its compiled step is ready and the wall time of one compiled
step, for (a) a background-built AOTInductor package (`compile_mode=background`: built by the
builder process, then loaded) and (b) in-process `torch.compile` (`compile_mode=inline`), each
in a fresh process with an empty cache; then (c) a second background process loading the same
packages from the cache. Also the batch-1 decode rate while a builder runs beside the engine,
against eager alone. Every run counts its produced tokens and fails on a short or failed request.

    python benchmarks/bench_compile.py --buckets 1,8 [--model PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from pagedlm import LLM, SamplingParams
mode, buckets, model = sys.argv[1], json.loads(sys.argv[2]), (sys.argv[3] or None)
llm = LLM(model, enforce_eager=False, compile_mode=mode, max_num_seqs=max(buckets))
c = llm.engine.runner.compiled
out = {"mode": mode, "llm_s": time.perf_counter() - t0, "loaded_at_start": [b for b, s in c.states().items() if s == "compiled"]}
params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)

def decode_rate(n=1):
    prompts = [{"prompt_token_ids": [100 + i, 200, 300, 400]} for i in range(n)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != 48 * n or any(o.outputs[0].finish_reason != "length" for o in outs):
        raise SystemExit(f"short or failed request: {produced} of {48 * n} tokens")
    return produced / (time.perf_counter() - t)

if mode == "background" and 1 not in out["loaded_at_start"]:
    eager_alone = decode_rate()                    # nothing built yet, no builder running
    c.request([1])
    out["eager_tok_s"] = eager_alone
    rates, t = [], time.perf_counter()
    while 1 in c.pending and time.perf_counter() - t < 40:  # the builder compiles beside the engine
        rates.append(decode_rate())
    out["eager_with_builder_tok_s"] = sum(rates) / len(rates)
ready = {}
for b in buckets:
    t = time.perf_counter()
    c.warmup([b])
    ready[b] = time.perf_counter() - t
steps = {}
for b in buckets:
    decode_rate(b)
    decode_rate(b)
    steps[b] = c.step_seconds.get(b)
out["ready_s"] = ready
out["step_ms"] = {b: (s * 1e3 if s else None) for b, s in steps.items()}
out["compiled_tok_s"] = decode_rate()
out["states"] = c.states()
print(json.dumps(out))
"""


def run(mode: str, buckets: list[int], model: str | None, cache: str) -> dict:
    env = {**os.environ, "PAGEDLM_CACHE_DIR": cache, "PAGEDLM_ENFORCE_EAGER": "0"}
    p = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(buckets), model or ""], env=env,
                       capture_output=True, text=True, timeout=7200)
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", default="1,8", help="buckets to compile and time (default 1,8)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as bg, tempfile.TemporaryDirectory() as inl:
        # The kernels folder is shared so that no run pays the g++ build of pagedlm's kernels.
        rows.append(("background, cold", run("background", buckets, args.model, bg)))
        rows.append(("background, warm (2nd process)", run("background", buckets, args.model, bg)))
        rows.append(("inline torch.compile, cold", run("inline", buckets, args.model, inl)))
    print(f"{'run':<32} {'LLM() s':>8} " + " ".join(f"{'b' + str(b) + ' ready s':>11} {'b' + str(b) + ' step ms':>11}"
                                                 for b in buckets))
    for name, r in rows:
        cells = " ".join(f"{r['ready_s'][str(b)]:>11.1f} {r['step_ms'][str(b)] or float('nan'):>11.2f}" for b in buckets)
        print(f"{name:<32} {r['llm_s']:>8.1f} {cells}")
    cold = rows[0][1]
    if "eager_tok_s" in cold:
        print(f"batch-1 decode, eager alone {cold['eager_tok_s']:.1f} tok/s; eager while the builder compiles "
              f"{cold['eager_with_builder_tok_s']:.1f} tok/s; compiled {cold['compiled_tok_s']:.1f} tok/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
