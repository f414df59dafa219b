"""Continuous batching: every step, decodes first, then prefill chunks, within budgets.

Budgets: ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running sequences per step.
A prompt longer than the token budget is prefilled in chunks over several steps. When the
block pool runs dry, the newest running sequence is preempted by recompute: its blocks are
freed (its full blocks stay in the prefix cache) and it goes back to the front of the queue.
Plain Python, no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedlm.engine.block_manager import BlockManager
from pagedlm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, new tokens), decodes first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_loras: int = 0):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_loras = max_loras  # distinct LoRA adapters among running sequences (0: LoRA off)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished and release its blocks (works for running and waiting sequences)."""
        if seq.is_finished:
            return
        seq.spec_tokens.clear()
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    # ---- one step ------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_tokens.clear()
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        # Running sequences: decodes (one token) first, then unfinished prefill chunks, oldest first.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1,))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens + len(seq.spec_tokens), budget)
            if seq.spec_tokens:
                del seq.spec_tokens[max(0, num_new - 1):]  # proposals past the token budget
                if not self.bm.allocate(seq, num_new):
                    seq.spec_tokens.clear()  # speculation never preempts: decode plainly instead
                    num_new = 1
            while not self.bm.allocate(seq, num_new):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled_ids), None)
                if victim is None:
                    break  # every other sequence is already in this batch: wait for the next step
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, num_new))
                scheduled_ids.add(seq.seq_id)
                budget -= num_new
        for seq in self.running:
            if seq.spec_tokens and seq.seq_id not in scheduled_ids:
                seq.spec_tokens.clear()  # not scheduled this step (budget spent): nothing to verify
        # Waiting sequences, in arrival order (preempted ones are at the front), if nothing was
        # preempted this step: memory is tight and admitting more would only thrash.
        if not out.preempted:
            skipped: list[Sequence] = []
            loras = {s.lora for s in self.running if s.lora is not None} if self.max_loras else set()
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.wait_for is not None and not (seq.wait_for.prompt_done or seq.wait_for.is_finished):
                    skipped.append(self.waiting.popleft())  # n > 1: let the first sample fill the cache
                    continue
                if seq.lora is not None and seq.lora not in loras and len(loras) >= self.max_loras:
                    skipped.append(self.waiting.popleft())  # every LoRA slot is taken: wait for one
                    continue
                cached = self.bm.find_cached_prefix(seq)
                num_cached = len(cached) * self.bm.block_size
                num_new = min(seq.num_tokens - num_cached, budget)
                if not self.bm.allocate(seq, num_new, cached):
                    break
                self.waiting.popleft()
                self.bm.prefix_queries += seq.num_tokens
                self.bm.prefix_hits += num_cached
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = num_cached
                seq.num_computed_tokens = num_cached
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                if seq.lora is not None:
                    loras.add(seq.lora)
                out.scheduled.append((seq, num_new))
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))
        # Decodes first in the batch layout.
        out.scheduled.sort(key=lambda item: item[1] > 1)
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Account the tokens just computed and register newly filled blocks for reuse."""
        for seq, n in out.scheduled:
            if seq.status is SequenceStatus.RUNNING and not seq.spec_tokens:  # the engine accounts verified rows
                seq.num_computed_tokens += n
                self.bm.cache_full_blocks(seq)
