"""The compiled decode step of SmolLM2 (``auto``) per batch bucket and context length: ms a step
and tokens/s, optionally with the torch profiler's self time per op.

    python benchmarks/bench_step_rows.py --buckets 1 32 64 --context 256 [--profile]

Steps run on padding rows whose tables point at the scratch block, each as long as ``--context``
(the attention reads as much as for real sequences of that length); best of 5 after two warm-up
steps. Buckets not in the compile cache are compiled first (minutes each).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="also print the top ops by self CPU time")
    args = ap.parse_args()
    from pagedlm import LLM
    from pagedlm.engine.compiled import DecodeBatch

    llm = LLM(kv_cache_memory=1024 << 20, max_num_seqs=max(args.buckets))
    llm.engine.warmup(args.buckets)
    c = llm.engine.runner.compiled
    width = max(2, -(-args.context // c.block_size))
    with torch.no_grad():
        for b in args.buckets:
            buf = c.buffers[b]
            buf.tables[: b * width].fill_(c.scratch_block)
            buf.lens.fill_(width * c.block_size)

            def step(b=b):
                c.execute(DecodeBatch(None, b, width, None, 0))

            step()
            step()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            best = min(times)
            print(f"bucket {b} context {args.context}: step {best * 1e3:.1f} ms ({b / best:.0f} tok/s)")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step()
                by_op = collections.Counter()
                for e in prof.key_averages():
                    by_op[e.key] += e.self_cpu_time_total
                for k, v in by_op.most_common(8):
                    print(f"   {v / 3 / 1e3:8.2f} ms  {k[:90]}")


if __name__ == "__main__":
    main()
