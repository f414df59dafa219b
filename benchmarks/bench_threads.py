"""Batch-1 decode of SmolLM2 (``auto``), 1 vs 2 torch threads (every kernel follows torch's thread
count), alternating rounds in one process so a changing machine load hits both alike.

    python benchmarks/bench_threads.py [--eager] [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])
# The sibling script (this directory is sys.path[0]): with PYTHONPATH at another checkout, whose
# benchmarks package may predate it, this file still runs.
from profile_step import batch1_decode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eager", action="store_true", help="the eager step (default: compiled)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    llm, prompt, p = batch1_decode(args.eager, args.tokens)
    res: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for th in res:
            torch.set_num_threads(th)
            res[th].append(llm.generate(prompt, p, use_tqdm=False)[0].metrics.decode_tokens_per_s)
    for th, v in res.items():
        print(f"threads {th}: decode tok/s per round {[round(x, 1) for x in v]}, median {statistics.median(v):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
