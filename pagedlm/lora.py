"""LoRA adapters: PEFT adapter directories loaded next to one base model, chosen per request.

    LoRARequest(name, id, path)   what a request names (vLLM's shape); ``LLM.generate(...,
                                  lora_request=...)``, or the adapter's name as ``model`` in the server
    LoRAAdapter                   one loaded adapter: per target layer, its A and scaled B
    LoRAManager                   the registry of loaded adapters, the ``max_loras`` slots of the
                                  model's stacked LoRA layers (``model/layers/lora.py``) and the
                                  per-step token -> slot map

An adapter directory is PEFT's: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``, ``rank_pattern`` / ``alpha_pattern``) and ``adapter_model.safetensors``
(``...<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r)). HF module names map to
pagedlm's fused layers through the model's ``packed_modules_mapping``: ``q_proj`` is part "q"
of ``qkv_proj``, ``up_proj`` part 1 of ``gate_up_proj``, and so on.

Adapters are loaded once (at start-up for ``--lora-modules``, at first use for a
``LoRARequest``) and stay in memory; a step puts the ones it needs into slots (least recently
used slot first), and the scheduler admits at most ``max_loras`` distinct adapters among the
running sequences, so a step never needs more slots than there are.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_FORMAT = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoRARequest:
    """A request for an adapter: a name, a positive integer id and a PEFT adapter directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise TypeError(f"lora_path must be a path, got {type(self.lora_path).__name__}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


def parse_lora_modules(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``["name=path", ...]`` (the CLI's form) or a dict -> {name: path}, names unique."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            name, sep, path = str(item).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"invalid LoRA module {item!r}: use NAME=PATH (a PEFT adapter directory)")
            pairs.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not isinstance(name, str) or not name or not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"invalid LoRA module {name!r}={path!r}: need a name and a path")
        if name in out:
            raise ValueError(f"LoRA module name {name!r} is given twice")
        out[name] = os.fspath(path)
    return out


# ---- reading an adapter directory -------------------------------------------------------------

# PEFT options whose adapters are not a plain A/B pair on linear layers.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, e.g. GPT-2)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
    "use_qalora": "QA-LoRA",
}


def read_adapter_config(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter path {path!r} is not a directory (expected a PEFT adapter directory)")
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json: not a PEFT adapter directory")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {cfg_path!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path!r} is not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {kind!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise ValueError(f"LoRA adapter {path!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json needs r (a positive integer) and "
                         f"lora_alpha (a number), got r={r!r}, lora_alpha={alpha!r}")
    return cfg


def read_adapter_tensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    file = os.path.join(path, SUPPORTED_FORMAT)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"LoRA adapter {path!r} has only adapter_model.bin; save it as safetensors "
                             "(PEFT's save_pretrained(..., safe_serialization=True), the default)")
        raise ValueError(f"LoRA adapter {path!r} has no {SUPPORTED_FORMAT}")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"cannot read {file!r}: {e}") from e


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


# ---- the adapter ------------------------------------------------------------------------------

_uids = itertools.count()


@dataclass(eq=False)
class LoRAAdapter:
    request: LoRARequest
    rank: int  # largest rank over its layers
    # pagedlm layer name -> part index -> (A (r, in), B * scale (part rows, r))
    weights: dict[str, dict[int, tuple[Any, Any]]] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def prefix_root(self) -> tuple:
        """Parent key of a sequence's first KV block in the prefix cache: blocks computed with
        this adapter's weights are only ever shared with requests of the same adapter."""
        return ("lora", self.uid)


# ---- the manager ------------------------------------------------------------------------------

