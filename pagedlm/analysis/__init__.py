"""LLM arithmetic from a :class:`~pagedlm.config.ModelConfig`: parameters, memory, FLOPs, roofline,
and the collectives of a TP / PP / EP layout. Pure Python: importing it never loads torch."""

from pagedlm.analysis.comm import CommStep, collectives_per_step
from pagedlm.analysis.flops import Flops, decode_flops, forward_flops, prefill_flops
from pagedlm.analysis.memory import kv_cache_bytes, kv_cache_bytes_per_token, max_seq_in_budget
from pagedlm.analysis.params import ParamCount, count_parameters

__all__ = [
    "CommStep",
    "Flops",
    "ParamCount",
    "collectives_per_step",
    "count_parameters",
    "decode_flops",
    "forward_flops",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "max_seq_in_budget",
    "prefill_flops",
]
