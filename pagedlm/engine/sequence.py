"""One generated sequence: its tokens, its KV blocks and where it is in its life."""

from __future__ import annotations

import enum
import itertools
from typing import Any

from pagedlm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """Plain Python (no torch) so the scheduler and block manager are tested fast.

    ``num_computed_tokens`` tokens of ``token_ids`` have their K/V in the cache; the next step
    computes some of the rest (a prefill chunk, or the one newest token when decoding).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival_time: float = 0.0):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.prefix_parent = -1  # content id of the last of those blocks (see BlockManager)
        self.num_preemptions = 0
        self.arrival_time = arrival_time
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.wait_for: Sequence | None = None  # n > 1: siblings start after the first one's prompt
        # Speculative decoding: tokens proposed after the last one, verified in this step's forward
        # (engine/spec_decode.py). Never part of token_ids until accepted.
        self.spec_tokens: list[int] = []
        self.state: dict[str, Any] = {}  # owned by the engine: generator, detokenizer, logprobs
        self.lora: Any = None  # the LoRAAdapter (pagedlm/lora.py) this sequence runs with; None: the base model

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def step_token_ids(self, start: int, n: int) -> list[int]:
        """The ``n`` tokens a step computes from position ``start``: its own, then any proposed."""
        if self.spec_tokens:
            return (self.token_ids[start:] + self.spec_tokens)[:n]
        return self.token_ids[start:start + n]

    @property
    def prefix_root(self) -> object:
        """Parent key of the first KV block in the prefix cache: per adapter, so blocks computed
        with different weights are never shared."""
        return -1 if self.lora is None else self.lora.prefix_root

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")
