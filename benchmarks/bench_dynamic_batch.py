"""One package with a dynamic batch dimension against one package per bucket (issue 22, "fewer,
cheaper compiles"): compile time of each choice, then the step time of every bucket through
each, and how far apart their logits are (bit for bit in float32; in bfloat16 inductor may
round a fused reduction differently once the batch size is symbolic).

    python benchmarks/bench_dynamic_batch.py [--buckets 16 32 64] [--model PATH] [--rounds 3]
                                             [--dense-min-rows N] [--dtype float32]

SmolLM2 (``auto``) by default, loaded as the engine loads it (its measured crossovers decide
each bucket's product paths; the buckets given must agree on them, as a group does in
``engine/aot.py``; ``--dense-min-rows`` sets the crossover instead). Packages are built in this process with every core (the builder process
uses one, at idle priority) into a temporary folder; steps run on rows of ``--context`` tokens
(each row its own blocks, the cache filled with N(0, 0.5) first), best of ``--rounds`` x 10
steps, alternating the two packages.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dense-min-rows", type=int, default=None, help="the dense crossover (default: measured)")
    args = ap.parse_args()
    from pagedlm import LLM
    from pagedlm.engine import aot

    buckets = sorted(args.buckets)
    extra = {} if args.dense_min_rows is None else {"extra": {"dense_min_rows": args.dense_min_rows}}
    llm = LLM(args.model, max_num_seqs=buckets[-1], enforce_eager=True, dtype=args.dtype, **extra)
    runner = llm.engine.runner
    model, caches, bs = runner.model, runner.kv_caches, runner.block_size
    settings = {b: aot._settings(model, b) for b in buckets}
    if any(settings[b] != settings[buckets[0]] for b in buckets):
        raise SystemExit(f"buckets {buckets} take different product paths on this machine (a measured "
                         "crossover between them): give buckets on one side of it")
    tensors = aot.step_tensors(model)[1]
    torch.manual_seed(0)
    for c in caches:
        c.normal_(0, 0.5)
    out = Path(tempfile.mkdtemp(prefix="pagedlm-dynbatch-"))
    compile_s, packages = {}, {}
    for rows in [(b, b) for b in buckets] + [(buckets[0], buckets[-1])]:
        path = out / f"b{rows[0]}-{rows[1]}.pt2"
        t = time.perf_counter()
        aot.build_package(model, rows, bs, caches, path)
        compile_s[rows] = time.perf_counter() - t
        print(f"built batch {rows[0]}..{rows[1]} in {compile_s[rows]:.1f} s", flush=True)
        packages[rows] = path

    width = -(-args.context // bs)
    if caches[0].shape[1] <= buckets[-1] * -(-args.context // bs):
        raise SystemExit(f"the KV cache holds {caches[0].shape[1]} blocks: too few for {buckets[-1]} rows of "
                         f"{args.context} tokens")
    dyn_rows = (buckets[0], buckets[-1])
    print(f"\ncontext {args.context}; {torch.get_num_threads()} threads\n")
    print(f"| bucket | one package per bucket: compile s | step ms | dynamic {dyn_rows[0]}-{dyn_rows[1]} "
          "package: step ms | static / dynamic | logits max abs diff | same argmax |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in buckets:
        class Buf:
            pass

        buf = Buf()
        g = torch.Generator().manual_seed(b)
        buf.ids = torch.randint(0, 1000, (b,), generator=g)
        buf.pos = torch.full((b,), args.context - 1, dtype=torch.long)
        buf.lens = torch.full((b,), args.context, dtype=torch.long)
        # Row i reads its own blocks and writes its own last slot (rows writing one slot would
        # race, and the winner may differ from call to call).
        tables = torch.arange(b * width, dtype=torch.long).view(b, width)
        buf.slots = tables[:, -1] * bs + (args.context - 1) % bs
        steps = {"static": aot.PackagedStep(packages[(b, b)], tensors, caches, buf),
                 "dynamic": aot.PackagedStep(packages[dyn_rows], tensors, caches, buf)}
        best, logits = {}, {}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for _ in range(2):
                    logits[name] = step(tables).clone()
                t = time.perf_counter()
                for _ in range(10):
                    step(tables)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t) / 10)
        diff = (logits["static"] - logits["dynamic"]).abs().max().item()
        agree = (logits["static"].argmax(-1) == logits["dynamic"].argmax(-1)).sum().item()
        print(f"| {b} | {compile_s[(b, b)]:.1f} | {best['static'] * 1e3:.2f} | {best['dynamic'] * 1e3:.2f} | "
              f"{best['static'] / best['dynamic']:.2f}x | {diff:.3g} | {agree}/{b} rows |", flush=True)
    total = sum(compile_s[(b, b)] for b in buckets)
    print(f"\ncompile: {len(buckets)} packages {total:.1f} s; one dynamic package {compile_s[dyn_rows]:.1f} s "
          f"({total / compile_s[dyn_rows]:.2f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
