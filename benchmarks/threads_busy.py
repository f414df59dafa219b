"""Batch-1 compiled decode at 2 and 1 threads, alternating (docs/benchmarks.md, "Threads when
another process is busy"). Usage: python benchmarks/threads_busy.py LABEL"""

import sys
import time

import torch

from pagedlm import LLM, SamplingParams

llm = LLM()
llm.engine.runner.governor = None  # set the count by hand (the governor would choose it)
if llm.engine.runner.compiled is not None:
    llm.engine.runner.compiled.governor = None
sp = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
llm.generate(["warm up"], sp, use_tqdm=False)
for th in (2, 1, 2, 1):
    torch.set_num_threads(th)
    t = time.perf_counter()
    llm.generate(["The capital of France is"], sp, use_tqdm=False)
    dt = time.perf_counter() - t
    print(f"threads {th}: {48/dt:.1f} tok/s ({sys.argv[1] if len(sys.argv) > 1 else ''})", flush=True)
