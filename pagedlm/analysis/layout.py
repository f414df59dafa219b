"""A TP / PP / EP layout: validation and how layers split into pipeline stages."""

from __future__ import annotations

from pagedlm.config import ModelConfig


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_layout(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """Raise ValueError naming the value when ``cfg`` cannot be split ``tp`` x ``pp`` x ``ep`` ways."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        _positive(name, value)
    if cfg.num_attention_heads % tp:
        raise ValueError(f"--tp {tp} does not divide num_attention_heads ({cfg.num_attention_heads})")
    kv = cfg.num_key_value_heads
    if not cfg.is_mla and kv % tp and tp % kv:
        raise ValueError(f"--tp {tp} neither divides nor is a multiple of num_key_value_heads ({kv})")
    if not all(cfg.moe_layers) and cfg.intermediate_size % tp:
        raise ValueError(f"--tp {tp} does not divide intermediate_size ({cfg.intermediate_size})")
    if cfg.is_moe and ep == 1 and cfg.moe_intermediate_size % tp:
        raise ValueError(f"--tp {tp} does not divide moe_intermediate_size ({cfg.moe_intermediate_size})")
    if pp > cfg.num_hidden_layers:
        raise ValueError(f"--pp {pp} is more than num_hidden_layers ({cfg.num_hidden_layers})")
    if ep > 1:
        if not cfg.is_moe:
            raise ValueError(f"--ep {ep} needs a mixture-of-experts model; {cfg.architecture} is dense")
        if cfg.num_experts % ep:
            raise ValueError(f"--ep {ep} does not divide num_experts ({cfg.num_experts})")


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per pipeline stage; the first ``num_layers % pp`` stages get one more."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads one TP rank stores: split when tp divides them, else each rank keeps one (replicated)."""
    return max(1, cfg.num_key_value_heads // tp)
