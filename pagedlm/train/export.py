"""A trained (or merged) model written as an HF directory: config.json, model.safetensors in the
checkpoint's own names (fused q/k/v and gate/up split back), the tokenizer. The engine, transformers
and every other HF tool load it as they load a downloaded model."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """pagedlm's parameters under their checkpoint names (Llama family)."""
    from pagedlm.train.lora import linear_modules

    if model.config.family != "llama":
        raise ValueError(f"writing an HF directory supports the Llama family; {model.config.architecture} is not")
    split: dict[str, list[tuple[str, int, int]]] = {}  # our layer -> [(hf module, first row, rows)]
    for hf, (layer, parts) in linear_modules(model).items():
        (start, rows), = parts.values()
        split.setdefault(layer, []).append((hf, start, rows))
    out = {}
    for name, p in model.named_parameters():
        if ".lora." in name:
            continue
        layer, _, kind = name.rpartition(".")
        t = p.detach().contiguous()
        if layer in split and len(split[layer]) > 1:
            for hf, start, rows in split[layer]:
                out[f"{hf}.{kind}"] = t[start:start + rows].clone()
        else:
            out[name] = t.clone()
    return out


def hf_config_for(model_path: str, weights_path: str) -> dict[str, Any]:
    """The base model's config.json (an HF directory's own; a GGUF file's, through transformers)."""
    from transformers import AutoConfig

    if weights_path.endswith(".gguf"):
        cfg = AutoConfig.from_pretrained(os.path.dirname(weights_path) or ".", gguf_file=os.path.basename(weights_path))
    else:
        cfg = AutoConfig.from_pretrained(model_path)
    d = cfg.to_dict()
    if not d.get("architectures"):
        d["architectures"] = [{"llama": "LlamaForCausalLM"}.get(d.get("model_type"), d.get("model_type"))]
    for k in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        d.pop(k, None)
    return d


def save_hf(model: nn.Module, path: str, config: dict[str, Any], tokenizer=None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.float() if v.dtype != torch.float32 else v for k, v in hf_state_dict(model).items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "torch_dtype": "float32"}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
