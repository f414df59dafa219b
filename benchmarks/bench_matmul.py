"""Per-layer matmul time of SmolLM2's four projections: fp32 vs bf16 vs bf16 upcast on the fly.

    python benchmarks/bench_matmul.py

Decides ``pagedlm.model.layers.matmul.UPCAST_MIN_ROWS`` on a given CPU: the modes are timed
interleaved (median of 30) at 1..512 rows, so machine noise hits them alike.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down


def run(rows: int, mode: str, w32, w16, reps: int = 30) -> float:
    xs = {i: torch.randn(rows, i) for i in (576, 1536)}
    xs16 = {k: v.bfloat16() for k, v in xs.items()}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for a, b in zip(w32, w16):
            i = a.shape[1]
            if mode == "fp32":
                F.linear(xs[i], a)
            elif mode == "bf16":
                F.linear(xs16[i], b)
            else:
                F.linear(xs16[i].float(), b.float()).bfloat16()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    from pagedlm.model.layers.matmul import cpu_has_native_bf16

    w32 = [torch.randn(o, i) for o, i in SHAPES]
    w16 = [w.bfloat16() for w in w32]
    print(f"native bf16: {cpu_has_native_bf16()}; threads: {torch.get_num_threads()}")
    print(f"{'rows':>5} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16->fp32 ms':>14}")
    modes = ["fp32", "bf16", "upcast"]
    for rows in (1, 4, 8, 16, 64, 256, 512):
        a = {m: run(rows, m, w32, w16) for m in modes}
        b = {m: run(rows, m, w32, w16) for m in reversed(modes)}
        best = {m: min(a[m], b[m]) for m in modes}
        print(f"{rows:5d} {best['fp32']:9.3f} {best['bf16']:9.3f} {best['upcast']:14.3f}")


if __name__ == "__main__":
    main()
