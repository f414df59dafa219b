"""One decode row through weights that stream from memory, as in a real step (the step reads
~95 MB a token for SmolLM2 in ``auto``, more than any core's caches): pagedlm's int8 kernel over
SmolLM2's head shape (49152 x 576) and its int4 kernel over each int4 layer shape, each through
enough distinct random weights (~100-230 MB) that no pass finds them in cache. Best of 5
passes; GB/s of weight bytes read (int4: codes, scales and mins).

    python benchmarks/bench_stream_gemv.py [--threads 2 1]

``bench_int4_decode_row.py`` runs the model's own 66 MB of int4 weights, which a large shared L3
may partly hold between passes; this one measures the kernels against memory.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_int4_decode_row import best_of  # noqa: E402

INT4_SHAPES = [(960, 576, 300), (576, 576, 400), (3072, 576, 120), (576, 1536, 200)]  # (out, in, copies)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    from pagedlm import kernels
    from pagedlm.model.layers.quant import quantize_int4

    ops = kernels.ops()
    if ops is None:
        print(f"pagedlm's kernels are not available here: {kernels.build_failed()}")
        return 1
    print(f"kernels: {ops.isa()}; torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    N, K, copies = 49152, 576, 8
    heads = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g) for _ in range(copies)]
    scale = torch.rand(N, generator=g) * 1e-3
    x = torch.randn(1, K, dtype=torch.bfloat16, generator=g)
    int4 = []
    for n, k, c in INT4_SHAPES:
        ws = [quantize_int4(torch.randn(n, k, dtype=torch.bfloat16, generator=g) * 0.02, torch.bfloat16)
              for _ in range(c)]
        nbytes = sum(w.packed.numel() + 2 * w.kernel_scales[0].numel() * w.kernel_scales[0].element_size()
                     for w in ws)
        int4.append(((n, k, c), ws, torch.randn(1, k, dtype=torch.bfloat16, generator=g), nbytes))
    threads = torch.get_num_threads()
    try:
        for t in args.threads:
            torch.set_num_threads(t)
            for int8_act in (True, False):
                dt = best_of(5, lambda a=int8_act: [ops.int8_mm(x, w, scale, a) for w in heads])
                print(f"threads {t} int8 head {N}x{K} x{copies} ({copies * N * K / 1e6:.0f} MB), "
                      f"int8 activations {int8_act}: {dt / copies * 1e3:.3f} ms a head, "
                      f"{copies * N * K / dt / 1e9:.1f} GB/s")
            for (n, k, c), ws, xi, nbytes in int4:
                dt = best_of(5, lambda ws=ws, xi=xi: [w.kernel_mm(xi) for w in ws])
                print(f"threads {t} int4 {n}x{k} x{c} ({nbytes / 1e6:.0f} MB): {dt / c * 1e6:.1f} us a layer, "
                      f"{nbytes / dt / 1e9:.1f} GB/s")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
