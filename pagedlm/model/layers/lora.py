"""LoRA deltas on linear layers, for a batch that mixes adapters (and the base model).

The seam is the layer's ``quant_method`` (``layers/quant.py``): a layer that some adapter
targets gets ``LoRALinearMethod(base method, LoRALayer)``, which computes the base output as
before (dense, int8 or int4: the delta does not care) and adds the adapters' deltas

    y += scale * (x @ A^T) @ B^T        per token, with that token's adapter

A ``LoRALayer`` holds every adapter slot's A and B stacked, so the whole batch takes two
matmuls, whatever mix of adapters it has (a "shrink" to the slots' ranks and an "expand" back):

    A: (slots, parts, R, in)      R = max_lora_rank (an adapter of lower rank is zero-padded)
    B: (slots, parts, R, out)     part p's rows of B are zero outside that part's output rows

``parts`` are the projections fused into this layer (q, k, v for ``qkv_proj``; gate, up for
``gate_up_proj``; one for ``o_proj`` and ``down_proj``): part p's delta lands in its slice of
the fused output because its B is zero elsewhere (block-diagonal expand, one matmul). Each
token's shrink output is masked to its own slot's columns (``LoRABatch``), so a token of one
adapter never sees another's weights and a base-model token gets exactly zero. The scale
(alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into B when an adapter enters a slot.

Cost: only the slots up to the highest one in use this step take part, and a layer that no
adapter of the step targets is skipped. When no token of a step has an adapter,
``LoRABatch.active`` is False and the layer is the base layer (that is also how the compiled
decode step, which runs only such steps, traced it).
"""

from __future__ import annotations

import torch

from pagedlm.model.layers.quant import LinearMethod


class LoRABatch:
    """Which adapter slot each token of the current step uses; shared by a model's LoRA layers."""

    def __init__(self) -> None:
        self.active = False
        self.slots: frozenset[int] = frozenset()  # slots in use this step
        self.num_slots = 0  # slots [0, num_slots) take part in the matmuls (highest in use + 1)
        self._onehot: torch.Tensor | None = None  # (tokens, num_slots) 1.0 where a token uses a slot
        self._masks: dict[int, torch.Tensor] = {}  # columns per slot -> (tokens, num_slots * columns)

    def set(self, token_slots: torch.Tensor, dtype: torch.dtype) -> None:
        """``token_slots``: (tokens,) long, the slot of each token's adapter or -1 for the base."""
        used = sorted({int(s) for s in token_slots.unique().tolist() if s >= 0})
        self.clear()
        if not used:
            return
        self.active = True
        self.slots = frozenset(used)
        self.num_slots = used[-1] + 1
        arange = torch.arange(self.num_slots, device=token_slots.device)
        self._onehot = (token_slots[:, None] == arange).to(dtype)

    def clear(self) -> None:
        self.active = False
        self.slots = frozenset()
        self.num_slots = 0
        self._onehot = None
        self._masks = {}

    def mask(self, columns: int) -> torch.Tensor:
        """(tokens, num_slots * columns): each token's own slot's shrink columns set to 1."""
        m = self._masks.get(columns)
        if m is None:
            m = self._masks[columns] = self._onehot.repeat_interleave(columns, dim=1)
        return m


class LoRALayer:
    """The stacked adapters of one linear layer (see the module docstring for the layout)."""

    def __init__(self, in_features: int, parts: list[tuple[int, int]], out_features: int, max_loras: int,
                 max_rank: int, batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        self.parts = parts  # (first output row, rows) of each fused projection
        self.in_features, self.out_features = in_features, out_features
        self.max_rank = max_rank
        self.batch = batch
        self.A = torch.zeros(max_loras, len(parts), max_rank, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(max_loras, len(parts), max_rank, out_features, dtype=dtype, device=device)
        self.columns = len(parts) * max_rank  # shrink columns per slot
        self.A_rows = self.A.view(-1, in_features)  # (slots * columns, in)
        self.B_rows = self.B.view(-1, out_features)  # (slots * columns, out)
        self.filled: set[int] = set()  # slots whose adapter targets this layer

    @torch.no_grad()
    def set_slot(self, slot: int, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter in ``slot``: part index -> (A (r, in), scaled B (part rows, r));
        an empty dict clears the slot (the adapter does not target this layer)."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        for p, (a, b) in weights.items():
            r = a.shape[0]
            first, rows = self.parts[p]
            self.A[slot, p, :r].copy_(a)
            self.B[slot, p, :r, first:first + rows].copy_(b.t())
        if weights:
            self.filled.add(slot)
        else:
            self.filled.discard(slot)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if self.filled.isdisjoint(batch.slots):
            return y  # no adapter of this step targets this layer
        k = batch.num_slots * self.columns
        x2 = x.reshape(-1, self.in_features).to(self.A.dtype)
        shrink = (x2 @ self.A_rows[:k].t()) * batch.mask(self.columns)  # (tokens, k)
        delta = shrink @ self.B_rows[:k]  # (tokens, out)
        return y + delta.reshape(y.shape).to(y.dtype)


class LoRALinearMethod(LinearMethod):
    """A layer's own method, plus the LoRA deltas of the step's adapters."""

    def __init__(self, base: LinearMethod, lora: LoRALayer):
        self.base = base
        self.lora = lora
        self.name = base.name

    def process_weights_after_loading(self, layer, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.base.process_weights_after_loading(layer, weight, compute_dtype)

    def apply(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, weight, bias)
        if not self.lora.batch.active:
            return y
        return self.lora.add_delta(x, y)
