"""Collective communication of one forward step under a TP / PP / EP layout.

The model (documented in docs/inspect.md; the engine's collective counters are tested against it):

* TP (``tp`` > 1), per decoder layer: one all-reduce after attention's ``o_proj`` and one after
  the MLP block's down projection (dense MLP, or the experts + shared expert of a MoE layer),
  each of ``num_tokens x hidden`` elements. Once per step: an all-reduce after the
  vocab-parallel embedding (first stage) and an all-gather of the logits of the
  ``num_sampled`` sampled tokens (``num_sampled x vocab``, last stage).
* EP (``ep`` > 1), per MoE layer: an all-to-all count exchange (one int64 per expert: each
  destination rank learns how many rows come for each of its experts, which it needs to run
  them grouped), an all-to-all dispatch of ``num_tokens x top_k`` hidden vectors and an all-to-all
  combine of as many. EP ranks hold different tokens (``num_tokens`` is per rank).
* PP (``pp`` > 1): per stage boundary and micro-batch, one send of the hidden states
  (``num_tokens / micro_batches x hidden``) by the earlier stage and one recv by the later.

``payload_bytes`` is the size of the tensors one rank hands to the collective calls (what a
counter in the engine sees); ``sent_bytes`` is what one rank puts on the wire with ring /
pairwise algorithms: all-reduce ``2 (n-1)/n``, all-gather and all-to-all ``(n-1)/n`` of it
(a uniform router keeps ``1/ep`` of dispatched tokens local). Rank 0's broadcast of each step's
batch (token ids, positions, block tables) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedlm.analysis.layout import stage_layers, validate_layout
from pagedlm.config import ModelConfig

KINDS = ("all_reduce", "all_gather", "all_to_all", "send", "recv")


@dataclass(frozen=True)
class Collective:
    purpose: str
    kind: str  # one of KINDS
    group: str  # "tp" | "ep" | "pp"
    stage: int  # pipeline stage whose ranks issue it
    calls: int
    payload_bytes: int
    sent_bytes: float  # per rank
    formula: str


@dataclass(frozen=True)
class KindTotal:
    calls: int
    payload_bytes: int
    sent_bytes: float


@dataclass(frozen=True)
class CommStep:
    tp: int
    pp: int
    ep: int
    num_tokens: int
    num_sampled: int
    micro_batches: int
    dtype_bytes: int
    collectives: tuple[Collective, ...]

    def by_kind(self, stage: int | None = None) -> dict[str, KindTotal]:
        """Totals per collective kind: over all stages, or issued by one rank of ``stage``."""
        out = {}
        for kind in KINDS:
            cs = [c for c in self.collectives if c.kind == kind and (stage is None or c.stage == stage)]
            out[kind] = KindTotal(sum(c.calls for c in cs), sum(c.payload_bytes for c in cs),
                                  sum(c.sent_bytes for c in cs))
        return out

    def calls(self, kind: str) -> int:
        return self.by_kind()[kind].calls

    def sent_bytes_per_token_per_device(self) -> float:
        """Bytes one rank of the busiest stage sends per token of the step."""
        worst = max(sum(t.sent_bytes for t in self.by_kind(s).values()) for s in range(self.pp))
        return worst / self.num_tokens

    def to_dict(self) -> dict:
        return {
            "layout": {"tp": self.tp, "pp": self.pp, "ep": self.ep},
            "num_tokens": self.num_tokens, "num_sampled": self.num_sampled,
            "micro_batches": self.micro_batches, "dtype_bytes": self.dtype_bytes,
            "by_kind": {k: vars(v) for k, v in self.by_kind().items()},
            "sent_bytes_per_token_per_device": self.sent_bytes_per_token_per_device(),
            "collectives": [vars(c) for c in self.collectives],
        }


def collectives_per_step(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, num_tokens: int = 1,
                         dtype_bytes: int = 2, num_sampled: int | None = None,
                         micro_batches: int = 1) -> CommStep:
    """Collective calls and bytes of one forward step of ``num_tokens`` tokens (see module doc).

    ``num_sampled`` (tokens whose logits are gathered) defaults to ``num_tokens``.
    """
    validate_layout(cfg, tp, pp, ep)
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if micro_batches < 1 or (pp > 1 and num_tokens % micro_batches):
        raise ValueError(f"micro_batches ({micro_batches}) must be positive and divide num_tokens ({num_tokens})")
    sampled = num_tokens if num_sampled is None else num_sampled
    h, t, b = cfg.hidden_size, num_tokens, dtype_bytes
    act = t * h * b
    out: list[Collective] = []
    stages = stage_layers(cfg.num_hidden_layers, pp)
    for s, layers in enumerate(stages):
        n_layers = len(layers)
        n_moe = sum(cfg.moe_layers[i] for i in layers)
        if tp > 1:
            ar = 2 * (tp - 1) / tp
            if s == 0:
                out.append(Collective("embedding (vocab-parallel)", "all_reduce", "tp", s, 1, act, ar * act,
                                      "1 x tokens*hidden*bytes"))
            out.append(Collective("attention o_proj", "all_reduce", "tp", s, n_layers, n_layers * act,
                                  n_layers * ar * act, "layers x tokens*hidden*bytes"))
            out.append(Collective("mlp down_proj", "all_reduce", "tp", s, n_layers, n_layers * act,
                                  n_layers * ar * act, "layers x tokens*hidden*bytes"))
            if s == pp - 1 and sampled:
                logits = sampled * cfg.vocab_size * b
                out.append(Collective("logits (vocab-parallel)", "all_gather", "tp", s, 1, logits,
                                      (tp - 1) / tp * logits, "1 x sampled*vocab*bytes"))
        if ep > 1 and n_moe:
            a2a = (ep - 1) / ep
            routed = t * cfg.num_experts_per_tok * h * b
            counts = cfg.num_experts * 8
            out.append(Collective("moe count exchange", "all_to_all", "ep", s, n_moe, n_moe * counts,
                                  n_moe * a2a * counts, "moe_layers x num_experts*8 (int64 counts)"))
            for what in ("moe dispatch", "moe combine"):
                out.append(Collective(what, "all_to_all", "ep", s, n_moe, n_moe * routed, n_moe * a2a * routed,
                                      "moe_layers x tokens*top_k*hidden*bytes"))
        if pp > 1:
            chunk = t // micro_batches * h * b
            if s < pp - 1:
                out.append(Collective("pp hidden states", "send", "pp", s, micro_batches,
                                      micro_batches * chunk, micro_batches * chunk,
                                      "micro_batches x (tokens/micro_batches)*hidden*bytes"))
            if s > 0:
                out.append(Collective("pp hidden states", "recv", "pp", s, micro_batches,
                                      micro_batches * chunk, 0.0,
                                      "micro_batches x (tokens/micro_batches)*hidden*bytes"))
    collectives = tuple(c for c in out if c.calls)
    return CommStep(tp, pp, ep, t, sampled, micro_batches, b, collectives)
