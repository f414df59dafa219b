"""Multi-head latent attention (DeepSeek-V2 / V3), over a paged cache of latents.

Per token, the model projects the hidden state to

    q        (heads, nope + rope)        via q_a_proj -> RMSNorm -> q_b_proj (or q_proj when q_lora_rank is None)
    c        (kv_lora_rank,)             the compressed KV latent, via kv_a_proj_with_mqa -> RMSNorm
    k_pe     (rope,)                     the decoupled rope key, shared by every head

and keys / values of head h are ``k_h = [W_UK_h c, k_pe]``, ``v_h = W_UV_h c`` (``kv_b_proj``).
The cache keeps only ``[c, k_pe]``: ``kv_lora_rank + qk_rope_head_dim`` values per token and
layer (one slot, one "KV head"), which is what ``pagedlm inspect`` counts.

* **Decode absorbs the up-projections** (weight absorption): ``q_nope_h . W_UK_h c = (W_UK_h^T
  q_nope_h) . c``, so each head's query becomes ``[W_UK_h^T q_nope_h, q_pe]`` and attends to the
  cached latents directly, as multi-query attention with one KV head of size ``rank + rope`` whose
  values are its first ``rank`` columns; the output ``o_h`` (in latent space) goes through
  ``W_UV_h`` afterwards. No key or value is ever expanded per head.
* **Prefill expands**: a chunk's context latents go through ``kv_b_proj`` once, and the chunk
  attends with ordinary per-head keys and values (fewer FLOPs per key than the absorbed form when
  many queries share the keys).

Both run on the attention backends of ``attention.py`` (``write_latent`` / ``decode_latent``),
so the compiled decode step's in-place paged backend serves MLA as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm.config import ModelConfig
from pagedlm.model.layers.basic import RMSNorm, apply_rope
from pagedlm.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

# transformers' DeepSeek q_a / kv_a norms use their default eps, not the config's rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, heads * qk)
        else:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, heads * qk)
        self.q_lora = bool(cfg.q_lora_rank)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.rank, heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.num_heads = self.kv_b_proj.out_features // (self.nope + self.v_dim)  # this TP rank's heads
        self.scale = cfg.attn_scale
        self.interleave = cfg.rope_interleave
        self.kv_cache: torch.Tensor | None = None  # (1, blocks, block_size, 1, rank + rope), set by the runner
        self.w_uk: torch.Tensor | None = None  # (heads, nope, rank), from kv_b_proj after loading
        self.w_uv_t: torch.Tensor | None = None  # (heads, rank, v_dim)

    # ---- the cache this layer declares ----------------------------------------------------------
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (1, num_blocks, block_size, 1, self.rank + self.rope)

    def kv_elems_per_token(self) -> int:
        return self.rank + self.rope

    def process_weights_after_loading(self, compute_dtype: torch.dtype):
        """The absorbed up-projections, from ``kv_b_proj``'s final weight (its own quantization,
        if any, ran first: ``finalize_quantization`` visits children before parents)."""
        w = self.kv_b_proj.weight.detach().to(compute_dtype).view(self.num_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = w[:, : self.nope].contiguous()
        self.w_uv_t = w[:, self.nope:].transpose(1, 2).contiguous()
        yield from ()

    # ---- forward --------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:  # rope on (even, odd) pairs: the same rotation in "rotate half" order
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache: the ModelRunner allocates it")
        n = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(n, self.num_heads, -1).split([self.nope, self.rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        q_pe = self._rope(q_pe, cos, sin)  # (tokens, heads, rope)
        k_pe = self._rope(k_pe[:, None], cos, sin)[:, 0]  # (tokens, rope)
        latent = torch.cat((self.kv_a_layernorm(c), k_pe), dim=-1)  # (tokens, rank + rope): what is cached
        backend = meta.backend
        backend.write_latent(self.kv_cache, latent, meta.slot_mapping)
        out = x.new_empty(n, self.num_heads, self.v_dim)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q_nope[:nd], q_pe[:nd], backend, meta)
        for i, seg in enumerate(meta.prefills):
            s, m = seg.q_start, seg.q_len
            ctx = latent[s:s + m] if seg.context_len == m else backend.context_latents(self.kv_cache, seg)
            out[s:s + m] = self._prefill(q_nope[s:s + m], q_pe[s:s + m], ctx, meta.prefill_mask(i, None))
        return self.o_proj(out.view(n, -1))

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, backend, meta) -> torch.Tensor:
        """Absorbed: queries in latent space against the cached latents, outputs back per head."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # (rows, heads, rank)
        o_lat = backend.decode_latent(torch.cat((q_lat, q_pe), dim=-1), self.kv_cache, meta, self.scale, self.rank)
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # (rows, heads, v_dim)

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Expanded: per-head keys and values from the context's latents."""
        t = ctx.shape[0]
        kv = self.kv_b_proj(ctx[:, : self.rank]).view(t, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, ctx[:, None, self.rank:].expand(t, self.num_heads, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o[0].transpose(0, 1)  # (chunk, heads, v_dim)
