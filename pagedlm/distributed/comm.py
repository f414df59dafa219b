"""Collectives used by the parallel layers, counted so tests can compare them with the
arithmetic of ``pagedlm inspect`` (calls and bytes per kind)."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

calls: Counter = Counter()
nbytes: Counter = Counter()


def reset_counters() -> None:
    calls.clear()
    nbytes.clear()


def _count(kind: str, t: torch.Tensor) -> None:
    calls[kind] += 1
    nbytes[kind] += t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    _count("all_reduce", t)
    dist.all_reduce(t, group=group)
    return t


def all_gather_last_dim(t: torch.Tensor, group=None) -> torch.Tensor:
    _count("all_gather", t)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
