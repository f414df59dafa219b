"""The decode matmuls of SmolLM2-135M alone, per kernel, threads and rows, against the machine's
copy bandwidth: how close each kernel streams its weights to the memory roofline.

    python benchmarks/bench_int4.py [--rounds 5] [--threads 1 2] [--rows 1 2 4]

Kernels: torch's ``_weight_int4pack_mm_for_cpu``, pagedlm's ``int4_mm`` with float activations
(codes converted to float, FMA) and with int8 activations (vpmaddubsw / vpdpbusd), over the 30
layers' int4 projections (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down 576x1536:
random weights of the real shapes, 30 copies each so they stream from memory as in a real step),
and the int8 output head (49152x576): torch's ``_weight_int8pack_mm`` and pagedlm's ``int8_mm`` (float or
int8 activations).
Rounds alternate the kernels (a busy machine slows all alike); the best round of each is kept.
GB/s counts the bytes each kernel reads: its packed weights and scales.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_decode import cpu_flags  # noqa: E402
from benchmarks.common import machine, measure_bandwidth  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30


def int4_sets():
    from pagedlm import kernels
    from pagedlm.model.layers.quant import GROUP, pack_int4, tile_int4_scales

    ops = kernels.ops()
    if ops is None:
        raise SystemExit("pagedlm's kernels are not available here (no g++?)")
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
            s, z = torch.rand(n, k // GROUP) * 0.01, torch.randn(n, k // GROUP) * 0.01
            tpack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            # Ours with float16 scales and mins, as the shipped GGUF's Q4_1 blocks repack (exactly).
            layers.append((k, tpack, torch.stack([s, z], -1).transpose(0, 1).contiguous(), pack_int4(codes),
                           tile_int4_scales(s.half()), tile_int4_scales((z - 8 * s).half()), n))
    nbytes = sum(p.numel() + 2 * s.numel() * 2 for _, _, _, p, s, _, _ in layers)  # ours (torch's: float32 scales)

    def torch_int4(xs):
        for k, tp, sz, *_ in layers:
            torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], tp, GROUP, sz)

    def ours(int8_act):
        def run(xs):
            for k, _, _, p, s, m, n in layers:
                ops.int4_mm(xs[k], p, s, m, int8_act, n)
        return run

    head_q = torch.randint(-127, 128, (49152, 576), dtype=torch.int8)
    head_s = torch.rand(49152) * 0.01
    head_bytes = head_q.numel() + head_s.numel() * 4
    int4 = {"torch int4": torch_int4, "pagedlm int4, float act": ours(False), "pagedlm int4, int8 act": ours(True)}
    head = {"torch int8 head": lambda xs: torch.ops.aten._weight_int8pack_mm(xs[576], head_q, head_s),
            "pagedlm int8 head, float act": lambda xs: ops.int8_mm(xs[576], head_q, head_s, False),
            "pagedlm int8 head, int8 act": lambda xs: ops.int8_mm(xs[576], head_q, head_s, True)}
    return int4, nbytes, head, head_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    int4, nbytes, head, head_bytes = int4_sets()
    runs = [(name, fn, nbytes) for name, fn in int4.items()] + [(name, fn, head_bytes) for name, fn in head.items()]
    best: dict[tuple, float] = {}
    bw = 0.0
    with torch.inference_mode():
        for _ in range(args.rounds):
            for th in args.threads:
                torch.set_num_threads(th)
                bw = max(bw, measure_bandwidth(256 << 20, repeats=2))
                for rows in args.rows:
                    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
                    for name, fn, _ in runs:
                        fn(xs)
                        t = time.perf_counter()
                        fn(xs)
                        dt = time.perf_counter() - t
                        key = (name, th, rows)
                        best[key] = min(best.get(key, float("inf")), dt)
    print(f"# {machine()}; CPU flags: {cpu_flags()}; copy bandwidth {bw:.1f} GB/s (best, read + write)")
    print(f"# int4 projections: {nbytes / 1e6:.1f} MB packed + scales; int8 head: {head_bytes / 1e6:.1f} MB")
    print("\n| kernel | threads | rows | ms | GB/s read | % of copy bandwidth |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, nb in runs:
        for th in args.threads:
            for rows in args.rows:
                dt = best[(name, th, rows)]
                print(f"| {name} | {th} | {rows} | {dt * 1e3:.2f} | {nb / dt / 1e9:.1f} | {100 * nb / dt / 1e9 / bw:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
