"""GPT-2: LayerNorm, learned positions, tanh-GELU MLP, biases everywhere, tied head.

Checkpoints store GPT-2's projections in Conv1D layout (in, out); ``remap_checkpoint`` transposes
them and splits the fused ``c_attn`` into q, k, v shards so tensor parallelism can cut heads.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pagedlm.config import ModelConfig
from pagedlm.model.layers.attention import Attention, AttentionMetadata
from pagedlm.model.layers.basic import LayerNorm, act_fn
from pagedlm.model.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                        cfg.num_key_value_heads, bias=True)
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.size = self.c_attn.num_heads * cfg.head_dim
        self.attn = Attention(self.c_attn.num_heads, self.c_attn.num_kv_heads, cfg.head_dim, cfg.attn_scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.size, dim=-1)  # 3 x (tokens, heads * head_dim)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = act_fn(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.wpe.weight.requires_grad_(False)
        self.layer_ids = layers if layers is not None else range(cfg.num_hidden_layers)
        self.h = nn.ModuleDict({str(i): GPT2Block(cfg) for i in self.layer_ids})
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.checkpoint_layers = False  # activation checkpointing (pagedlm.train sets it)


class GPT2LMHeadModel(nn.Module):
    packed_modules_mapping: dict = {}
    _conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def __init__(self, cfg: ModelConfig, layers: range | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.config = cfg
        self.first, self.last = first, last
        self.transformer = GPT2Model(cfg, layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions) if hidden is None else hidden
        for i in t.layer_ids:
            if t.checkpoint_layers and self.training:  # training: recompute activations in backward
                x = checkpoint(t.h[str(i)], x, meta, use_reentrant=False)
            else:
                x = t.h[str(i)](x, meta)
        return t.ln_f(x) if self.last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ParallelLMHead.forward(self.transformer.wte, hidden)

    def attention_layers(self) -> list[Attention]:
        return [b.attn.attn for b in self.transformer.h.values()]

    def remap_checkpoint(self, name: str, tensor: torch.Tensor):
        """Yield (parameter name, tensor, shard id) for one checkpoint tensor."""
        if not name.startswith("transformer.") and not name.startswith("lm_head"):
            name = "transformer." + name  # GPT2Model checkpoints have no prefix
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return  # causal-mask buffers of old checkpoints, not weights
        if name == "lm_head.weight":
            return  # tied to wte
        if name.endswith(self._conv1d):
            tensor = tensor.t()
        if ".attn.c_attn." in name:
            for shard, part in zip("qkv", tensor.chunk(3, dim=0)):
                yield name, part, shard
            return
        yield name, tensor, None
