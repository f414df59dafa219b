"""Architecture name -> model class, and building + loading a model from a path."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedlm.config import ModelConfig, UnsupportedArchitectureError
from pagedlm.model.layers.quant import (
    QuantConfig,
    finalize_quantization,
    most_precise,
    validate_quantization,
)
from pagedlm.model.parallel import ParallelState, parallel_scope

if TYPE_CHECKING:
    from pagedlm.loader.source import ModelSource

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


# ModelConfig.family -> "module:class" of the model code that runs it.
MODEL_CLASSES = {
    "llama": "pagedlm.model.llama:LlamaForCausalLM",
    "deepseek": "pagedlm.model.llama:LlamaForCausalLM",  # the Llama code with MLA and DeepSeek's router
    "gpt2": "pagedlm.model.gpt2:GPT2LMHeadModel",
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if not cfg.runnable:
        raise UnsupportedArchitectureError(cfg.architecture)
    import importlib

    module, name = MODEL_CLASSES[cfg.family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                quant: QuantConfig | None = None, parallel: ParallelState | None = None,
                trainable: bool = False, **stage) -> nn.Module:
    """Build with uninitialised weights (torch.empty): loading fills them. ``trainable``: instead,
    the standard initialisation for pretraining, every parameter requiring grad, in train mode
    (``pagedlm.train.model``; the same modules, attention through the causal backend). Linear and embedding
    weights are created in the weight dtype, the rest in the compute dtype (``matmul.split_dtype``:
    bf16 weights with fp32 compute where the hardware computes bf16 slowly). Each linear layer gets
    its ``quant_method`` (``layers/quant.py``) by its checkpoint names. ``parallel``: the shard of
    each layer this process builds (``pagedlm.model.parallel``; None: one process)."""
    from pagedlm.model.layers.matmul import split_dtype
    from pagedlm.model.layers.quant import weight_dtype_scope

    weight_dtype, compute_dtype = split_dtype(dtype, device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device(device), weight_dtype_scope(weight_dtype), parallel_scope(parallel):
            model = model_class(cfg)(cfg, **stage)
    finally:
        torch.set_default_dtype(prev)
    # Non-persistent float32 buffers (rope frequencies) stay float32.
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            mod.inv_freq = mod.inv_freq.float()
    assign_quant_methods(model, quant or QuantConfig(), torch.device(device))
    if trainable:
        from pagedlm.train.model import init_weights, make_trainable

        init_weights(model)
        return make_trainable(model)
    return model.eval()


def assign_quant_methods(model: nn.Module, quant: QuantConfig, device: torch.device) -> None:
    """Give every linear layer, the output head and MoE experts their method, chosen from the
    checkpoint names they load (a fused layer: all of its parts' names)."""
    from pagedlm.model.layers.linear import LinearBase, ParallelLMHead, VocabParallelEmbedding
    from pagedlm.model.layers.moe import FusedExperts

    parts: dict[str, list[str]] = {}  # fused module name -> checkpoint module names
    for ckpt, (fused, _) in getattr(model, "packed_modules_mapping", {}).items():
        parts.setdefault(fused, []).append(ckpt)
    tied_head = None
    if model.config.tie_word_embeddings:
        tied_head = next((m for m in model.modules() if isinstance(m, VocabParallelEmbedding)), None)
    for name, mod in model.named_modules():
        prefix, _, last = name.rpartition(".")
        if isinstance(mod, LinearBase):
            names = [f"{prefix}.{c}.weight" for c in parts.get(last, [last])]
            mod.quant_method = quant.method(quant.class_for(names, *mod.weight.shape, device))
        elif isinstance(mod, ParallelLMHead) or mod is tied_head:
            mod.head_method = quant.method(quant.class_for([f"{name}.weight"], *mod.weight.shape, device))
        elif isinstance(mod, FusedExperts) and quant.requested in ("int8", "int4"):
            # Every expert matrix must suit the kind (GGUF MoE files are not loaded: no auto here).
            shapes = [mod.gate_up_proj.shape[1:], mod.down_proj.shape[1:]]
            kinds = {quant.class_for([], *shape, device) for shape in shapes}
            mod.quant_kind = most_precise(kinds)


def load_model(path: str | ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
               quantization: str = "none", dense_min_rows: int | None = None,
               parallel: ParallelState | None = None, save_prepared: bool = False, prepared_rows="same",
               **stage) -> nn.Module:
    """Build, load strictly, then quantize as ``quantization`` says (auto | none | int8 | int4;
    auto keeps a GGUF file's precision class per tensor and is none for HF directories).
    ``path``: a model path or an open ``ModelSource`` (whose reader is then reused).

    A single-process CPU model is taken from the prepared-model cache when it is there
    (``loader/prepared.py``); ``save_prepared`` writes it there after loading it. ``prepared_rows``
    keys the entry with another ``dense_min_rows`` than the one used (the builder loads with the
    crossover the engine measured: its entry is what an engine that measures would load)."""
    from pagedlm.loader import prepared
    from pagedlm.loader.source import ModelSource
    from pagedlm.loader.weights import load_weights
    from pagedlm.model.layers.matmul import split_dtype

    quantization = validate_quantization(quantization)
    if not isinstance(path, ModelSource) and not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    source = ModelSource.open(path)
    entry = None
    if parallel is None and not stage:
        rows = dense_min_rows if prepared_rows == "same" else prepared_rows
        entry = prepared.entry(source.weights_path, cfg, dtype, device, quantization, rows)
        model = prepared.load(entry)
        if model is not None:
            return model
    types = source.tensor_types(cfg) if quantization == "auto" else {}
    quant = QuantConfig(quantization, types, dense_min_rows)
    model = build_model(cfg, dtype, device, quant, parallel, **stage)
    load_weights(model, source.weights(cfg, int4_codes=quantization in ("auto", "int4")))
    model.quant_counts = finalize_quantization(model, split_dtype(dtype, device)[1], quant)
    if save_prepared:
        prepared.save(model, entry)
    return model
