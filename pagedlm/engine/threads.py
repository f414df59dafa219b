"""How many threads the engine's steps use, decided in one place.

The steps' OpenMP threads wait for each other at every parallel region. When another process
holds one of their cores for a time slice, every region waits for it: measured on 2 cores,
SmolLM2's compiled batch-1 step gave 42-44 tok/s on one thread and 3-20 tok/s on two while one
other busy process ran (72 tok/s on two on the idle machine). Two things set the count:

* **Builders** (the compiled steps', the kernels'): the engine takes one thread fewer while
  one runs beside it (``yield_core`` / ``reclaim_core``).
* **The governor** (``ThreadGovernor``, fed the decode steps' times): it caps the steps
  at one thread while that is measured faster, and probes the full count again now and then.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

import torch

log = logging.getLogger(__name__)

_base: list[int] = []  # the engine's own thread count, once anything changed it
_yielded: set[str] = set()
_capped = False


def _apply() -> None:
    if not _base:
        _base.append(torch.get_num_threads())
    n = 1 if _capped else max(1, _base[0] - (1 if _yielded else 0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def full_threads() -> int:
    """The thread count the steps get when not capped (builders taken into account)."""
    base = _base[0] if _base else torch.get_num_threads()
    return max(1, base - (1 if _yielded else 0))


def yield_core(who: str) -> None:
    """A builder process (``who``) starts beside the engine: one thread fewer until every
    builder is done."""
    _yielded.add(who)
    _apply()


def reclaim_core(who: str) -> None:
    if who in _yielded:
        _yielded.discard(who)
        _apply()


def cap_at_one(capped: bool) -> None:
    global _capped
    if capped != _capped:
        _capped = capped
        _apply()


class ThreadGovernor:
    """Picks 1 thread or the full count for the compiled decode steps, by their measured times.

    It records each step's time per (bucket, choice). The choice switches to one thread when the
    last ``WINDOW`` steps of a bucket run ``SLOWDOWN`` times slower than that bucket's best
    median on the full count (another process took a core). Every ``interval`` steps it probes
    the other choice for up to ``WINDOW`` steps and keeps whichever median is lower; a probe step
    slower than ``SLOWDOWN`` times the current median ends the probe at once (one slow step is
    its whole cost), and each probe that loses doubles the interval (up to ``MAX_INTERVAL``)."""

    WINDOW = 6
    SLOWDOWN = 2.0
    MIN_INTERVAL = 128
    MAX_INTERVAL = 4096

    def __init__(self) -> None:
        self.single = False  # the current choice: capped at one thread
        self.recent: dict[tuple[object, bool], deque] = {}
        self.best_full: dict[object, float] = {}
        self.interval = self.MIN_INTERVAL
        self.countdown = self.MIN_INTERVAL
        self.probe: list[float] | None = None  # step times of the running probe
        self.switches = 0

    def _set(self, single: bool) -> None:
        self.single = single
        cap_at_one(single)

    def record(self, bucket: object, seconds: float) -> None:
        """After a decode step that took ``seconds``; ``bucket`` names steps of one kind and size
        (a compiled bucket, or an eager step's row count), whose times are compared."""
        if full_threads() <= 1:
            return
        if self.probe is not None:
            self._probe_step(bucket, seconds)
            return
        q = self.recent.setdefault((bucket, self.single), deque(maxlen=self.WINDOW))
        q.append(seconds)
        if len(q) == self.WINDOW:
            med = statistics.median(q)
            if not self.single:
                best = self.best_full.get(bucket)
                self.best_full[bucket] = med if best is None else min(best, med)
                if best is not None and med > self.SLOWDOWN * best:
                    self._switch(True, f"{bucket} steps slowed from {best * 1e3:.1f} to {med * 1e3:.1f} ms")
                    return
        self.countdown -= 1
        if self.countdown <= 0:
            self.probe = []
            self.probe_bucket = bucket
            cap_at_one(not self.single)  # the probe runs the other choice

    def _probe_step(self, bucket: object, seconds: float) -> None:
        if bucket != self.probe_bucket:
            return  # compare like with like: other buckets' steps during a probe are not counted
        self.probe.append(seconds)
        current = self.recent.get((bucket, self.single))
        base = statistics.median(current) if current else None
        done = len(self.probe) >= self.WINDOW or (base is not None and seconds > self.SLOWDOWN * base)
        if not done:
            return
        probe, self.probe = self.probe, None
        if base is not None and statistics.median(probe) < 0.9 * base:
            self._switch(not self.single, f"a probe measured {statistics.median(probe) * 1e3:.1f} ms per {bucket} "
                                          f"step against {base * 1e3:.1f} ms")
            self.recent[(bucket, self.single)] = deque(probe, maxlen=self.WINDOW)
        else:
            cap_at_one(self.single)
            self.interval = min(self.interval * 2, self.MAX_INTERVAL)
            self.countdown = self.interval

    def _switch(self, single: bool, why: str) -> None:
        self._set(single)
        self.switches += 1
        self.interval = self.MIN_INTERVAL
        self.countdown = self.interval
        for key in [k for k in self.recent if k[1] == single]:
            del self.recent[key]  # fresh times for the new choice
        log.info("decode steps on %s from now on (%s)", "one thread" if single else f"{full_threads()} threads", why)
