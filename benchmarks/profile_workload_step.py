"""Where a decode step of the offline throughput workload goes (``bench_throughput.py``'s 48
mixed requests, default settings, compiled buckets warm): the requests are prefilled and decoded
for ``--skip`` steps, then ``--steps`` steps are timed and then profiled (torch profiler, self CPU
time per op, ms a step).

    python benchmarks/profile_workload_step.py [--requests 48] [--skip 30] [--steps 10]
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
    args = ap.parse_args()
    from pagedlm.bench import BenchConfig, make_workload, run_workload
    from pagedlm.engine.engine import EngineConfig, LLMEngine, default_model_path
    from pagedlm.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=default_model_path(), max_num_seqs=args.requests, max_num_batched_tokens=2048))
    work = make_workload(BenchConfig(num_requests=args.requests), eng.model_config.vocab_size)
    eng.warmup()
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
    for k, v in by_op.most_common(8):
        print(f"  {v / args.steps / 1e3:8.2f} ms  {k}")
    for i in range(args.requests):
        eng.abort_request(f"r{i}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
