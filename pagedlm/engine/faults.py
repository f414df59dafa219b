"""Fault isolation for one engine step: a failure in one request's part of a step ends that
request with an error result (finish_reason "error") while the rest of the batch goes on.

Where a step can fail, and how the culprit is found:

* preparing or running the model (packing, a kernel, a test hook): the batch is re-run in
  halves, recursively, until the requests that fail on their own are found (``find_failing``);
  those end with an error, the rest run again as one batch. Re-running is safe: a run writes
  the same K/V to the same slots, and nothing is accounted before the step's run succeeds.
* sampling: rows with NaN logits fail before the sampler; if the batched sampler raises, each
  row is sampled alone and only the rows that raise fail.
* appending a token (detokenizing, stop strings): per request.

A dead model rank (``WorkerError``) cannot be isolated: every in-flight request ends with an
error naming the rank, and the engine refuses new requests from then on.

``FaultInjector`` is a test hook: a callable ``(stage, seq)`` the engine calls per request in
the "prepare" and "sample" stages; it raises to make that request fail there. Servers started in
tests get one from ``PAGEDLM_FAULT_INJECT`` (never set in production).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pagedlm.errors import WorkerError

T = TypeVar("T")

STAGES = ("prepare", "sample")
ENV_VAR = "PAGEDLM_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """Raised by the test hook."""


def find_failing(items: Sequence[T], trial: Callable[[list[T]], Any],
                 error: BaseException) -> list[tuple[T, BaseException]]:
    """The items that make ``trial`` raise on their own, found by bisection, given that the
    whole list raised ``error``: ``O(k log n)`` trials for ``k`` culprits among ``n``. A
    ``WorkerError`` is not a per-item fault and propagates."""
    items = list(items)
    if len(items) == 1:
        return [(items[0], error)]
    mid = len(items) // 2
    found = []
    for half in (items[:mid], items[mid:]):
        try:
            trial(half)
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001 - any error of this part of the step
            found += find_failing(half, trial, e)
    return found


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class FaultInjector:
    """Fails requests whose prompt contains ``token`` at ``stage`` (test hook).

    Configured by ``PAGEDLM_FAULT_INJECT='{"token": 7, "stage": "sample"}'``."""

    def __init__(self, token: int, stage: str = "prepare"):
        if stage not in STAGES:
            raise ValueError(f"fault injection stage must be one of {STAGES}, got {stage!r}")
        self.token, self.stage = int(token), stage
        self.fired = 0

    def __call__(self, stage: str, seq) -> None:
        if stage == self.stage and self.token in seq.token_ids[: seq.num_prompt_tokens]:
            self.fired += 1
            raise InjectedFault(f"injected fault at {stage} (prompt contains token {self.token})")

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(ENV_VAR, "")
        if not spec:
            return None
        try:
            cfg = json.loads(spec)
            return cls(cfg["token"], cfg.get("stage", "prepare"))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{ENV_VAR} must be JSON like {{\"token\": 7, \"stage\": \"sample\"}}, got {spec!r}") from e
