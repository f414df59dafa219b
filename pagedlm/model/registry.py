"""Architecture name -> model class, and building + loading a model from a path."""

from __future__ import annotations

import os

import torch
from torch import nn

from pagedlm.config import RUNNABLE_ARCHITECTURES, ModelConfig, UnsupportedArchitectureError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a name. "auto": bfloat16 on CUDA and on CPUs with native bf16 matrix
    instructions, float32 elsewhere (on AVX2-only CPUs bf16 GEMM is emulated and several times
    slower than float32; see pagedlm.model.layers.matmul)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; supported: auto, float32, bfloat16, float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        from pagedlm.model.layers.matmul import cpu_has_native_bf16

        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: auto, float32, bfloat16, float16")
    return DTYPES[dtype.lower()]


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture not in RUNNABLE_ARCHITECTURES:
        raise UnsupportedArchitectureError(cfg.architecture)
    if cfg.family == "gpt2":
        from pagedlm.model.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    from pagedlm.model.llama import LlamaForCausalLM

    return LlamaForCausalLM


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu", **stage) -> nn.Module:
    """Build with uninitialised weights (torch.empty) in the target dtype: loading fills them.
    Where the hardware computes bf16 slowly, linear and embedding weights are bf16 and the rest
    fp32 (``matmul.split_dtype``)."""
    from pagedlm.model.layers.linear import LinearBase, VocabParallelEmbedding
    from pagedlm.model.layers.matmul import split_dtype

    weight_dtype, compute_dtype = split_dtype(dtype, device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device(device):
            model = model_class(cfg)(cfg, **stage)
    finally:
        torch.set_default_dtype(prev)
    # Non-persistent float32 buffers (rope frequencies) stay float32.
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            mod.inv_freq = mod.inv_freq.float()
        if weight_dtype != compute_dtype and isinstance(mod, (LinearBase, VocabParallelEmbedding)):
            mod.weight.data = mod.weight.data.to(weight_dtype)  # same Parameter: keeps its weight_loader
            if isinstance(mod, VocabParallelEmbedding):
                mod.out_dtype = compute_dtype
    return model.eval()


def load_model(path: str, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
               **stage) -> nn.Module:
    from pagedlm.loader.weights import iter_weights, load_weights

    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    model = build_model(cfg, dtype, device, **stage)
    load_weights(model, iter_weights(path, cfg))
    return model
