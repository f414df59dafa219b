"""Memory: weights at a dtype, KV cache bytes, an activation-peak estimate, tokens that fit.

KV cache, per layer and token: ``2 * kv_heads * head_dim * bytes`` (K and V); DeepSeek-V3's MLA
caches one latent of ``kv_lora_rank + qk_rope_head_dim`` per token (shared by all heads). A
sliding-window layer holds at most ``sliding_window`` tokens of a sequence.
"""

from __future__ import annotations

from pagedlm.analysis.layout import kv_heads_per_rank, stage_layers, validate_layout
from pagedlm.analysis.params import ParamCount, count_parameters
from pagedlm.config import ModelConfig


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def kv_bytes_per_token_layer(cfg: ModelConfig, layer: int, dtype_bytes: float, tp: int = 1) -> float | int:
    """KV bytes one token adds to ``layer`` (on one TP rank when ``tp`` > 1)."""
    if cfg.is_mla:  # latent cache, the same on every TP rank
        return _num((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes)
    return _num(2 * kv_heads_per_rank(cfg, tp) * cfg.head_dim * dtype_bytes)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: float) -> float | int:
    """KV bytes per token summed over all layers (what one token costs while no window is full)."""
    return _num(sum(kv_bytes_per_token_layer(cfg, i, dtype_bytes) for i in range(cfg.num_hidden_layers)))


def tokens_held(cfg: ModelConfig, layer: int, seq: int) -> int:
    """Tokens of a ``seq``-long sequence that ``layer`` keeps in its cache."""
    return min(seq, cfg.sliding_window) if cfg.is_sliding(layer) else seq


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq: int, dtype_bytes: float,
                   layers: range | None = None, tp: int = 1) -> float | int:
    """KV bytes of ``batch`` sequences of ``seq`` tokens (sliding layers capped at the window)."""
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    return _num(sum(batch * tokens_held(cfg, i, seq) * kv_bytes_per_token_layer(cfg, i, dtype_bytes, tp)
                    for i in layers))


def max_seq_in_budget(cfg: ModelConfig, budget_bytes: float, dtype_bytes: float,
                      batch: int = 1) -> int | None:
    """Longest sequence length such that ``batch`` such sequences fit in ``budget_bytes`` of KV cache.

    None when the cache stops growing (every layer is a sliding-window layer) and it fits.
    """
    if budget_bytes < 0 or kv_cache_bytes(cfg, batch, 1, dtype_bytes) > budget_bytes:
        return 0
    if all(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
        return None if kv_cache_bytes(cfg, batch, cfg.sliding_window, dtype_bytes) <= budget_bytes else (
            int(budget_bytes // (batch * kv_cache_bytes_per_token(cfg, dtype_bytes))))
    lo, hi = 1, 2
    while kv_cache_bytes(cfg, batch, hi, dtype_bytes) <= budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # kv_cache_bytes grows with seq: bisect for the last length that fits
        mid = (lo + hi) // 2
        if kv_cache_bytes(cfg, batch, mid, dtype_bytes) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def weights_per_stage(cfg: ModelConfig, dtype_bytes: float, tp: int = 1, pp: int = 1, ep: int = 1,
                      params: ParamCount | None = None) -> list[float]:
    """Weight bytes held by one device of each pipeline stage.

    Attention, dense MLPs and shared experts are split ``tp`` ways; routed experts ``ep`` ways
    (or ``tp`` ways when ``ep`` is 1); embedding and lm_head are vocab-parallel (``tp`` ways) on
    the first and last stage; norms and routers are replicated.
    """
    validate_layout(cfg, tp, pp, ep)
    p = params or count_parameters(cfg)
    out = []
    stages = stage_layers(cfg.num_hidden_layers, pp)
    for s, layers in enumerate(stages):
        n = 0.0
        for i in layers:
            la = p.layers[i]
            n += (la.attention + la.mlp + la.shared_experts) / tp + la.router + la.norms
            n += la.experts / (ep if ep > 1 else tp)
        if s == 0:
            n += (p.embedding + p.position_embedding) / tp
        if s == pp - 1:
            n += p.lm_head / tp + p.final_norm
            if p.tied and pp > 1:
                n += p.embedding / tp  # the last stage needs its own copy of a tied head
        out.append(n * dtype_bytes)
    return out


def activation_peak_bytes(cfg: ModelConfig, chunk_tokens: int, dtype_bytes: float, tp: int = 1,
                          num_sampled: int = 1) -> dict[str, float]:
    """Estimate of the activation peak of one prefill chunk of ``chunk_tokens`` tokens (inference).

    Live at once inside a layer: the residual stream and the normed input (2 h per token) plus
    the widest block: attention (q, k, v and its output) or the MLP (gate|up and the activation,
    3 i per token; for MoE top-k copies of the routed input and of 3 moe_i, plus a shared
    expert). Attention scores are assumed never materialised (a fused / flash kernel). Logits
    are fp32 and only for the ``num_sampled`` sampled tokens.
    """
    h, t = cfg.hidden_size, chunk_tokens
    if cfg.is_mla:
        nh = cfg.num_attention_heads // tp
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attn = (cfg.q_lora_rank or 0) + nh * qk + cfg.kv_lora_rank + cfg.qk_rope_head_dim \
            + nh * qk + 2 * nh * cfg.v_head_dim
    else:
        q = cfg.q_size // tp
        kv = kv_heads_per_rank(cfg, tp) * cfg.head_dim
        attn = 2 * q + 2 * kv
    mlp = 0.0
    for i in range(cfg.num_hidden_layers):
        if cfg.moe_layers[i]:
            shared_i = cfg.shared_expert_intermediate_size + cfg.n_shared_experts * cfg.moe_intermediate_size
            m = cfg.num_experts_per_tok * (h + 3 * cfg.moe_intermediate_size) + 3 * shared_i / tp \
                + cfg.num_experts
        else:
            m = 3 * cfg.intermediate_size / tp
        mlp = max(mlp, m)
    per_token = 2 * h + max(attn, mlp)
    layer_peak = t * per_token * dtype_bytes
    logits = num_sampled * cfg.vocab_size * 4
    return {"layer_peak": layer_peak, "logits": logits, "total": layer_peak + logits,
            "per_token": per_token * dtype_bytes}