class LoRAManager:
    """Loads adapters for one model and maps each step's tokens to adapter slots."""

    def __init__(self, model, max_loras: int, max_lora_rank: int, dtype, device):
        from pagedlm.model.layers.linear import LinearBase
        from pagedlm.model.layers.lora import LoRABatch

        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.dtype, self.device = dtype, device
        self.batch = LoRABatch()
        self.adapters: dict[int, LoRAAdapter] = {}  # by lora_int_id
        self.layers: dict[str, Any] = {}  # pagedlm layer name -> LoRALayer (created on first use)
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
        # HF module name (last part) -> (pagedlm module, part id) for fused projections
        self.packed: dict[str, tuple[str, Any]] = dict(getattr(model, "packed_modules_mapping", {}))
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter uid -> slot, least recent first
        self.in_slot: list[LoRAAdapter | None] = [None] * max_loras

    # ---- adapters -----------------------------------------------------------------------------
    def add(self, req: LoRARequest) -> LoRAAdapter:
        """The adapter of ``req``, loaded and checked the first time (ValueError if unusable)."""
        if not isinstance(req, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
        have = self.adapters.get(req.lora_int_id)
        if have is not None:
            if have.request != req:
                raise ValueError(f"lora_int_id {req.lora_int_id} is already used by adapter "
                                 f"{have.request.lora_name!r} ({have.request.lora_path!r})")
            return have
        other = next((a for a in self.adapters.values() if a.name == req.lora_name), None)
        if other is not None:
            raise ValueError(f"LoRA adapter name {req.lora_name!r} is already used by lora_int_id "
                             f"{other.request.lora_int_id}")
        adapter = self._load(req)
        for name in adapter.weights:
            self._layer(name)
        self.adapters[req.lora_int_id] = adapter
        return adapter

    def _load(self, req: LoRARequest) -> LoRAAdapter:
        import torch

        path = req.lora_path
        cfg = read_adapter_config(path)
        tensors = read_adapter_tensors(path)
        pairs: dict[str, dict[str, Any]] = {}  # HF module -> {"A": tensor, "B": tensor}
        for key, t in tensors.items():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise ValueError(f"LoRA adapter {path!r}: tensor {key!r} is not supported (only lora_A / "
                                 "lora_B weights of linear layers)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        if not pairs:
            raise ValueError(f"LoRA adapter {path!r} has no lora_A / lora_B weights")
        adapter = LoRAAdapter(req, 0)
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {path!r}: module {module!r} has lora_{next(iter(ab))} but "
                                 f"no lora_{'B' if 'A' in ab else 'A'}")
            layer, part = self._resolve(module, path)
            a, b = ab["A"], ab["B"]
            lin = self.linears[layer]
            first, rows = self._parts(lin)[part]
            rank = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != lin.in_features or b.shape != (rows, rank):
                raise ValueError(f"LoRA adapter {path!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)}; this model needs ({rank}, {lin.in_features}) and "
                                 f"({rows}, {rank}) (an adapter for another base model?)")
            if rank > self.max_lora_rank:
                raise ValueError(f"LoRA adapter {req.lora_name!r} has rank {rank} ({module}), above "
                                 f"max_lora_rank {self.max_lora_rank}; raise --max-lora-rank")
            scale = lora_scaling(cfg, module, rank)
            a = a.to(self.dtype)
            b = (b.to(torch.float32) * scale).to(self.dtype)
            adapter.weights.setdefault(layer, {})[part] = (a, b)
            adapter.rank = max(adapter.rank, rank)
        return adapter

    def _resolve(self, module: str, path: str) -> tuple[str, int]:
        """HF module name -> (pagedlm layer name, index of its part in the fused layer)."""
        parent, _, last = module.rpartition(".")
        fused, part_id = self.packed.get(last, (last, None))
        layer = f"{parent}.{fused}" if parent else fused
        lin = self.linears.get(layer)
        if lin is None:
            supported = sorted(set(self.packed) | {n.rpartition(".")[2] for n in self.linears} - set(
                f for f, _ in self.packed.values()))
            raise ValueError(f"LoRA adapter {path!r}: target module {module!r} is not supported by this model "
                             f"(LoRA applies to the linear layers {', '.join(supported)})")
        ids = self._part_ids(lin)
        return layer, ids.index(part_id)

    @staticmethod
    def _part_ids(lin) -> list:
        from pagedlm.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

        if isinstance(lin, QKVParallelLinear):
            return ["q", "k", "v"]
        if isinstance(lin, MergedColumnParallelLinear):
            return list(range(len(lin.output_sizes)))
        return [None]

    @staticmethod
    def _parts(lin) -> list[tuple[int, int]]:
        """(first output row, rows) of each projection fused into ``lin`` (tensor parallel size 1)."""
        from pagedlm.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

        if isinstance(lin, QKVParallelLinear):
            q, kv = lin.num_heads * lin.head_dim, lin.num_kv_heads * lin.head_dim
            return [(0, q), (q, kv), (q + kv, kv)]
        if isinstance(lin, MergedColumnParallelLinear):
            starts = list(itertools.accumulate([0] + lin.output_sizes[:-1]))
            return list(zip(starts, lin.output_sizes))
        return [(0, lin.out_features)]

    def _layer(self, name: str):
        """The LoRALayer of a linear layer, created (and put in the layer's quant_method) on first use."""
        from pagedlm.model.layers.lora import LoRALayer, LoRALinearMethod

        layer = self.layers.get(name)
        if layer is None:
            lin = self.linears[name]
            layer = LoRALayer(lin.in_features, self._parts(lin), lin.out_features, self.max_loras,
                              self.max_lora_rank, self.batch, self.dtype, self.device)
            lin.quant_method = LoRALinearMethod(lin.quant_method, layer)
            self.layers[name] = layer
        return layer

    # ---- per step -----------------------------------------------------------------------------
    def set_batch(self, scheduled) -> list[int] | None:
        """Map this step's tokens (``(seq, tokens)`` in batch order) to slots and set the eager
        batch; returns each token's slot (-1: the base model), or None (and the LoRA layers off)
        when no sequence of the step has an adapter."""
        needed = {seq.lora.uid: seq.lora for seq, _ in scheduled if seq.lora is not None}
        if not needed:
            self.batch.clear()
            return None
        slots = {uid: self._slot_for(a, needed) for uid, a in needed.items()}
        token_slots = []
        for seq, n in scheduled:
            token_slots += [slots[seq.lora.uid] if seq.lora is not None else -1] * n
        self.batch.set(token_slots, self.device, self.dtype)
        return token_slots

    def _slot_for(self, adapter: LoRAAdapter, needed: dict[int, LoRAAdapter]) -> int:
        slot = self.slot_of.get(adapter.uid)
        if slot is not None:
            self.slot_of.move_to_end(adapter.uid)
            return slot
        free = [i for i, a in enumerate(self.in_slot) if a is None]
        if free:
            slot = free[0]
        else:  # the least recently used slot whose adapter this step does not need
            uid = next((u for u in self.slot_of if u not in needed), None)
            if uid is None:
                raise RuntimeError(f"a step needs more than max_loras={self.max_loras} adapters")
            slot = self.slot_of.pop(uid)
        for name, layer in self.layers.items():
            layer.set_slot(slot, adapter.weights.get(name, {}))
        self.in_slot[slot] = adapter
        self.slot_of[adapter.uid] = slot
        return slot
