"""Bytes the engine core pickles per step for the server (engine/core_process.py): its message of
one step's outputs, as ``multiprocessing.connection`` would send it, for N concurrent requests.

No timing: it steps an in-process ``LLMEngine`` on the tiny random Llama of the tests (or
``--model``) and pickles what the core process would send after each step: the cumulative
``RequestOutput``s (``--kind outputs``: the thread engine's outputs, which the core sent before
issue 23's deltas) or the per-step deltas the core sends now (``--kind deltas``).

    python -m benchmarks.core_message_bytes [--requests 32] [--tokens 64] [--logprobs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from multiprocessing.reduction import ForkingPickler

os.environ.setdefault("PAGEDLM_ENFORCE_EAGER", "1")


def measure(model: str, kind: str, requests: int, tokens: int, logprobs: int | None) -> list[int]:
    from pagedlm import SamplingParams
    from pagedlm.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model, dtype="float32", max_num_seqs=max(requests, 1), seed=0,
                                    kv_cache_memory=64 << 20))
    if kind == "deltas":
        engine.emit_deltas()
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=logprobs)
    for i in range(requests):
        engine.add_request(f"cmpl-{i:08x}-0", f"The quick brown fox number {i} jumps over the lazy dog", params)
    sizes = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs:
            sizes.append(len(ForkingPickler.dumps((kind, outs))))
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the tests' tiny random Llama, built in a temp dir")
    ap.add_argument("--kind", choices=["outputs", "deltas", "both"], default="both")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--logprobs", type=int, default=None)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from tests.helpers import save_tiny

        model = save_tiny("llama", tempfile.mkdtemp(prefix="pagedlm-tiny-"))
    kinds = ["outputs", "deltas"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        sizes = measure(model, kind, args.requests, args.tokens, args.logprobs)
        print(f"{kind:8s} {args.requests} requests x {args.tokens} tokens, logprobs={args.logprobs}: "
              f"{len(sizes)} steps, bytes/step mean {statistics.mean(sizes):,.0f}, median "
              f"{statistics.median(sizes):,.0f}, max {max(sizes):,}; total {sum(sizes):,}")


if __name__ == "__main__":
    main()
