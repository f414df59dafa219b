"""Exact parameter counts from a :class:`~pagedlm.config.ModelConfig`, by component and per layer.

Counts are what the checkpoint holds, tensor by tensor (the same numbers as
``sum(p.numel() for p in model.parameters())`` for the HF model, which counts a tied
embedding once). One exception, kept visible as its own component: DeepSeek-V3's router
``e_score_correction_bias`` is a tensor in the checkpoint but a buffer in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedlm.config import ModelConfig

COMPONENTS = ("embedding", "position_embedding", "attention", "mlp", "experts", "shared_experts",
              "router", "norms", "lm_head")


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer. ``experts`` is all routed experts of the layer."""

    index: int
    kind: str  # "dense" | "moe"
    attention: int
    mlp: int
    experts: int
    shared_experts: int
    router: int
    norms: int
    active_experts: int  # routed-expert parameters one token uses (top-k of them)

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.experts + self.shared_experts + self.router + self.norms

    @property
    def active(self) -> int:
        return self.total - self.experts + self.active_experts

    def shape_key(self) -> tuple[int, ...]:
        return (self.attention, self.mlp, self.experts, self.shared_experts, self.router, self.norms)


@dataclass(frozen=True)
class ParamCount:
    """Whole-model counts. ``total`` counts every stored tensor once (a tied lm_head is 0)."""

    embedding: int
    position_embedding: int
    final_norm: int
    lm_head: int
    tied: bool
    layers: tuple[LayerParams, ...] = field(repr=False)

    def _sum(self, name: str) -> int:
        return sum(getattr(layer, name) for layer in self.layers)

    @property
    def attention(self) -> int:
        return self._sum("attention")

    @property
    def mlp(self) -> int:
        return self._sum("mlp")

    @property
    def experts(self) -> int:
        return self._sum("experts")

    @property
    def shared_experts(self) -> int:
        return self._sum("shared_experts")

    @property
    def router(self) -> int:
        return self._sum("router")

    @property
    def norms(self) -> int:
        return self._sum("norms") + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.position_embedding + self.lm_head + self.final_norm + sum(
            layer.total for layer in self.layers)

    @property
    def active(self) -> int:
        """Parameters one token touches: everything but the routed experts it is not sent to."""
        return self.total - self.experts + self._sum("active_experts")

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.position_embedding - self.lm_head

    def breakdown(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "active": self.active,
            "non_embedding": self.non_embedding,
            "tied_embeddings": self.tied,
            "breakdown": self.breakdown(),
            "layers": [
                {"index": la.index, "kind": la.kind, "attention": la.attention, "mlp": la.mlp,
                 "experts": la.experts, "shared_experts": la.shared_experts, "router": la.router,
                 "norms": la.norms, "total": la.total, "active": la.active}
                for la in self.layers
            ],
        }


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _mlp(cfg: ModelConfig, inter: int) -> int:
    h, b = cfg.hidden_size, cfg.mlp_bias
    if cfg.gated_mlp:  # gate, up, down
        return 2 * _linear(h, inter, b) + _linear(inter, h, b)
    return _linear(h, inter, b) + _linear(inter, h, b)  # GPT-2: c_fc, c_proj


def _norm(cfg: ModelConfig, dim: int) -> int:
    return 2 * dim if cfg.norm_type == "layer" else dim  # LayerNorm has a bias, RMSNorm does not


def attention_params(cfg: ModelConfig) -> int:
    h = cfg.hidden_size
    if cfg.is_mla:  # multi-head latent attention
        nh = cfg.num_attention_heads
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * qk_dim  # q_a, q_a_norm, q_b
        else:
            q = h * nh * qk_dim
        kv = (h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv_a_proj_with_mqa
              + cfg.kv_lora_rank  # kv_a_layernorm
              + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))  # kv_b_proj
        return q + kv + nh * cfg.v_head_dim * h  # o_proj
    b = cfg.attention_bias
    n = (_linear(h, cfg.q_size, b) + 2 * _linear(h, cfg.kv_size, b)
         + _linear(cfg.q_size, h, cfg.o_proj_bias))
    if cfg.qk_norm:
        n += 2 * cfg.head_dim  # q_norm, k_norm: one weight of head_dim shared by all heads
    return n


def layer_params(cfg: ModelConfig, i: int) -> LayerParams:
    h = cfg.hidden_size
    norms = _norm(cfg, h) * (4 if cfg.post_norms else 2)
    attn = attention_params(cfg)
    if not cfg.moe_layers[i]:
        return LayerParams(i, "dense", attn, _mlp(cfg, cfg.intermediate_size), 0, 0, 0, norms, 0)
    one_expert = _mlp(cfg, cfg.moe_intermediate_size)
    router = h * cfg.num_experts  # the gate: hidden -> one logit per expert, no bias
    shared = 0
    if cfg.shared_expert_intermediate_size:
        # One shared expert of its own width, scaled by a sigmoid gate (hidden -> 1).
        shared = _mlp(cfg, cfg.shared_expert_intermediate_size) + h
    elif cfg.n_shared_experts:
        # DeepSeek: n_shared_experts experts fused into one MLP of n times the expert width.
        shared = _mlp(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)
    if cfg.router == "sigmoid_group":
        router += cfg.num_experts  # DeepSeek-V3's e_score_correction_bias (checkpoint tensor)
    return LayerParams(i, "moe", attn, 0, cfg.num_experts * one_expert, shared, router, norms,
                       cfg.num_experts_per_tok * one_expert)


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Exact parameter counts of ``cfg``'s model (see :class:`ParamCount`)."""
    emb = cfg.vocab_size * cfg.hidden_size
    pos = cfg.max_position_embeddings * cfg.hidden_size if cfg.position_embedding == "learned" else 0
    return ParamCount(
        embedding=emb,
        position_embedding=pos,
        final_norm=_norm(cfg, cfg.hidden_size),
        lm_head=0 if cfg.tie_word_embeddings else emb,
        tied=cfg.tie_word_embeddings,
        layers=tuple(layer_params(cfg, i) for i in range(cfg.num_hidden_layers)),
    )


def mtp_params(cfg: ModelConfig, num_nextn_predict_layers: int = 1) -> int:
    """DeepSeek-V3's multi-token-prediction module as stored in the published checkpoint.

    Per MTP layer: one full MoE decoder layer, ``enorm`` and ``hnorm`` (RMSNorm each), ``eh_proj``
    (2h -> h), and its own copies of the embedding, ``shared_head.norm`` and ``shared_head.head``.
    Not part of the model transformers (or pagedlm) runs; used only to reconcile 671B with 685B.
    """
    if not cfg.is_mla:
        raise ValueError(f"{cfg.architecture} has no multi-token-prediction module")
    h = cfg.hidden_size
    layer = layer_params(cfg, cfg.num_hidden_layers - 1)  # a routed (MoE) layer
    per = layer.total + 2 * h + 2 * h * h + 2 * cfg.vocab_size * h + h
    return num_nextn_predict_layers * per
