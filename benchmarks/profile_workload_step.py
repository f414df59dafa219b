"""Where a decode step of the offline throughput workload goes (``bench_throughput.py``'s 48
mixed requests, default settings, compiled buckets warm): the requests are prefilled and decoded
for ``--skip`` steps, then ``--steps`` steps are timed and then profiled (torch profiler, self CPU
time per op, ms a step). ``--prefill``: the first step instead (the first 2048 prompt tokens of
the workload, eager), timed alone and then profiled on a second engine state of the same kind.

    python benchmarks/profile_workload_step.py [--requests 48] [--skip 30] [--steps 10] [--prefill]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from torch.profiler import ProfilerActivity, profile

sys.path.append(__file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--skip", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prefill", action="store_true", help="profile the first (prefill) step instead")
    ap.add_argument("--top", type=int, default=8, help="ops to list")
    args = ap.parse_args()
    from pagedlm.bench import BenchConfig, make_workload, run_workload
    from pagedlm.engine.engine import EngineConfig, LLMEngine, default_model_path
    from pagedlm.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=default_model_path(), max_num_seqs=args.requests, max_num_batched_tokens=2048))
    work = make_workload(BenchConfig(num_requests=args.requests), eng.model_config.vocab_size)
    eng.warmup()
    if args.prefill:
        return profile_prefill(eng, work, args.top)
    run_workload(eng, [(w[0][:16], 4) for w in work[:4]], tag="warm")
    for i, (ids, _) in enumerate(work):  # long enough that every request is still decoding
        eng.add_request(f"r{i}", None, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True),
                        prompt_token_ids=ids)
    for _ in range(args.skip):
        eng.step()
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    print(f"{args.requests} rows: {(time.perf_counter() - t) / args.steps * 1e3:.1f} ms a step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            eng.step()
    by_op: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total
    for k, v in by_op.most_common(args.top):
        print(f"  {v / args.steps / 1e3:8.2f} ms  {k}")
    for i in range(args.requests):
        eng.abort_request(f"r{i}")
    return 0


def profile_prefill(eng, work, top: int) -> int:
    """The workload's first step (its first 2048 prompt tokens), twice: timed, then profiled.
    Prompts of the second round are shifted by one token, so the prefix cache holds none of them."""
    from pagedlm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = eng.model_config.vocab_size
    for rnd in range(2):
        for i, (ids, _) in enumerate(work):
            eng.add_request(f"p{rnd}-{i}", None, params, prompt_token_ids=[(t + rnd) % vocab for t in ids])
        t = time.perf_counter()
        if rnd == 0:
            eng.step()
            print(f"prefill step: {(time.perf_counter() - t) * 1e3:.0f} ms")
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                eng.step()
            by_op: collections.Counter = collections.Counter()
            for e in prof.key_averages():
                by_op[e.key] += e.self_cpu_time_total
            for k, v in by_op.most_common(top):
                print(f"  {v / 1e3:8.2f} ms  {k}")
        while eng.has_unfinished_requests():  # the rest of the prompts (one token each)
            eng.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
