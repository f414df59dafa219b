"""Where a decode step of SmolLM2 (``auto``) goes: torch profiler, self CPU time per token (per
step with ``--rows``) by op class (int4 matmuls, the int8 head, attention, inductor's fused
loops, ...).

    python benchmarks/profile_step.py [--eager] [--tokens 64] [--rows 1] [--prompt-len 16]

Run it from two checkouts (``PYTHONPATH=<tree>``) for a before / after table.
"""

from __future__ import annotations

import argparse
import collections
import sys

from torch.profiler import ProfilerActivity, profile

# Appended, not prepended: PYTHONPATH picks which checkout's pagedlm is profiled.
sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import random_prompt  # noqa: E402


def op_class(name: str) -> str:
    low = name.lower()
    if "int4" in low:
        return "int4 matmuls"
    if "int8" in low:
        return "int8 head"
    if "attention" in low or "sdpa" in low or "flash" in low:
        return "attention"
    if name.startswith(("aten::mm", "aten::addmm", "aten::linear")):
        return "dense matmul"
    if "cpp_fused" in name or "graph" in low or "compiled" in low:
        return "inductor fused (norms, rope, residual, ...)"
    return name


def batch1_decode(eager: bool, tokens: int, rows: int = 1, prompt_len: int = 16):
    """SmolLM2 as shipped for greedy decode of ``rows`` sequences at once (compiled first unless
    eager): (llm, prompts, sampling params of ``tokens`` tokens after ``prompt_len``-token random
    prompts)."""
    from pagedlm import LLM, SamplingParams
    from pagedlm.engine.compiled import bucket_sizes
    from pagedlm.engine.engine import default_model_path

    llm = LLM(default_model_path(), kv_cache_memory=max(256, rows * (prompt_len + tokens) // 8) << 20,
              enable_prefix_caching=False, max_num_seqs=rows, enforce_eager=eager)
    if not eager:
        llm.engine.warmup(bucket_sizes(rows)[-1:])
    prompts = [{"prompt_token_ids": random_prompt(prompt_len, seed=i)} for i in range(rows)]
    return (llm, prompts if rows > 1 else prompts[0],
            SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eager", action="store_true", help="profile the eager step (default: compiled)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1, help="sequences decoded together (times are then per step)")
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()
    llm, prompt, p = batch1_decode(args.eager, args.tokens, args.rows, args.prompt_len)
    best = max(llm.generate(prompt, p, use_tqdm=False)[0].metrics.decode_tokens_per_s for _ in range(3))
    print(f"decode {best:.1f} tok/s per sequence (best of 3, {args.tokens} tokens, {args.rows} rows)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        o = llm.generate(prompt, p, use_tqdm=False)[0]
    n = o.metrics.num_generated_tokens
    by_class: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            by_class[op_class(e.key)] += e.self_cpu_time_total
    print(f"{n} tokens, decode wall {o.metrics.decode_time * 1e3 / n:.2f} ms/token; self CPU time per token:")
    for k, v in by_class.most_common(14):
        print(f"  {v / n / 1e3:8.3f} ms  {k}")
    print(f"  {sum(by_class.values()) / n / 1e3:8.3f} ms  total (all threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
