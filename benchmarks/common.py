"""Shared pieces of the benchmarks: the machine's roofline numbers and a transformers loader."""

from __future__ import annotations

import os
import platform
import time

import torch


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s: best of ``repeats`` copies of a large buffer (read + write), as
    ``pagedlm bench`` measures its roofline."""
    from pagedlm.bench import copy_bandwidth_gbps

    return copy_bandwidth_gbps(nbytes, repeats)


def measure_matmul(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """Matmul GFLOP/s at (n x n) @ (n x n), best of ``repeats``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def random_prompt(length: int, seed: int = 0) -> list[int]:
    """The benchmarks' prompt: ``length`` random token ids from SmolLM2's vocabulary, seeded."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cores": os.cpu_count()}


def load_hf_gguf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype).eval()


def finish_report(report: dict, code: int, json_path: str | None, check, passed: str, name: str) -> int:
    """The end of a soak run: record the server's exit code, print and save the report, print
    every failed check (and a non-zero server exit) and ``name`` passed/FAILED. Returns the
    process's exit status (1 on any failure)."""
    import json
    import sys

    report["exit_code"] = code
    print(json.dumps(report, indent=2))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    fails = check(report) + ([f"server exit code {code}"] if code != 0 else [])
    for f in fails:
        print("FAIL:", f, file=sys.stderr)
    print(name, "FAILED" if fails else f"passed: {passed}")
    return 1 if fails else 0
