"""Sparse mixture-of-experts MLP: Mixtral (top-2 of 8, renormalised), Qwen2-MoE / Qwen3-MoE
(top-k, ``norm_topk_prob``, optional shared expert behind a sigmoid gate) and DeepSeek-V2 / V3
(group-limited softmax / sigmoid routers, ``routed_scaling_factor``, ungated shared experts).

Parameters follow transformers 5's module names, which fuse the experts into 3-D tensors::

    mlp.gate.weight                 (experts, hidden)                      router
    mlp.experts.gate_up_proj        (local_experts, 2 * inter / tp, hidden)
    mlp.experts.down_proj           (local_experts, hidden, inter / tp)
    mlp.shared_expert.{gate_up_proj,down_proj}, mlp.shared_expert_gate.weight   (Qwen2-MoE)
    mlp.shared_experts.{gate_up_proj,down_proj}, mlp.gate.e_score_correction_bias   (DeepSeek)

Checkpoints on disk (also those written by transformers 5's ``save_pretrained``) keep the older
per-expert layout (``experts.N.w1/w2/w3`` under ``block_sparse_moe`` for Mixtral,
``experts.N.gate_proj/up_proj/down_proj`` for Qwen); ``remap_moe`` maps both, fused 3-D
tensors, and one part of every expert as a 3-D tensor (GGUF's ``ffn_{gate,up,down}_exps``) onto
the parameters above.

Compute is batched over tokens: the (token, expert) pairs are sorted by expert id and each expert
runs once on its contiguous slice of rows. Parallelism:

* TP (``tp_size`` > 1): every expert's intermediate dimension (and the shared expert's) is split
  across the TP ranks; one all-reduce of ``tokens x hidden`` ends the block.
* EP (``ep_size`` > 1): experts are partitioned across EP ranks, which hold different tokens.
  Per layer: an all-to-all of the per-expert row counts, an all-to-all dispatch of the
  ``tokens x top_k`` hidden rows (sorted by expert, so by destination rank) and an all-to-all
  combine that brings the expert outputs back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from pagedlm.config import ModelConfig
from pagedlm.model.layers.basic import act_fn
from pagedlm.model.layers.linear import ReplicatedLinear, _copy_checked
from pagedlm.model.layers.matmul import linear
from pagedlm.model.layers.quant import QuantizedWeight, current_weight_dtype, quantize_int4, quantize_int8
from pagedlm.model.parallel import current_parallel_state


class FusedExperts(nn.Module):
    """This rank's experts as two 3-D tensors; shard ids are ``(expert, part)`` with part 0 = gate
    (w1), 1 = up (w3) for ``gate_up_proj`` and part 0 for ``down_proj`` (w2)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, act: str):
        super().__init__()
        ps = current_parallel_state()
        if num_experts % ps.ep_size:
            raise ValueError(f"expert parallel size {ps.ep_size} does not divide num_experts {num_experts}")
        if inter % ps.tp_size:
            raise ValueError(f"tensor parallel size {ps.tp_size} does not divide the expert intermediate size {inter}")
        self.num_experts = num_experts
        self.num_local = num_experts // ps.ep_size
        self.first = ps.ep_rank * self.num_local
        self.tp_rank, self.tp_size = ps.tp_rank, ps.tp_size
        self.inter = inter // ps.tp_size  # this rank's slice of each expert's intermediate dim
        wd = current_weight_dtype()
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * self.inter, hidden, dtype=wd),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(self.num_local, hidden, self.inter, dtype=wd), requires_grad=False)
        self.gate_up_proj.weight_loader = self.weight_loader
        self.down_proj.weight_loader = self.weight_loader
        self.act = act_fn(act)
        # Set by the build (layers/quant.py): "none", "int8" or "int4" for every local expert.
        self.quant_kind = "none"
        self.qweights: dict[str, list[QuantizedWeight]] = {}

    def process_weights_after_loading(self, compute_dtype: torch.dtype):
        """Quantize each local expert's two matrices; the dense tensors become their exact
        dequantization (the many-rows path multiplies the same weights)."""
        if self.quant_kind == "none":
            return
        fn = quantize_int4 if self.quant_kind == "int4" else quantize_int8
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(self, name)
            qs = [fn(param.data[e], compute_dtype) for e in range(self.num_local)]
            param.data = torch.stack([q.dense for q in qs])
            self.qweights[name] = qs
            for q in qs:
                yield self.quant_kind, q

    def _mm(self, h: torch.Tensor, name: str, e: int) -> torch.Tensor:
        if self.qweights:
            return self.qweights[name][e].mm(h)
        return linear(h, getattr(self, name)[e])

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.num_local

    def checkpoint_shards(self, pname: str) -> set:
        """Shard ids the loader must see for parameter ``pname`` (only this rank's experts)."""
        parts = (0, 1) if pname == "gate_up_proj" else (0,)
        return {(e, p) for e in range(self.first, self.first + self.num_local) for p in parts}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        expert, part = shard_id
        what = f"{getattr(param, '_pagedlm_name', 'experts')}[{expert}]"
        local = param.data[expert - self.first]
        if param is self.gate_up_proj:  # loaded: (inter, hidden) of w1 or w3
            loaded = loaded.narrow(0, self.tp_rank * self.inter, self.inter) if self.tp_size > 1 else loaded
            _copy_checked(local.narrow(0, part * self.inter, self.inter), loaded, what)
        else:  # loaded: (hidden, inter) of w2
            loaded = loaded.narrow(1, self.tp_rank * self.inter, self.inter) if self.tp_size > 1 else loaded
            _copy_checked(local, loaded, what)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: (rows, hidden) sorted by local expert, ``counts[e]`` rows each -> (rows, hidden)
        partial sums (over this rank's slice of the intermediate dim)."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = x[start:start + n]
                gate, up = self._mm(h, "gate_up_proj", e).chunk(2, dim=-1)  # (n, inter) each
                out[start:start + n] = self._mm(self.act(gate) * up, "down_proj", e)
                start += n
        return out


class SharedExpert(nn.Module):
    """A dense gated MLP whose down projection is left un-reduced (the MoE block reduces once)."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        from pagedlm.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2)
        self.down_proj = RowParallelLinear(inter, hidden)
        self.act = act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        d = self.down_proj  # partial sum under TP: the block reduces once
        return d.quant_method.apply(d, self.act(gate) * up, d.weight, None)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ps = current_parallel_state()
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.ep_size, self.ep_group = ps.ep_size, ps.ep_group
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.router = cfg.router
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        if cfg.router not in ("softmax", "softmax_group", "sigmoid_group"):
            raise ValueError(f"unknown MoE router {cfg.router!r}")
        if cfg.num_experts % cfg.n_group:
            raise ValueError(f"n_group {cfg.n_group} does not divide the {cfg.num_experts} experts")
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False)
        if cfg.router == "sigmoid_group":  # DeepSeek-V3: a per-expert bias on the choice only (float32)
            self.gate.e_score_correction_bias = nn.Parameter(torch.empty(cfg.num_experts, dtype=torch.float32),
                                                             requires_grad=False)
        self.experts = FusedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.has_shared = cfg.shared_expert_intermediate_size > 0
        if self.has_shared:  # Qwen2-MoE: one shared expert behind a sigmoid gate
            self.shared_expert = SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, bias=False)
        self.n_shared = cfg.n_shared_experts
        if self.n_shared:  # DeepSeek: n shared experts as one MLP, added ungated
            self.shared_experts = SharedExpert(cfg.hidden_size, cfg.moe_intermediate_size * self.n_shared,
                                               cfg.hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each (tokens, top_k), in float32:

        softmax        top-k of the softmax, renormalised when ``norm_topk_prob`` (Mixtral, Qwen)
        softmax_group  DeepSeek-V2 group_limited_greedy: only the ``topk_group`` groups with the
                       highest expert probability compete
        sigmoid_group  DeepSeek-V3 noaux_tc: sigmoid scores; the choice adds
                       ``e_score_correction_bias`` and keeps the groups with the best sum of their
                       top-2; the weights are the uncorrected scores, renormalised
        then all times ``routed_scaling_factor``."""
        logits = self.gate(x).float()  # (tokens, experts)
        if self.router == "sigmoid_group":
            scores = logits.sigmoid()
            choice = self._limit_groups(scores + self.gate.e_score_correction_bias,
                                        lambda g: g.topk(2, dim=-1)[0].sum(-1), float("-inf"))
            ids = torch.topk(choice, self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
            eps = 1e-20  # as the reference: a zero sum cannot divide by zero
        else:
            scores = torch.softmax(logits, dim=-1)
            if self.router == "softmax_group":
                scores = self._limit_groups(scores, lambda g: g.amax(-1), 0.0)
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
            eps = 0.0
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return weights.to(x.dtype), ids

    def _limit_groups(self, scores: torch.Tensor, group_score, fill: float) -> torch.Tensor:
        """``scores`` with the experts outside each token's ``topk_group`` best groups set to ``fill``."""
        if self.n_group == 1:
            return scores
        grouped = scores.view(scores.shape[0], self.n_group, -1)  # (tokens, groups, experts per group)
        best = torch.topk(group_score(grouped), self.topk_group, dim=-1)[1]
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], fill).view_as(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        flat = ids.flatten()  # (tokens * top_k,) expert of each (token, k) pair
        order = torch.argsort(flat, stable=True)  # group the pairs by expert
        token = order // self.top_k
        rows = x[token]  # (tokens * top_k, hidden), sorted by expert
        # One host sync per layer: the expert loop needs its slice sizes.
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.ep_size == 1:
            out = self.experts(rows, counts.tolist())
        else:
            out = self._expert_parallel(rows, counts)
        out = out * weights.flatten()[order, None]
        y = torch.zeros_like(x).index_add_(0, token, out)  # (tokens, hidden)
        if self.has_shared:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.n_shared:
            y = y + self.shared_experts(x)
        if self.tp_size > 1:
            from pagedlm.distributed.comm import all_reduce

            all_reduce(y, self.tp_group)
        return y

    def _expert_parallel(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Dispatch rows (sorted by expert, hence by owning rank) to the experts' ranks, run the
        local experts, and return the outputs in the original row order."""
        from pagedlm.distributed.comm import all_to_all_single

        ep, local = self.ep_size, self.experts.num_local
        send_counts = counts.view(ep, local)  # rows for each destination rank's experts
        recv_counts = torch.empty_like(send_counts)
        all_to_all_single(recv_counts, send_counts, group=self.ep_group)  # (source rank, local expert)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = rows.new_empty(sum(recv_splits), rows.shape[1])
        all_to_all_single(received, rows, recv_splits, send_splits, group=self.ep_group)
        # Received rows are grouped by source rank, then by expert: regroup by expert.
        src_expert = torch.repeat_interleave(
            torch.arange(ep * local, device=rows.device) % local, recv_counts.flatten())
        regroup = torch.argsort(src_expert, stable=True)
        out = torch.empty_like(received)
        out[regroup] = self.experts(received[regroup], recv_counts.sum(0).tolist())
        back = rows.new_empty(rows.shape)
        all_to_all_single(back, out, send_splits, recv_splits, group=self.ep_group)
        return back


# ---- checkpoint names ------------------------------------------------------------------------

_PER_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.mlp)\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)$")
_PART = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
         "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}


def remap_moe(name: str, tensor: torch.Tensor, experts_of) -> Iterator[tuple[str, torch.Tensor, object]] | None:
    """Map an expert tensor of any layout to ``(parameter, tensor, (expert, part))`` items, skipping
    experts this rank does not own; None when ``name`` is not an expert tensor.

    ``experts_of(prefix)`` returns the ``FusedExperts`` module at ``prefix + '.experts'``.
    """
    name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's older module name
    m = _PER_EXPERT.match(name)
    if m:
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        pname, part = _PART[kind]
        mod = experts_of(prefix)
        return iter([(f"{prefix}.experts.{pname}", tensor, (e, part))] if mod is None or mod.owns(e) else [])
    m = _FUSED.match(name)
    if m:
        prefix, pname = m.groups()
        mod = experts_of(prefix)
        items = []
        for e in range(tensor.shape[0]):
            if mod is not None and not mod.owns(e):
                continue
            if pname == "gate_up_proj":  # (experts, 2 * inter, hidden): gate rows then up rows
                gate, up = tensor[e].chunk(2, dim=0)
                items += [(f"{prefix}.experts.gate_up_proj", gate, (e, 0)),
                          (f"{prefix}.experts.gate_up_proj", up, (e, 1))]
            elif pname in ("gate_proj", "up_proj"):  # one part of every expert (GGUF ffn_*_exps)
                items.append((f"{prefix}.experts.gate_up_proj", tensor[e], (e, _PART[pname][1])))
            else:
                items.append((f"{prefix}.experts.down_proj", tensor[e], (e, 0)))
        return iter(items)
    return None


def rename_moe(name: str) -> str:
    """Non-expert names under Mixtral's ``block_sparse_moe`` (its router) live under ``mlp``."""
    return name.replace(".block_sparse_moe.", ".mlp.")
