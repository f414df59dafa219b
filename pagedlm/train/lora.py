"""Trainable LoRA on pagedlm's fused linear layers, saved as a PEFT adapter the engine serves.

A targeted layer keeps its frozen weight and gets a ``LoRAParams`` child holding, per targeted
projection (q, k, v of ``qkv_proj``; gate, up of ``gate_up_proj``; the layer itself otherwise),
A (r, in) and B (rows, r), PEFT's initialisation (A Kaiming-uniform, B zero: the adapter starts
as the identity). Its ``quant_method`` becomes ``TrainLoRAMethod``: base output plus
``scale * (x @ A^T) @ B^T`` in that projection's slice of the output, all projections of a fused
layer (q/k/v, gate/up) in one pair of GEMMs. Names follow the HF modules
(``model.layers.0.self_attn.q_proj``), so the adapter is written in PEFT's layout directly.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from pagedlm.lora import LoRAManager
from pagedlm.model.layers.quant import LinearMethod

ALL_LINEAR = "all-linear"


class LoRAParams(nn.Module):
    """A and B of each targeted projection of one linear layer."""

    def __init__(self, in_features: int, parts: dict[str, tuple[int, int]], r: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.parts = parts  # HF module name -> (first output row, rows)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, (_, rows) in parts.items():
            a = torch.empty(r, in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init_lora_weights=True
            self.A[name] = nn.Parameter(a)
            self.B[name] = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device))


class TrainLoRAMethod(LinearMethod):
    """A frozen base method plus trainable low-rank deltas on some projections of the output."""

    name = "none"

    def __init__(self, base: LinearMethod, params: LoRAParams, out_features: int, scale: float,
                 dropout: float):
        self.base, self.params, self.out_features = base, params, out_features
        self.scale, self.dropout = scale, dropout
        spans = sorted(params.parts.items(), key=lambda kv: kv[1][0])
        self.order = [n for n, _ in spans]
        self.whole = len(spans) == 1 and spans[0][1] == (0, out_features)

    def process_weights_after_loading(self, layer, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.base.process_weights_after_loading(layer, weight, compute_dtype)

    def apply(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, weight, bias)
        p = self.params
        xd = nn.functional.dropout(x, self.dropout, layer.training) if self.dropout else x
        # All projections of the layer in two GEMMs: x @ [A_q; A_k; A_v]^T -> (tokens, parts * r),
        # then times B placed block-diagonally in the projections' output rows (zero rows between
        # targeted projections), added into y with the scale: y + scale * (x A^T) B^T.
        a = torch.cat([p.A[n] for n in self.order]) if len(self.order) > 1 else p.A[self.order[0]]
        b = self._b_full()
        shape = y.shape
        y2 = torch.addmm(y.reshape(-1, shape[-1]), xd.reshape(-1, xd.shape[-1]) @ a.t(), b.t(), alpha=self.scale)
        return y2.view(shape)

    def _b_full(self) -> torch.Tensor:
        """(out_features, parts * r): each projection's B in its output rows and its columns."""
        p = self.params
        if self.whole:
            return p.B[self.order[0]]
        k, r = len(self.order), p.B[self.order[0]].shape[1]
        pieces, at = [], 0
        for j, n in enumerate(self.order):
            start, rows = p.parts[n]
            if start > at:
                pieces.append(p.B[n].new_zeros(start - at, k * r))
            pieces.append(nn.functional.pad(p.B[n], (j * r, (k - 1 - j) * r)))
            at = start + rows
        if at < self.out_features:
            pieces.append(pieces[-1].new_zeros(self.out_features - at, k * r))
        return torch.cat(pieces)


def linear_modules(model: nn.Module) -> dict[str, tuple[str, dict[str, tuple[int, int]]]]:
    """HF module name (``model.layers.0.self_attn.q_proj``) -> (pagedlm layer name, {HF last name:
    (first row, rows)}) for every linear layer LoRA can target (not the output head)."""
    from pagedlm.model.layers.linear import LinearBase

    fused_parts: dict[str, list[tuple[str, object]]] = {}
    for hf, (fused, part) in getattr(model, "packed_modules_mapping", {}).items():
        fused_parts.setdefault(fused, []).append((hf, part))
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase):
            continue
        parent, _, last = name.rpartition(".")
        spans = LoRAManager._parts(mod)
        ids = LoRAManager._part_ids(mod)
        names = {part: hf for hf, part in fused_parts.get(last, [])} if last in fused_parts else {None: last}
        for part, span in zip(ids, spans):
            hf_last = names[part]
            out[f"{parent}.{hf_last}"] = (name, {hf_last: span})
    return out


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Target names (HF module last names, or "all-linear") -> the sorted last names to adapt;
    ValueError naming an unknown one."""
    available = sorted({k.rpartition(".")[2] for k in linear_modules(model)})
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"no LoRA target modules given; this model's linear layers: {', '.join(available)}")
    if ALL_LINEAR in targets:
        return available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(f"unknown LoRA target module {unknown[0]!r}; this model's linear layers: "
                         f"{', '.join(available)} (or {ALL_LINEAR})")
    return sorted(set(targets))


def add_lora(model: nn.Module, r: int, alpha: float, targets: list[str] | str = ALL_LINEAR,
             dropout: float = 0.0) -> list[str]:
    """Freeze the model and add trainable adapters; returns the targeted HF module last names."""
    if model.config.family != "llama":
        raise ValueError(f"LoRA training supports the Llama family; {model.config.architecture} is not")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    names = resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    per_layer: dict[str, dict[str, tuple[int, int]]] = {}
    for hf, (layer, parts) in linear_modules(model).items():
        last = hf.rpartition(".")[2]
        if last in names:
            per_layer.setdefault(layer, {}).update(parts)
    for layer, parts in per_layer.items():
        lin = model.get_submodule(layer)
        w = lin.weight
        lin.lora = LoRAParams(lin.in_features, parts, r, torch.float32, w.device)
        lin.quant_method = TrainLoRAMethod(lin.quant_method, lin.lora, lin.out_features, alpha / r, dropout)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names}
    return names


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's key layout: ``base_model.model.<HF module>.lora_{A,B}.weight``."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAParams):
            parent = name.rpartition(".")[0].rpartition(".")[0]  # the layer's parent module
            for hf in mod.parts:
                key = f"base_model.model.{parent}.{hf}"
                out[f"{key}.lora_A.weight"] = mod.A[hf].detach().contiguous()
                out[f"{key}.lora_B.weight"] = mod.B[hf].detach().contiguous()
    return out


def save_adapter(model: nn.Module, path: str, base_model: str) -> None:
    """A PEFT adapter directory: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    cfg = model.lora_config
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": cfg["target_modules"], "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    tmp = path + ".tmp-adapter"
    save_file({k: v.float() for k, v in lora_state(model).items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W[rows] += scale * B @ A) and remove it."""
    for mod in list(model.modules()):
        method = getattr(mod, "quant_method", None)
        if isinstance(method, TrainLoRAMethod):
            for hf, (start, rows) in method.params.parts.items():
                delta = method.params.B[hf] @ method.params.A[hf] * method.scale
                mod.weight[start:start + rows] += delta.to(mod.weight.dtype)
            mod.quant_method = method.base
            del mod.lora
    if hasattr(model, "lora_config"):
        del model.lora_config
