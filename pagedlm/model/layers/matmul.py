"""The one place that picks how a linear layer multiplies, by hardware.

On CPUs without native bf16 matrix instructions (no AVX512-BF16 / AMX; e.g. AVX2-only parts)
PyTorch emulates bf16: a bf16 GEMM runs at ~15 GFLOP/s whatever the batch (fp32: ~100 on the
same 2 cores) and every bf16 elementwise op pays a conversion. A bf16 GEMV (one row: batch-1
decode) is still the fastest way to stream the weights, because it reads half the bytes: all of
SmolLM2's decode matmuls take 17 ms in bf16 and 46 ms in fp32.

So on such CPUs ``dtype=bfloat16`` means *bf16 weights, fp32 compute* (as llama.cpp keeps
quantised weights and fp32 activations): linear and embedding weights are stored in bf16,
everything else (activations, norms, biases, the KV cache) is fp32. A linear layer multiplies
a few rows in bf16 (input rounded to bf16, output back to fp32) and many rows in fp32 with the
weight upcast on the fly (prefill, batched decode), where converting the weight costs far less
than the emulated bf16 GEMM. Measured with benchmarks/bench_matmul.py; see docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Rows from which the fp32 upcast pays off (measured on AVX2: 4 rows no, 16 yes).
UPCAST_MIN_ROWS = 8


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return True  # unknown platform: trust PyTorch's own kernels
    return "avx512_bf16" in flags or "amx_bf16" in flags


def split_dtype(dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, compute dtype) for a requested model dtype on a device."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        return torch.bfloat16, torch.float32
    return dtype, dtype


# Rows for which W @ x^T beats x @ W^T on CPU (fp32, weights streamed from memory): for a few
# rows MKL's GEMM path for F.linear is up to 2.2x slower than the transposed product (measured:
# 30 layers of SmolLM2 at 8 rows, 104 ms vs 46 ms); from ~128 rows F.linear wins. Compared, not
# looked up (``in range``): a symbolic batch size (a dynamic-batch package, engine/aot.py) then
# decides it from its bounds instead of being pinned to one size.
SMALL_BATCH_ROWS = range(2, 128)


def _cpu_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type == "cpu" and x.dim() == 2 and SMALL_BATCH_ROWS.start <= x.shape[0] < SMALL_BATCH_ROWS.stop:
        y = (weight @ x.t()).t().contiguous()  # (out, rows) -> (rows, out)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dtype == x.dtype:
        return _cpu_matmul(x, weight, bias)
    # Mixed: low-precision weights, higher-precision activations (see the module docstring).
    if x.dim() == 2 and x.shape[0] >= UPCAST_MIN_ROWS:
        return _cpu_matmul(x, weight.to(x.dtype), bias)
    y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return y if bias is None else y + bias
