"""This process's place in the parallel layout (set once by the worker at start-up).

Layers read it at construction to size their shards; the collectives they issue go through
``pagedlm.distributed.comm`` so they can be counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None


_state = ParallelState()


def get_parallel_state() -> ParallelState:
    return _state


def set_parallel_state(state: ParallelState) -> None:
    global _state
    _state = state
