"""Collectives used by the parallel layers, counted so tests can compare them with the
arithmetic of ``pagedlm inspect`` (``pagedlm.analysis.comm``): calls, payload bytes and seconds
per kind.

Payload bytes follow the analysis' definition, the size of the tensor one rank hands to the call:
all-reduce its buffer, all-to-all its send buffer, send / recv the message. For all-gather it is
the gathered (output) size, since the analysis' ring cost ``(n - 1) / n x payload`` is written in
terms of the whole gathered tensor.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.distributed as dist

calls: Counter = Counter()
nbytes: Counter = Counter()
seconds: Counter = Counter()


def reset_counters() -> None:
    calls.clear()
    nbytes.clear()
    seconds.clear()


def snapshot() -> dict[str, dict[str, float]]:
    """Counters as plain dicts: ``{kind: {"calls", "bytes", "seconds"}}``."""
    return {k: {"calls": calls[k], "bytes": nbytes[k], "seconds": seconds[k]} for k in calls}


def _count(kind: str, t: torch.Tensor, t0: float) -> None:
    calls[kind] += 1
    nbytes[kind] += t.numel() * t.element_size()
    seconds[kind] += time.perf_counter() - t0


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    t0 = time.perf_counter()
    dist.all_reduce(t, group=group)
    _count("all_reduce", t, t0)
    return t


def all_gather_last_dim(t: torch.Tensor, group=None) -> torch.Tensor:
    t0 = time.perf_counter()
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    out = torch.cat(parts, dim=-1)
    _count("all_gather", out, t0)
    return out


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None, group=None) -> torch.Tensor:
    t0 = time.perf_counter()
    dist.all_to_all_single(output, input.contiguous(), output_split_sizes, input_split_sizes, group=group)
    _count("all_to_all", input, t0)
    return output


def send(t: torch.Tensor, dst: int) -> None:
    t0 = time.perf_counter()
    dist.send(t.contiguous(), dst)
    _count("send", t, t0)


def recv(t: torch.Tensor, src: int) -> torch.Tensor:
    t0 = time.perf_counter()
    dist.recv(t, src)
    _count("recv", t, t0)
    return t
