"""Where a batch-1 decode step of SmolLM2 (``auto``) goes: torch profiler, self CPU time per token
by op class (int4 matmuls, the int8 head, attention, inductor's fused loops, ...).

    python benchmarks/profile_step.py [--eager] [--tokens 64]

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


def batch1_decode(eager: bool, tokens: int):
    """SmolLM2 as shipped for batch-1 greedy decode (compiled first unless eager): (llm, prompt,
    sampling params of ``tokens`` tokens after a 16-token random prompt)."""
    from pagedlm import LLM, SamplingParams
    from pagedlm.engine.engine import default_model_path

    llm = LLM(default_model_path(), kv_cache_memory=256 << 20, enable_prefix_caching=False, max_num_seqs=1,
              enforce_eager=eager)
    if not eager:
        llm.engine.warmup([1])
    return (llm, {"prompt_token_ids": random_prompt(16)},
            SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eager", action="store_true", help="profile the eager step (default: compiled)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    llm, prompt, p = batch1_decode(args.eager, args.tokens)
    best = max(llm.generate(prompt, p, use_tqdm=False)[0].metrics.decode_tokens_per_s for _ in range(3))
    print(f"decode {best:.1f} tok/s (best of 3, {args.tokens} tokens)")
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
