"""The one place that picks how a linear layer multiplies, by hardware.

On CPUs without native bf16 matrix instructions (no AVX512-BF16 / AMX; e.g. AVX2-only parts),
PyTorch's bf16 GEMM is emulated and runs at ~15 GFLOP/s whatever the batch, while fp32 GEMM
reaches ~100 GFLOP/s on the same 2 cores. A bf16 GEMV (one row: batch-1 decode) is still ~20%
faster than fp32, because it is memory-bound and bf16 weights are half the bytes. So bf16
weights are kept (half the memory) and multiplied in bf16 for a few rows, but upcast to fp32 on
the fly for many rows (prefill, batched decode), where converting the weight costs far less
than the emulated GEMM. Measured with benchmarks/bench_matmul.py; see docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Rows from which an upcast pays off on a CPU without native bf16 (measured: 4 rows no, 16 yes).
UPCAST_MIN_ROWS = 8


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return True  # unknown platform: trust PyTorch's own kernels
    return "avx512_bf16" in flags or "amx_bf16" in flags


_upcast_override: bool | None = None


def set_bf16_upcast(enabled: bool | None) -> None:
    """Force the upcast on or off (None: decide by the CPU). For tests and benchmarks."""
    global _upcast_override
    _upcast_override = enabled


def upcast_enabled() -> bool:
    return (not cpu_has_native_bf16()) if _upcast_override is None else _upcast_override


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] >= UPCAST_MIN_ROWS and upcast_enabled()):
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)
    return F.linear(x, weight, bias)
