"""Roofline estimates: time = max(FLOPs / peak, bytes moved / bandwidth), ideal, no communication.

``devices`` is how many accelerators work on one step at once (``tp * ep``; pipeline stages run
one after another, so PP adds capacity but not speed for one micro-batch).
Bytes moved: the weights a step reads once (for MoE only the experts its tokens are routed to:
``E * (1 - (1 - k/E)^tokens)`` expected distinct experts per layer, uniform routing) plus the KV
cache read (decode) or written (prefill).
"""

from __future__ import annotations

from pagedlm.analysis.flops import decode_flops, prefill_flops
from pagedlm.analysis.hardware import Hardware
from pagedlm.analysis.memory import kv_cache_bytes
from pagedlm.analysis.params import ParamCount, count_parameters
from pagedlm.config import ModelConfig


def expected_distinct_experts(cfg: ModelConfig, tokens: int) -> float:
    if not cfg.is_moe:
        return 0.0
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** tokens)


def weight_bytes_read(cfg: ModelConfig, tokens: int, dtype_bytes: float,
                      params: ParamCount | None = None) -> float:
    p = params or count_parameters(cfg)
    dense = p.total - p.experts
    if not cfg.is_moe:
        return dense * dtype_bytes
    moe_layers = sum(cfg.moe_layers)
    one_expert = p.experts / (moe_layers * cfg.num_experts)
    return (dense + moe_layers * one_expert * expected_distinct_experts(cfg, tokens)) * dtype_bytes


def _time(flops: float, nbytes: float, hw: Hardware, devices: int) -> dict[str, float]:
    t_compute = flops / (hw.peak_flops * devices)
    t_memory = nbytes / (hw.bandwidth * devices)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes if nbytes else float("inf"),
            "compute_s": t_compute, "memory_s": t_memory, "time_s": max(t_compute, t_memory),
            "bound": "compute" if t_compute >= t_memory else "memory"}


def prefill_roofline(cfg: ModelConfig, hw: Hardware, batch: int, seq: int, dtype_bytes: float,
                     kv_dtype_bytes: float, devices: int = 1, params: ParamCount | None = None) -> dict:
    flops = prefill_flops(cfg, batch, seq).total
    nbytes = weight_bytes_read(cfg, batch * seq, dtype_bytes, params) + kv_cache_bytes(
        cfg, batch, seq, kv_dtype_bytes)
    return _time(flops, nbytes, hw, devices)


def decode_roofline(cfg: ModelConfig, hw: Hardware, batch: int, context: int, dtype_bytes: float,
                    kv_dtype_bytes: float, devices: int = 1, params: ParamCount | None = None) -> dict:
    """One decode step of ``batch`` sequences, each token attending to ``context`` keys."""
    flops = batch * decode_flops(cfg, context).total
    nbytes = weight_bytes_read(cfg, batch, dtype_bytes, params) + kv_cache_bytes(
        cfg, batch, context, kv_dtype_bytes)
    out = _time(flops, nbytes, hw, devices)
    out["tokens_per_s"] = batch / out["time_s"]
    return out


def max_memory_bound_batch(cfg: ModelConfig, hw: Hardware, context: int, dtype_bytes: float,
                           kv_dtype_bytes: float, devices: int = 1, params: ParamCount | None = None,
                           limit: int = 1 << 24) -> int | None:
    """Largest decode batch that is still memory-bound; None if it never turns compute-bound
    below ``limit`` (each sequence's KV reads then cost more time than its FLOPs)."""
    p = params or count_parameters(cfg)

    def compute_bound(b: int) -> bool:
        r = decode_roofline(cfg, hw, b, context, dtype_bytes, kv_dtype_bytes, devices, p)
        return r["compute_s"] >= r["memory_s"]

    if compute_bound(1):
        return 0
    hi = 2
    while not compute_bound(hi):
        if hi >= limit:
            return None
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if compute_bound(mid):
            hi = mid
        else:
            lo = mid
    return lo
