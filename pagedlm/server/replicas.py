"""Data-parallel replicas behind one server: ``pagedlm serve --data-parallel-size D``.

``ReplicaRouter`` holds D ``AsyncLLMEngine``s (each its own ``LLMEngine``, own KV cache, own
TP/PP/EP ranks if any) and offers the ``AsyncLLMEngine`` surface the app uses, so the app does
not know whether it serves one engine or several.

Routing, per request: the replica holding the longest cached prefix of its prompt, else (no
prefix anywhere) the least loaded one (fewest requests in flight; ties to the lowest index).
The router keeps its own index of the prompt blocks it sent to each replica (chained hashes of
full ``block_size`` token blocks, the prefix cache's own unit, LRU-bounded): the replicas'
block managers belong to their engine threads and are never read from the event loop. A block
the replica has since evicted only costs a recompute there, never a wrong answer.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pagedlm.engine.async_engine import AsyncLLMEngine, RequestStream
from pagedlm.sampling_params import SamplingParams

METRIC_KEYS_SUMMED = ("num_requests_running", "num_requests_waiting", "num_free_blocks", "prefix_cache_queries",
                      "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens", "steps",
                      "prefill_tokens", "decode_tokens", "failed_requests", "core_restarts")


class PrefixIndex:
    """Chained hashes of the full prompt blocks sent to one replica (most recent last)."""

    def __init__(self, block_size: int, capacity: int):
        self.block_size, self.capacity = block_size, capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def chain(self, ids: list[int], root: object = 0) -> list[int]:
        """``root``: what the first block chains from (a LoRA adapter's id: blocks computed with
        different weights are different prefixes, as in the engine's prefix cache)."""
        out, h, bs = [], root, self.block_size
        for i in range(len(ids) // bs):
            h = hash((h, tuple(ids[i * bs:(i + 1) * bs])))
            out.append(h)
        return out

    def match(self, chain: list[int]) -> int:
        """How many leading blocks of ``chain`` this replica was sent."""
        n = 0
        for h in chain:
            if h not in self.blocks:
                break
            n += 1
        return n

    def add(self, chain: list[int]) -> None:
        for h in chain:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class ReplicaRouter:
    """The ``AsyncLLMEngine`` interface over several replicas."""

    def __init__(self, replicas: list[AsyncLLMEngine]):
        if not replicas:
            raise ValueError("at least one replica is needed")
        self.replicas = replicas
        self.engine = replicas[0].engine  # tokenizer, model config, limits: the same in every replica
        bs = self.engine.config.block_size
        self.indexes = [PrefixIndex(bs, r.engine.num_kv_blocks) for r in replicas]
        self.routed = [{"prefix": 0, "load": 0} for _ in replicas]
        self._where: dict[str, int] = {}  # request id -> replica, while in flight

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @property
    def draining(self) -> bool:
        return any(r.draining for r in self.replicas)

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    def decode_buckets(self) -> dict[str, str] | None:
        """Replica 0's decode buckets (every replica builds from the same cache entries)."""
        return self.replicas[0].decode_buckets()

    def health_error(self) -> str | None:
        problems = [f"replica {i}: {p}" for i, r in enumerate(self.replicas) if (p := r.health_error())]
        return "; ".join(problems) or None

    def stop_admitting(self) -> None:
        for r in self.replicas:
            r.stop_admitting()

    def drain(self) -> None:
        for r in self.replicas:
            r.drain()

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        for r in self.replicas:
            r.abort_all(reason)

    # ---- requests --------------------------------------------------------------------------
    def choose(self, prompt_token_ids: list[int] | None, root: object = 0) -> tuple[int, list[int], str]:
        """(replica, prompt block chain, reason): the longest routed prefix, else the least loaded.
        A dead replica is never chosen while another lives."""
        alive = [i for i, r in enumerate(self.replicas) if r.engine.dead is None] or list(range(len(self.replicas)))
        chain = self.indexes[0].chain(prompt_token_ids or [], root)
        load = {i: self.replicas[i].num_in_flight for i in alive}
        best = max(alive, key=lambda i: (self.indexes[i].match(chain), -load[i], -i))
        if self.indexes[best].match(chain) > 0:
            return best, chain, "prefix"
        return min(alive, key=lambda i: (load[i], i)), chain, "load"

    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                          prompt_token_ids: list[int] | None = None, lora_request=None) -> RequestStream:
        root = 0 if lora_request is None else ("lora", lora_request.lora_int_id)
        i, chain, reason = self.choose(prompt_token_ids, root)
        stream = await self.replicas[i].add_request(request_id, prompt, params, prompt_token_ids, lora_request)
        self.indexes[i].add(chain)
        self.routed[i][reason] += 1
        return stream

    def abort(self, request_id: str) -> None:
        for r in self.replicas:  # unknown ids are ignored by each replica
            r.abort(request_id)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on replica 0's engine thread (the app's tokenizer is replica 0's)."""
        return await self.replicas[0].call(fn)

    async def snapshot_state(self, include_blocks: bool = True) -> dict:
        """Replica 0's engine view (as ``call``)."""
        return await self.replicas[0].snapshot_state(include_blocks)

    async def block_detail(self, block_id: int) -> dict:
        return await self.replicas[0].block_detail(block_id)

    async def warm_structured(self) -> None:
        for r in self.replicas:
            await r.warm_structured()

    async def get_metrics(self) -> dict:
        """Summed engine metrics, with each replica's own under "replicas" (label engine="i")."""
        per = await asyncio.gather(*(r.get_metrics() for r in self.replicas))
        total: dict[str, Any] = {k: sum(m.get(k, 0) for m in per) for k in METRIC_KEYS_SUMMED}
        blocks = sum(r.engine.num_kv_blocks for r in self.replicas)
        total["kv_cache_usage"] = 1.0 - total["num_free_blocks"] / blocks
        for m, routed in zip(per, self.routed):
            m["routed_by_prefix"], m["routed_by_load"] = routed["prefix"], routed["load"]
        total["replicas"] = per
        return total
