"""Detecting a torchrun launch (no torch import: the CLI calls this before anything heavy).

See ``pagedlm.distributed.torchrun`` for what the ranks then do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def detect() -> TorchrunEnv | None:
    """The torchrun environment of this process, if it was started by torchrun with more than
    one rank (torch is not imported: the CLI calls this before anything heavy)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "TORCHELASTIC_RUN_ID" not in env and "MASTER_ADDR" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        return TorchrunEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                           int(env.get("LOCAL_WORLD_SIZE", world)), env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"incomplete torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, "
                         f"MASTER_ADDR, MASTER_PORT): {e}") from e


def resolve_layout(env: TorchrunEnv, tp: int | None, pp: int | None, ep: int | None) -> tuple[int, int, int]:
    """(tp, pp, ep) filling what the user left out: TP inside a node, PP across nodes."""
    ep = ep or 1
    if tp is None and pp is None:
        tp = env.local_world_size // ep if env.local_world_size % ep == 0 else 1
        pp = env.world_size // (tp * ep)
    elif tp is None:
        tp = env.world_size // (pp * ep)
    elif pp is None:
        pp = env.world_size // (tp * ep)
    if tp * pp * ep != env.world_size:
        raise ValueError(f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} x --expert-parallel-size {ep} "
                         f"= {tp * pp * ep} ranks, but torchrun started WORLD_SIZE={env.world_size}")
    return tp, pp, ep
