"""One decode row through every int4 layer of SmolLM2 (as the engine loads them: pagedlm's
kernel, the tiled scales, x in the model's compute dtype), per layer shape and all in model
order, with 2 threads then 1: best of 5 passes, ms and GB/s of codes read.

    python benchmarks/bench_int4_decode_row.py
"""

from __future__ import annotations

import collections
import sys
import time

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])


def best_of(passes: int, fn) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    from pagedlm import LLM
    from pagedlm.engine.aot import quantized_weights

    llm = LLM(enforce_eager=True)
    ws = [w for w in quantized_weights(llm.engine.runner.model) if w.kind == "int4" and w.kernel is not None]
    if not ws:
        raise SystemExit("pagedlm's int4 kernel is not available here")
    dtype = ws[0].dense.dtype
    xs = {k: torch.randn(1, k, dtype=dtype) for k in {w.dense.shape[1] for w in ws}}

    def run(group):
        for w in group:
            w.kernel(xs[w.dense.shape[1]], w.packed, w.kernel_scales[0], w.kernel_scales[1], True, w.dense.shape[0])

    shapes = collections.Counter(tuple(w.dense.shape) for w in ws)
    print(f"{len(ws)} int4 layers {dict(shapes)}; x {dtype}")
    with torch.inference_mode():
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for shape in shapes:
                group = [w for w in ws if tuple(w.dense.shape) == shape]
                t = best_of(5, lambda: run(group))  # noqa: B023 - called at once
                nbytes = sum(w.packed.numel() * w.packed.element_size() for w in group)
                print(f"threads {threads} shape {shape} x{len(group)}: {t * 1e3:.2f} ms, "
                      f"{t / len(group) * 1e6:.1f} us/layer, {nbytes / t / 1e9:.1f} GB/s")
            t = best_of(5, lambda: run(ws))
            nbytes = sum(w.packed.numel() * w.packed.element_size() for w in ws)
            print(f"threads {threads} all: {t * 1e3:.2f} ms {nbytes / t / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
