"""Where each rank sits in a TP x EP x PP layout, and which layouts a model accepts.

Ranks are numbered ``rank = (pp_rank * ep + ep_rank) * tp + tp_rank``: the TP ranks of one
replica are neighbours, EP replicas of one stage follow each other, stages come last.

* TP shards attention heads (KV heads replicated when fewer than ranks), MLPs and the
  vocabulary; each replica's TP ranks see the same tokens.
* EP splits the experts of every MoE layer across ``ep`` replicas that hold *different*
  sequences (data-parallel attention, each replica with its own KV cache); tokens meet their
  experts through all-to-all. The ranks with the same ``tp_rank`` form an EP group.
* PP splits the layers into contiguous stages (``analysis.layout.stage_layers``); hidden states
  go from stage to stage with send / recv.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedlm.analysis.layout import stage_layers, validate_layout
from pagedlm.config import ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} size must be a positive integer, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, ep_rank, tp_rank) of a global rank."""
        return rank // (self.ep * self.tp), rank // self.tp % self.ep, rank % self.tp

    def rank_of(self, pp_rank: int, ep_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.ep + ep_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e, t) for t in range(self.tp)] for p in range(self.pp) for e in range(self.ep)]

    def ep_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e, t) for e in range(self.ep)] for p in range(self.pp) for t in range(self.tp)]

    def output_ranks(self) -> list[int]:
        """Ranks that hand logits back to the scheduler: TP rank 0 of the last stage, per EP replica."""
        return [self.rank_of(self.pp - 1, e, 0) for e in range(self.ep)]

    def stage_kwargs(self, cfg: ModelConfig, pp_rank: int) -> dict:
        if self.pp == 1:
            return {}
        layers = stage_layers(cfg.num_hidden_layers, self.pp)[pp_rank]
        return {"layers": layers, "first": pp_rank == 0, "last": pp_rank == self.pp - 1}

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ValueError naming the value when ``cfg`` cannot run under this layout."""
        if not cfg.runnable:
            raise ValueError(f"{cfg.architecture} is not runnable by the engine")
        validate_layout(cfg, self.tp, self.pp, self.ep)
        tp = self.tp
        if cfg.is_moe and cfg.moe_intermediate_size % tp:
            raise ValueError(f"--tensor-parallel-size {tp} does not divide moe_intermediate_size "
                             f"({cfg.moe_intermediate_size})")
        if cfg.shared_expert_intermediate_size % tp:
            raise ValueError(f"--tensor-parallel-size {tp} does not divide shared_expert_intermediate_size "
                             f"({cfg.shared_expert_intermediate_size})")
        if self.ep > 1 and self.pp > 1:
            raise ValueError("expert parallelism with pipeline parallelism is not supported; "
                             f"got --expert-parallel-size {self.ep} and --pipeline-parallel-size {self.pp}")
