"""What a decode row costs: the compiled decode step of SmolLM2 per batch bucket, and the int8
output head alone per row count, with pagedlm's kernels (int8_mm for the head, int4_mm for the
int4 projections) and with torch's.

    python benchmarks/bench_rows.py [--context 128] [--rounds 2]

The speculative policy's cost model is exactly this curve: verifying k proposals runs a step of
1 + k rows, so what matters is how much more a 2-, 3- or 4-row step costs than a 1-row one.
Each setting runs in its own process (``PAGEDLM_KERNELS=0`` turns both kernels off); the two
alternate ``--rounds`` times and the fastest time of each is kept, so a busy machine slows both
alike. Steps run on padding rows over ``--context`` tokens of the scratch block (the attention
reads as much as for a real sequence of that length).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_decode import cpu_flags  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def _best(fn, reps: int = 7, inner: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def child(context: int) -> dict:
    import torch

    from pagedlm import LLM
    from pagedlm.engine.compiled import DecodeBatch
    from pagedlm.engine.engine import default_model_path

    llm = LLM(default_model_path(), kv_cache_memory=256 << 20, max_num_seqs=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 7})
    llm.engine.warmup([1])
    c = llm.engine.runner.compiled
    width = max(2, -(-context // c.block_size))
    steps = {}
    with torch.no_grad():
        for b in c.sizes:
            buf = c.buffers[b]
            buf.tables[: b * width].fill_(c.scratch_block)
            buf.lens.fill_(width * c.block_size)
            steps[b] = _best(lambda b=b: c.execute(DecodeBatch(None, b, width, None, 0))) * 1e3
    vocab = llm.engine.model_config.vocab_size
    head = next(m.head_method.qweight for m in llm.engine.runner.model.modules()
                if getattr(getattr(m, "head_method", None), "qweight", None) is not None
                and m.head_method.qweight.packed.shape[0] == vocab)
    rows = {}
    with torch.inference_mode():
        for m in (1, 2, 3, 4, 6, 8):
            x = torch.randn(m, head.packed.shape[1], dtype=llm.engine.dtype)
            rows[m] = _best(lambda x=x: head.mm(x)) * 1e3
    return {"kernel": head.kernel is not None, "steps": steps, "head": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.context)))
        return 0
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, flag in (("torch", "0"), ("pagedlm", "1")):
            env = {**os.environ, "PAGEDLM_KERNELS": flag}
            out = subprocess.run([sys.executable, __file__, "--child", "--context", str(args.context)],
                                 env=env, capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            if name == "pagedlm" and not got["kernel"]:
                raise SystemExit("pagedlm's int8 kernel is not available here (no g++?)")
            prev = best.setdefault(name, got)
            for part in ("steps", "head"):
                for k, v in got[part].items():
                    prev[part][k] = min(prev[part][k], v)
    print(f"# {machine()}; CPU flags: {cpu_flags()}; SmolLM2-135M Q4_1, quantization auto, bf16, context {args.context}")
    print("\n| rows | step, torch kernels (ms) | step, pagedlm kernels (ms) | x 1-row step (torch) | x 1-row step (pagedlm) |")
    print("|---:|---:|---:|---:|---:|")
    t, p = best["torch"]["steps"], best["pagedlm"]["steps"]
    for b in t:
        print(f"| {b} | {t[b]:.2f} | {p[b]:.2f} | {t[b] / t['1']:.2f} | {p[b] / p['1']:.2f} |")
    print("\n| rows | head, torch (ms) | head, pagedlm int8_mm (ms) |")
    print("|---:|---:|---:|")
    t, p = best["torch"]["head"], best["pagedlm"]["head"]
    for m in t:
        print(f"| {m} | {t[m]:.2f} | {p[m]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
