"""RequestOutput and CompletionOutput in vLLM's shapes, with per-request timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # Streaming: what this output added since the previous RequestOutput of its request.
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecDecodeStats:
    """Speculative decoding counters under vLLM's ``spec_decode_*`` names (per request in
    ``RequestMetrics.spec_decode``, and engine-wide): verification steps with proposals, tokens
    proposed, proposals accepted, and accepted counts by position in the run."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        per_pos = self.num_accepted_tokens_per_pos
        per_pos += [0] * (proposed - len(per_pos))
        for i in range(accepted):
            per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens (None when nothing was proposed)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    def as_dict(self) -> dict:
        return {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos)}


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    spec_decode: SpecDecodeStats = field(default_factory=lambda: SpecDecodeStats())

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        dt = self.decode_time
        if not dt or self.num_generated_tokens < 2:
            return None
        return (self.num_generated_tokens - 1) / dt

    def as_dict(self) -> dict:
        return {
            "queue_time": self.queue_time, "ttft": self.ttft, "decode_time": self.decode_time,
            "decode_tokens_per_s": self.decode_tokens_per_s, "prompt_tokens": self.num_prompt_tokens,
            "cached_prompt_tokens": self.num_cached_tokens, "generated_tokens": self.num_generated_tokens,
            **self.spec_decode.as_dict(),
        }


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # why the request failed (its outputs then end with finish_reason "error")
