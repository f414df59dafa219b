"""Many rows (prefill chunks, large batches): pagedlm's int4 kernel with int8 activations against
the dense GEMM over the same weights (in the model's compute dtype, as the engine runs it:
float32, or bfloat16 where the CPU has native bf16 and AMX or AVX512-BF16 multiply it), on SmolLM2's own 120 int4 layers (as loaded from
the shipped GGUF), per row count. This is what ``quant.measure_crossover`` decides at start-up.

    python benchmarks/bench_int4_rows.py [--rows 1 8 16 32 64 128 256 512] [--rounds 3]

Per row count: one pass of x through every int4 layer (the dense GEMM over x rounded to int8 as
the kernel rounds it, so both compute the same products), best of ``--rounds``; GFLOP/s counts
2 x rows x weights.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from pagedlm import LLM, kernels
    from pagedlm.engine.aot import quantized_weights
    from pagedlm.model.layers.matmul import linear
    from pagedlm.model.layers.quant import round_activations_int8

    ops = kernels.ops()
    if ops is None:
        raise SystemExit("pagedlm's kernels are not available here")
    llm = LLM(enforce_eager=True)
    ws = [w for w in quantized_weights(llm.engine.runner.model) if w.kind == "int4" and w.kernel is not None]
    dtype = ws[0].dense.dtype
    print(f"{len(ws)} int4 layers; kernels ISA {ops.isa()}{' + AMX tiles' if ops.amx() else ''}; "
          f"{torch.get_num_threads()} threads; {dtype}")
    print(f"| rows | dense {str(dtype).removeprefix('torch.')} GEMM ms | int4 kernel ms | dense GFLOP/s | kernel GFLOP/s | kernel speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, dtype=dtype) for k in {w.dense.shape[1] for w in ws}}
            flops = sum(2 * rows * w.dense.numel() for w in ws)
            best = {"dense": float("inf"), "kernel": float("inf")}
            for _ in range(args.rounds):  # alternate: a busy moment slows both alike
                t = time.perf_counter()
                for w in ws:
                    linear(round_activations_int8(xs[w.dense.shape[1]]), w.dense)
                best["dense"] = min(best["dense"], time.perf_counter() - t)
                t = time.perf_counter()
                for w in ws:
                    w.kernel(xs[w.dense.shape[1]], w.packed, w.kernel_scales[0], w.kernel_scales[1], True,
                             w.dense.shape[0])
                best["kernel"] = min(best["kernel"], time.perf_counter() - t)
            d, k = best["dense"], best["kernel"]
            print(f"| {rows} | {d * 1e3:.1f} | {k * 1e3:.1f} | {flops / d / 1e9:.0f} | {flops / k / 1e9:.0f} | "
                  f"{d / k:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
