"""pagedlm's decode attention kernel (``pagedlm::paged_attention``) with its cache in memory, as a
long batch meets it: SmolLM2's shape (9 query heads over 3 KV heads, head size 64, bf16 cache,
blocks of 16), 30 layers each with its own cache tensor, every row's blocks in random order; best
of 5 passes over the 30 layers, and the cache bytes read per second.

    python benchmarks/bench_attention.py [--cases 1x300 8x300 32x128 48x300] [--block-size 16]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["1x300", "8x300", "32x128", "48x300"], help="ROWSxKEYS")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    from pagedlm import kernels

    ops = kernels.ops()
    if ops is None:
        raise SystemExit("pagedlm's kernels are not available here")
    heads, kvh, d, bs = 9, 3, 64, args.block_size
    g = torch.Generator().manual_seed(0)
    print(f"| rows x keys | ms, 30 layers | KV cache MB | GB/s |  (threads {torch.get_num_threads()}, blocks of {bs})")
    print("|---|---:|---:|---:|")
    for case in args.cases:
        rows, ctx = (int(v) for v in case.split("x"))
        nbk = -(-ctx // bs)
        caches = [torch.randn(2, rows * nbk + 1, bs, kvh, d, generator=g).to(torch.bfloat16) for _ in range(30)]
        tables = torch.randperm(rows * nbk, generator=g).reshape(rows, nbk)
        lens = torch.full((rows,), ctx, dtype=torch.long)
        q = torch.randn(rows, heads, d, generator=g).to(torch.bfloat16)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for c in caches:
                ops.paged_attention(q, c, tables, lens, d ** -0.5, 0)
            best = min(best, time.perf_counter() - t)
        nbytes = rows * ctx * 30 * 2 * kvh * d * 2
        print(f"| {rows} x {ctx} | {best * 1e3:.2f} | {nbytes / 1e6:.0f} | {nbytes / best / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
