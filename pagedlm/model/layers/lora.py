"""LoRA deltas on linear layers, for a batch that mixes adapters (and the base model).

The seam is the layer's ``quant_method`` (``layers/quant.py``): a layer that some adapter
targets gets ``LoRALinearMethod(base method, LoRALayer)``, which computes the base output as
before (dense, int8 or int4: the delta does not care) and adds the adapters' deltas

    y += scale * (x @ A^T) @ B^T        per token, with that token's adapter

A ``LoRALayer`` holds every adapter slot's A and B stacked, so the whole batch takes one shrink
matmul (to the slots' ranks) and one expand matmul per fused projection, whatever mix of
adapters it has:

    A: (slots, parts, R, in)      R = max_lora_rank (an adapter of lower rank is zero-padded)
    B[p]: (slots, R, rows of p)   one per part

``parts`` are the projections fused into this layer (q, k, v for ``qkv_proj``; gate, up for
``gate_up_proj``; one for ``o_proj`` and ``down_proj``): part p's expand gives its slice of the
fused output (the slices are concatenated; a block-diagonal B over the whole output would read
and multiply zeros: a third of q/k/v's and half of gate/up's). Each token's shrink output is
masked to its own slot's columns (``LoRABatch``), so a token of one adapter never sees another's
weights and a base-model token gets exactly zero. The scale (alpha / r, or alpha / sqrt(r) with
rsLoRA) is folded into B when an adapter enters a slot.

Cost: eagerly, only the slots up to the highest one in use this step take part, and a layer
that no adapter of the step targets is skipped. When no token of a step has an adapter,
``LoRABatch.active`` is False and the layer is the base layer (that is also how the compiled
decode step's base graph traced it).

Graph mode (``LoRABatch.use_graph``, the compiled decode step's LoRA graph, ``engine/compiled.py``):
no Python check that depends on the step's adapters, so one graph serves every mix. Every slot
of every wrapped layer takes part, and the token -> slot one-hot is a persistent buffer of the
batch bucket, filled in place each step (padding rows: all zero, no delta). Adapters enter their
slots in place (``set_slot``), so a captured graph reads the weights of the adapters in its slots
now, not of those it was compiled with.
"""

from __future__ import annotations

import torch

from pagedlm.model.layers.quant import LinearMethod


class LoRABatch:
    """Which adapter slot each token of the current step uses; shared by a model's LoRA layers."""

    def __init__(self) -> None:
        self.active = False
        self.graph = False  # graph mode: every slot, one-hot from a persistent buffer (see above)
        self.slots: frozenset[int] = frozenset()  # slots in use this step
        self.num_slots = 0  # slots [0, num_slots) take part in the matmuls (highest in use + 1)
        self.onehot: torch.Tensor | None = None  # (tokens, num_slots) 1.0 where a token uses a slot

    def set(self, token_slots: list[int], device: torch.device, dtype: torch.dtype) -> None:
        """``token_slots``: the slot of each token's adapter, or -1 for the base model."""
        used = sorted({s for s in token_slots if s >= 0})
        self.clear()
        if not used:
            return
        self.active = True
        self.slots = frozenset(used)
        self.num_slots = used[-1] + 1
        arange = torch.arange(self.num_slots, device=device)
        self.onehot = (torch.tensor(token_slots, device=device)[:, None] == arange).to(dtype)

    def use_graph(self, onehot: torch.Tensor) -> None:
        """Graph mode over ``onehot`` (tokens, all slots), filled in place by the caller."""
        self.clear()
        self.active = self.graph = True
        self.num_slots = onehot.shape[1]
        self.onehot = onehot

    def clear(self) -> None:
        self.active = self.graph = False
        self.slots = frozenset()
        self.num_slots = 0
        self.onehot = None


class LoRALayer:
    """The stacked adapters of one linear layer (see the module docstring for the layout)."""

    def __init__(self, in_features: int, parts: list[tuple[int, int]], out_features: int, max_loras: int,
                 max_rank: int, batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        # (first output row, rows) of each fused projection: contiguous, in order (their deltas
        # are concatenated)
        self.parts = parts
        self.in_features, self.out_features = in_features, out_features
        self.max_rank = max_rank
        self.batch = batch
        self.A = torch.zeros(max_loras, len(parts), max_rank, in_features, dtype=dtype, device=device)
        self.B = [torch.zeros(max_loras, max_rank, rows, dtype=dtype, device=device) for _, rows in parts]
        self.columns = len(parts) * max_rank  # shrink columns per slot
        self.A_rows = self.A.view(-1, in_features)  # (slots * columns, in)
        self.B_rows = [b.view(-1, b.shape[-1]) for b in self.B]  # (slots * R, rows of the part)
        self.filled: set[int] = set()  # slots whose adapter targets this layer

    @torch.no_grad()
    def set_slot(self, slot: int, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter in ``slot``: part index -> (A (r, in), scaled B (part rows, r));
        an empty dict clears the slot (the adapter does not target this layer)."""
        # In place: a compiled LoRA graph holds these tensors (engine/compiled.py).
        self.A[slot].zero_()
        for b in self.B:
            b[slot].zero_()
        for p, (a, b) in weights.items():
            r = a.shape[0]
            self.A[slot, p, :r].copy_(a)
            self.B[p][slot, :r].copy_(b.t())
        if weights:
            self.filled.add(slot)
        else:
            self.filled.discard(slot)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if not batch.graph and self.filled.isdisjoint(batch.slots):
            return y  # no adapter of this step targets this layer (eager only: a graph has no such check)
        n = batch.num_slots
        x2 = x.reshape(-1, self.in_features).to(self.A.dtype)
        shrink = (x2 @ self.A_rows[: n * self.columns].t()).view(-1, n, len(self.parts), self.max_rank)
        # Each token keeps its own slot's shrink columns: others' (and a base token's) are zeroed.
        shrink = shrink * batch.onehot[:, :, None, None]
        deltas = [shrink[:, :, p].reshape(-1, n * self.max_rank) @ b[: n * self.max_rank]
                  for p, b in enumerate(self.B_rows)]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)  # (tokens, out)
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
