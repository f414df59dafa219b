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
