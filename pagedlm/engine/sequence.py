"""One generated sequence: its tokens, its KV blocks and where it is in its life."""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING, Any, NamedTuple

from pagedlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Finish(NamedTuple):
    """How the engine core ends a sequence after a token it appended (``LLMEngine._ending``).

    ``by_token``: the token itself is the stop marker (a stop token id or EOS), so it never shows
    as text; otherwise (max_tokens, max_model_len, a grammar that completed or broke, a stop
    string) the token's text counts and the detokenizer is flushed. ``detail`` is logged when the
    ending stands (a grammar error)."""

    reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string
    by_token: bool = False
    detail: str | None = None


class Sequence:
    """Plain Python (no torch) so the scheduler and block manager are tested fast.

    ``num_computed_tokens`` tokens of ``token_ids`` have their K/V in the cache; the next step
    computes some of the rest (a prefill chunk, or the one newest token when decoding).

    This is the engine core's typed per-sequence state (slots: a misspelt field is an error).
    What the outputs say (text, deltas sent, logprobs) is not here: the output processor keeps
    it (``engine/output_processor.py``).
    """

    __slots__ = ("seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "params", "status",
                 "block_table", "num_computed_tokens", "num_cached_tokens", "num_hashed_blocks", "prefix_parent",
                 "num_preemptions", "arrival_time", "finish_reason", "stop_reason", "wait_for", "spec_tokens",
                 "generator", "grammar", "ep_rank", "lora")

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
        # Sampling state: a seeded request's own generator (seed + index), so its draws do not
        # depend on the batch; a structured-output request's llguidance matcher, advanced by every
        # token kept (engine/structured.py). None: the engine's generator / unconstrained.
        self.generator: torch.Generator | None = None
        self.grammar: Any = None
        self.ep_rank: int | None = None  # expert parallelism: the replica holding its KV (distributed/runner.py)
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
