"""FLOPs of prefill and decode, the seeds' training-forward formula, and a roofline.

Convention: a matmul of (m x k) by (k x n) is ``2 m k n`` FLOPs (one multiply and one add per
term; the notes' exact ``m n (2k - 1)`` differs by ``m n``, the adds of a bias-free first term).
Matmul FLOPs are ``2 * weights * tokens`` over every linear layer a token passes through
(projections, dense MLP or its top-k experts and shared experts, the router, and lm_head only
for the tokens whose logits are computed). Attention FLOPs are the two matmuls against the
cache, ``Q K^T`` and ``P V``: per query and key ``2 * heads * (qk_dim + v_dim)``. GQA changes
the K/V projections (``kv_heads``) but not this term: every query head still scores every key.
Causal prefill of ``s`` tokens after ``c`` cached ones scores ``sum_{p=c+1}^{c+s} p`` keys
(``s (s + 1) / 2`` from an empty cache), a sliding layer ``min(p, window)`` each. Norms,
RoPE, softmax and activations are not counted (a few per element, not per weight).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedlm.config import ModelConfig


@dataclass(frozen=True)
class Flops:
    matmul: int  # every linear layer, lm_head included
    attention: int  # Q K^T and P V
    lm_head: int  # the part of ``matmul`` that is the lm_head

    @property
    def total(self) -> int:
        return self.matmul + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.matmul + other.matmul, self.attention + other.attention,
                     self.lm_head + other.lm_head)

    def __mul__(self, k: int) -> Flops:
        return Flops(self.matmul * k, self.attention * k, self.lm_head * k)

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, int]:
        return {"matmul": self.matmul, "attention": self.attention, "lm_head": self.lm_head,
                "total": self.total}


def attention_matmul_weights(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    if cfg.is_mla:
        nh, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = h * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk if cfg.q_lora_rank else h * nh * qk
        return (q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * h)
    return 2 * h * cfg.q_size + 2 * h * cfg.kv_size


def mlp_matmul_weights(cfg: ModelConfig, layer: int) -> int:
    """Weights of the MLP block one token multiplies by: dense MLP, or router + top-k + shared."""
    h = cfg.hidden_size
    per = 3 if cfg.gated_mlp else 2
    if not cfg.moe_layers[layer]:
        return per * h * cfg.intermediate_size
    n = h * cfg.num_experts + cfg.num_experts_per_tok * per * h * cfg.moe_intermediate_size
    if cfg.architecture == "Qwen2MoeForCausalLM":
        n += per * h * cfg.shared_expert_intermediate_size + h  # shared expert and its gate
    n += cfg.n_shared_experts * per * h * cfg.moe_intermediate_size
    return n


def matmul_weights_per_token(cfg: ModelConfig) -> int:
    """Weights one token multiplies by in the decoder layers (lm_head not included)."""
    attn = attention_matmul_weights(cfg)
    return sum(attn + mlp_matmul_weights(cfg, i) for i in range(cfg.num_hidden_layers))


def attention_flops_per_key(cfg: ModelConfig, mla_absorbed: bool = False) -> int:
    """FLOPs of one query scoring and reading one key, over all heads (one layer)."""
    nh = cfg.num_attention_heads
    if cfg.is_mla:
        if mla_absorbed:  # scores against the latent + rope key, values read from the latent
            return 2 * nh * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        return 2 * nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 4 * nh * cfg.head_dim


def keys_scored(start: int, n: int, window: int | None = None) -> int:
    """``sum_{p=start+1}^{start+n} min(p, window)``: keys seen by n causal queries after start cached."""
    if n <= 0:
        return 0
    lo, hi = start + 1, start + n
    if window is None or hi <= window:
        return (lo + hi) * n // 2
    if lo > window:
        return n * window
    below = (lo + window) * (window - lo + 1) // 2  # positions lo..window
    return below + (hi - window) * window


def forward_flops(cfg: ModelConfig, new_tokens: int, context: int = 0, logits_tokens: int = 1,
                  causal: bool = True, mla_absorbed: bool = False) -> Flops:
    """FLOPs of one sequence's forward over ``new_tokens`` tokens after ``context`` cached ones.

    ``causal=False`` scores every query against all ``context + new_tokens`` keys (the notes'
    ``s^2``, what a training forward without causal skipping computes).
    """
    matmul = 2 * new_tokens * matmul_weights_per_token(cfg)
    lm_head = 2 * logits_tokens * cfg.hidden_size * cfg.vocab_size
    per_key = attention_flops_per_key(cfg, mla_absorbed)
    attn = 0
    for i in range(cfg.num_hidden_layers):
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        if causal:
            keys = keys_scored(context, new_tokens, window)
        else:
            keys = new_tokens * min(context + new_tokens, window or (context + new_tokens))
        attn += per_key * keys
    return Flops(matmul + lm_head, attn, lm_head)


def prefill_flops(cfg: ModelConfig, batch: int, seq: int) -> Flops:
    """Prefill of ``batch`` prompts of ``seq`` tokens, logits for the last token of each."""
    return batch * forward_flops(cfg, seq, 0, logits_tokens=1)


def decode_flops(cfg: ModelConfig, context: int) -> Flops:
    """One decode token that attends to ``context`` keys (itself included), logits computed.

    DeepSeek-V3 decodes in MLA's absorbed form (attention over the latent cache).
    """
    return forward_flops(cfg, 1, max(context - 1, 0), logits_tokens=1,
                         mla_absorbed=cfg.is_mla)


def training_forward_flops_exact(cfg: ModelConfig, batch: int, seq: int) -> Flops:
    """Our count of what the notes' training-forward formula describes: logits for every token and
    the full ``s x s`` score matrix (no causal skipping)."""
    return batch * forward_flops(cfg, seq, 0, logits_tokens=seq, causal=False)


def seeds_training_forward_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """The lecture notes' formula, verbatim (seeds/002, section 14):

    ``layers * (6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2) + layers * 6bshi + 2bshv``

    It assumes multi-head attention (K and V are h x h) and a dense SwiGLU MLP of width i, and
    counts softmax as ``3 b s^2 n``. Exact for MHA models up to that softmax term; it
    over-counts GQA models' K/V projections by ``layers * 4 b s h (h - kv_heads * head_dim)``.
    """
    b, s, h = batch, seq, cfg.hidden_size
    n, i, v, L = cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    return L * (6 * b * s * h * h + 4 * b * s * s * h + 3 * b * s * s * n + 2 * b * s * h * h) \
        + L * 6 * b * s * h * i + 2 * b * s * h * v


def seeds_softmax_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """The notes' softmax term, ``layers * 3 b s^2 n`` (not a matmul; not in our attention count)."""
    return cfg.num_hidden_layers * 3 * batch * seq * seq * cfg.num_attention_heads
