"""The Llama family in one file, varied by config flags.

    Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral (sliding window): the base shape
    Qwen2: bias on q/k/v                     Qwen3: RMSNorm over each head of q and k
    Gemma 3: embeddings x sqrt(hidden), GeGLU, RMSNorm with (1 + w), q/k norm, norms after
             attention and MLP as well as before, sliding-window layers with their own rope base
    Mixtral / Qwen-MoE: the MLP of some layers is a sparse mixture of experts (layers/moe.py)
    DeepSeek-V2 / V3: multi-head latent attention (layers/mla.py), YaRN rope on the rope dims only,
             dense first layers, routed + shared experts with a group-limited router

One step runs on a flat batch of tokens (no padding): ``forward(input_ids, positions, meta)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pagedlm.config import ModelConfig
from pagedlm.model.layers.attention import Attention, AttentionMetadata
from pagedlm.model.layers.basic import RMSNorm, RotaryEmbedding, act_fn, apply_rope_qk
from pagedlm.model.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_weight_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_weight_offset)
        self.qk_norm = cfg.qk_norm
        window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.attn_scale, window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (tokens, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_qk(q, k, cos, sin)
        o = self.attn(q, k, v, meta)  # (tokens, heads * head_dim)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with tanh-gelu."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act = act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        if cfg.is_mla:
            from pagedlm.model.layers.mla import MLAAttention

            self.self_attn = MLAAttention(cfg, layer)
        else:
            self.self_attn = LlamaAttention(cfg, layer)
        if cfg.moe_layers[layer]:
            from pagedlm.model.layers.moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(cfg)
        else:
            self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        eps, off = cfg.norm_eps, cfg.norm_weight_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        # Pre-norm Llama names its pre-MLP norm "post_attention_layernorm"; Gemma 3 uses that name
        # for a norm of the attention output and adds pre/post feed-forward norms.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.post_norms:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layer_ids = layers if layers is not None else range(cfg.num_hidden_layers)
        # Keep checkpoint layer numbers as module names, also when a pipeline stage holds a slice.
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg, i) for i in self.layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weight_offset)
        self.embed_scale = cfg.embed_scale
        # One rotary table per distinct (base, scaling); each layer points at its own.
        ropes: dict[tuple, RotaryEmbedding] = {}
        self.layer_rope: dict[int, str] = {}
        for i in self.layer_ids:
            key = (cfg.rope_theta_for(i), cfg.rope_scaling_for(i))
            if key not in ropes:
                ropes[key] = RotaryEmbedding(cfg.rotary_dim, *key)
            self.layer_rope[i] = str(list(ropes).index(key))
        self.rotary = nn.ModuleDict({str(j): r for j, r in enumerate(ropes.values())})
        self.checkpoint_layers = False  # activation checkpointing (pagedlm.train sets it)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            # Gemma scales in the weights' dtype, as its reference does.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: (tokens, hidden) from ``embed`` or from the previous pipeline stage."""
        rope = {k: r(positions, x.dtype) for k, r in self.rotary.items()}
        for i in self.layer_ids:
            if self.checkpoint_layers and self.training:  # training: recompute activations in backward
                x = checkpoint(self.layers[str(i)], x, *rope[self.layer_rope[i]], meta, use_reentrant=False)
            else:
                x = self.layers[str(i)](x, *rope[self.layer_rope[i]], meta)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, layers: range | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.config = cfg
        if cfg.is_mla:  # MLA's projections load as they are (its q_proj is not fused with k/v)
            self.packed_modules_mapping = {k: v for k, v in self.packed_modules_mapping.items()
                                           if v[0] != "qkv_proj"}
        self.first, self.last = first, last
        self.model = LlamaModel(cfg, layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.softcap = cfg.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.embed(input_ids) if hidden is None else hidden
        x = self.model(x, positions, meta)
        return self.model.norm(x) if self.last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        logits = ParallelLMHead.forward(head, hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def attention_layers(self) -> list[nn.Module]:
        """The modules that own a KV cache (``Attention``, or ``MLAAttention`` itself)."""
        return [m.self_attn if self.config.is_mla else m.self_attn.attn for m in self.model.layers.values()]

    def remap_checkpoint(self, name: str, tensor: torch.Tensor):
        """Yield (parameter name, tensor, shard id): MoE experts of any layout (layers/moe.py),
        then the fused q/k/v and gate/up of ``packed_modules_mapping``."""
        from pagedlm.loader.weights import default_remap, layer_of

        if (layer_of(name) or 0) >= self.config.num_hidden_layers:
            return  # DeepSeek-V3's multi-token-prediction module: not used for decoding
        if self.config.is_moe:
            from pagedlm.model.layers.moe import remap_moe, rename_moe

            items = remap_moe(name, tensor, self._experts_of)
            if items is not None:
                yield from items
                return
            name = rename_moe(name)
        yield from default_remap(self, name, tensor)

    def _experts_of(self, prefix: str):
        try:
            return self.get_submodule(prefix + ".experts")
        except AttributeError:
            return None
