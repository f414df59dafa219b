"""Host cost per generated token of the engine's token path without the model: append a token
(the core's stop checks, the output processor's detokenizing, stop strings, logprobs) and build
the step's RequestOutput (holdback, deltas). This is what every decoded token pays on top of the
forward pass and the sampler; a change to the core / output-processor seam should not grow it.

    PYTHONPATH=$PWD python -m benchmarks.bench_output_path [--model PATH] [--tokens 2000] [--repeats 7]

Runs on SmolLM2's tokenizer by default (the model is loaded eagerly only to build the engine).
The token stream is a fixed English text, encoded once and cycled. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagedlm import SamplingParams
from pagedlm.engine.engine import EngineConfig, LLMEngine

TEXT = ("The paged KV cache stores keys and values in fixed-size blocks, so sequences of any length "
        "share one pool without fragmentation. Continuous batching admits new requests at every step, "
        "and prefix caching lets requests that share a system prompt reuse its blocks.\n\n")

CASES = {
    "plain": {},
    "stop strings": {"stop": ["</answer>", "\n\n\n"]},
    "logprobs 5 + stop": {"stop": ["</answer>"], "logprobs": 5},
}


def _outputs(engine: LLMEngine, req) -> list:
    """The step-end output building of whichever tree is on the path (``_outputs`` since the
    core / output-processor split, ``_make_output`` before it)."""
    if hasattr(engine, "_outputs"):
        return engine._outputs({req.request_id: req})
    return [engine._make_output(req)]


def per_token_us(engine: LLMEngine, stream: list[int], params: SamplingParams, rid: str) -> float:
    engine.add_request(rid, None, params, prompt_token_ids=stream[:16])
    req = engine.requests[rid]
    seq = req.seqs[0]
    lp = (-0.5, 1) if params.logprobs is not None else None
    top = ([stream[0], stream[1]], [-0.5, -1.5]) if params.logprobs else None
    now = time.perf_counter()
    t0 = time.perf_counter()
    for tok in stream:
        engine._append_token(seq, tok, lp, top, now)
        _outputs(engine, req)
    dt = time.perf_counter() - t0
    engine.abort_request(rid)
    return dt / len(stream) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model whose tokenizer is used (default: SmolLM2 GGUF)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    # Room for the whole stream: no length stop ends a run early.
    engine = LLMEngine(EngineConfig(model=args.model, enforce_eager=True, num_kv_blocks=args.tokens // 16 + 8,
                                    max_num_seqs=1))
    ids = engine.encode(TEXT)
    stream = (ids * (args.tokens // len(ids) + 1))[: args.tokens]
    print(f"{args.tokens} tokens per run, best and median of {args.repeats} runs (us per token)")
    for name, kw in CASES.items():
        params = SamplingParams(max_tokens=None, ignore_eos=True, **kw)
        runs = [per_token_us(engine, stream, params, f"{name}-{i}") for i in range(args.repeats)]
        print(f"{name:20s} best {min(runs):7.1f}  median {statistics.median(runs):7.1f}")


if __name__ == "__main__":
    main()
