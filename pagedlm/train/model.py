"""The inference model, made trainable: initialisation, gradients, activation checkpointing, loss.

There is no second model definition: a training batch runs through the very modules the engine
runs, with ``CausalMetadata`` (``model/layers/attention.py``) in place of the paged metadata, so
attention is plain causal (block-diagonal when examples are packed) and nothing is cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm.model.layers.attention import CausalMetadata

IGNORE = -100  # label of a token that is not trained on (transformers' convention)
INIT_STD = 0.02  # HF's initializer_range default for every family pagedlm runs


@torch.no_grad()
def init_weights(model: nn.Module, std: float = INIT_STD) -> None:
    """The standard initialisation for pretraining (as transformers' ``_init_weights``): linear and
    embedding weights N(0, std), biases zero, norm scales one (zero where the norm scales by
    ``1 + w``, Gemma). Output projections of the residual branches get std / sqrt(2 * layers), as
    GPT-2 / nanoGPT do, so the residual stream's variance does not grow with depth."""
    from pagedlm.model.layers.basic import LayerNorm, RMSNorm
    from pagedlm.model.layers.linear import LinearBase, VocabParallelEmbedding

    layers = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, LinearBase):
            last = name.rpartition(".")[2]
            s = std / math.sqrt(2 * layers) if last in ("o_proj", "down_proj", "c_proj") else std
            mod.weight.normal_(0.0, s)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, (VocabParallelEmbedding, nn.Embedding)):
            mod.weight.normal_(0.0, std)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(0.0 if mod.weight_offset else 1.0)
        elif isinstance(mod, LayerNorm):
            mod.weight.fill_(1.0)
            mod.bias.zero_()


def make_trainable(model: nn.Module, checkpointing: bool = False) -> nn.Module:
    """Every parameter requires grad; train mode; optional activation checkpointing (each decoder
    layer's activations recomputed in backward: memory of one layer instead of all)."""
    from pagedlm.model.layers.quant import UnquantizedLinearMethod

    for name, mod in model.named_modules():
        method = getattr(mod, "quant_method", None)
        if method is not None and not isinstance(method, UnquantizedLinearMethod) \
                and type(method).__name__ != "TrainLoRAMethod":
            raise ValueError(f"layer {name!r} is quantized ({method.name}); train a model loaded with "
                             "quantization='none'")
    for p in model.parameters():
        p.requires_grad_(True)
    set_checkpointing(model, checkpointing)
    return model.train()


def set_checkpointing(model: nn.Module, on: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "checkpoint_layers"):
            mod.checkpoint_layers = on


@dataclass
class Batch:
    """Rows of tokens. ``labels[b, t]`` is the token to predict after ``input_ids[b, t]`` (already
    shifted; IGNORE where no loss is taken). ``positions`` restart at 0 for every packed example;
    ``segment_ids`` (None: one example per row, padding at the end) keep examples apart."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64
    segment_ids: torch.Tensor | None = None  # (B, T) int64

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        seg = None if self.segment_ids is None else self.segment_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), self.positions.to(device), seg)


def token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every trained token, (n,) float32, and the flat indices it belongs to.
    Packed rows run padding-free: their padding tokens are dropped before the model and the
    examples of all rows form one varlen batch (segment ids made unique across rows). Logits are
    computed only where a label is (an assistant-only mask skips most of the head)."""
    b, t = batch.input_ids.shape
    ids, pos, labels = batch.input_ids.reshape(-1), batch.positions.reshape(-1), batch.labels.reshape(-1)
    keep = None
    if batch.segment_ids is not None:
        seg = batch.segment_ids
        real = (seg >= 0).reshape(-1)
        uniq = (seg + torch.arange(b, device=seg.device)[:, None] * t).reshape(-1)  # (B*T,)
        if not bool(real.all()):
            keep = real.nonzero().squeeze(1)
            ids, pos, labels, uniq = ids[keep], pos[keep], labels[keep], uniq[keep]
        meta = CausalMetadata(1, ids.numel(), uniq[None])
    else:
        meta = CausalMetadata(b, t)
    hidden = model(ids, pos, meta)  # (tokens, hidden)
    idx = (labels != IGNORE).nonzero().squeeze(1)
    logits = model.compute_logits(hidden[idx]).float()  # (n, vocab)
    return F.cross_entropy(logits, labels[idx], reduction="none"), (idx if keep is None else keep[idx])


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens (divide by the global token count)."""
    losses, _ = token_losses(model, batch)
    return losses.sum()


class CausalLMLoss(nn.Module):
    """``model`` with the loss as its forward: what DDP wraps, so that the head's matmul
    (``compute_logits``, outside the model's own forward) runs inside the wrapped call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.model, batch)
