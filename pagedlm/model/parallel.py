"""The parallel state a model is built for: which shard of each layer this process holds.

Model code receives it, it does not look it up: ``build_model(..., parallel=state)`` builds the
layers inside ``parallel_scope(state)`` and each layer reads ``current_parallel_state()`` once, in
its constructor, to size its shards and keep its process groups. The distributed package creates
the state (``distributed/worker.py``); the model package never imports it at module level (its
collectives are imported where a sharded layer calls them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None


SINGLE_PROCESS = ParallelState()
_scopes: list[ParallelState] = []


@contextlib.contextmanager
def parallel_scope(state: ParallelState | None):
    """Layers constructed inside take their shards from ``state`` (None: one process)."""
    _scopes.append(state or SINGLE_PROCESS)
    try:
        yield
    finally:
        _scopes.pop()


def current_parallel_state() -> ParallelState:
    return _scopes[-1] if _scopes else SINGLE_PROCESS
