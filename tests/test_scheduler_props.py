"""Property tests: random interleavings of add / step / abort / finish on the real Scheduler and
BlockManager (no model: a fake step appends a token to every sequence whose tokens are all
computed). After every operation: ref counts equal the block tables' use (never negative), free
blocks are exactly the unreferenced ones, no slot holds two different live tokens, and in the
end every request is finished or was rejected, with every block free again."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedlm.engine.block_manager import BlockManager
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Sequence, SequenceStatus
from pagedlm.sampling_params import SamplingParams


def check_slots(bm: BlockManager, live: list[Sequence]) -> None:
    """Two live sequences may share a slot only for the same token with the same prefix."""
    owner: dict[int, tuple] = {}
    bs = bm.block_size
    for s in live:
        for p in range(min(s.num_computed_tokens, len(s.block_table) * bs)):
            slot = s.block_table[p // bs] * bs + p % bs
            key = tuple(s.token_ids[: p + 1])
            if slot in owner:
                assert owner[slot] == key, f"slot {slot} holds two different live tokens"
            owner[slot] = key


def live_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for s in list(sched.running) + list(sched.waiting) if s.status is not SequenceStatus.FINISHED]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(1, 3), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("finish"), st.integers(0, 50), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(1, 24), max_seqs=st.integers(1, 6), caching=st.booleans())
def test_random_interleavings_keep_invariants(ops, num_blocks, block_size, budget, max_seqs, caching):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    max_len = num_blocks * block_size
    sched = Scheduler(bm, max_seqs, budget, max_len)
    all_seqs: list[Sequence] = []
    rejected = 0

    def step():
        out = sched.schedule()
        for seq, n in out.scheduled:
            assert n >= 1 and seq.num_computed_tokens + n <= seq.num_tokens
            assert len(seq.block_table) * block_size >= seq.num_computed_tokens + n
        sched.on_step_done(out)
        for seq, _ in out.scheduled:
            if seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(seq.token_ids[-1] % 6)  # the "sampled" token
                if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_len:
                    sched.finish(seq, "length")
        return out

    for op, a, b in ops:
        if op == "add":
            if len(a) >= max_len:
                rejected += 1  # the engine rejects these up front; never queued
                continue
            seq = Sequence(f"r{len(all_seqs)}", a, SamplingParams(max_tokens=b))
            all_seqs.append(seq)
            sched.add(seq)
        elif op == "step":
            for _ in range(a):
                step()
        elif all_seqs:
            seq = all_seqs[a % len(all_seqs)]
            sched.finish(seq, "abort" if op == "abort" else "stop")
        live = live_seqs(sched)
        bm.check_invariants(live)
        check_slots(bm, live)
    # Drain: everything finishes within a bounded number of steps.
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        step()
        bm.check_invariants(live_seqs(sched))
    assert not sched.has_unfinished(), "requests left unfinished (livelock)"
    assert all(s.is_finished for s in all_seqs)
    assert bm.num_free_blocks == num_blocks
    bm.check_invariants([])


def test_prefix_cache_evicts_least_recently_freed_first():
    bm = BlockManager(4, 2)
    a = Sequence("a", [1, 2, 3, 4, 9], SamplingParams())
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.free(a)  # blocks of [1,2] and [3,4] cached and free; the partial block goes to the head
    b = Sequence("b", [1, 2, 3, 4, 7], SamplingParams())
    assert len(bm.find_cached_prefix(b)) == 2
    c = Sequence("c", [5, 6], SamplingParams())
    assert bm.allocate(c, 2)  # takes the uncached block first, keeping the cache
    assert len(bm.find_cached_prefix(b)) == 2
    d = Sequence("d", [8, 8, 8], SamplingParams())
    # Needs 2 more: a never-used block, then the least recently freed cached one. a was freed
    # tail first, so [3,4] went before [1,2]: the shared prefix outlives its suffix.
    assert bm.allocate(d, 3)
    assert len(bm.find_cached_prefix(b)) == 1


def test_prefix_keys_are_exact_not_hashes():
    """A block is found only for the exact token prefix, never for a colliding one."""
    bm = BlockManager(8, 2)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert len(bm.find_cached_prefix(Sequence("x", [1, 2, 3, 4, 0], SamplingParams()))) == 2
    assert len(bm.find_cached_prefix(Sequence("y", [1, 2, 4, 3, 0], SamplingParams()))) == 1
    assert bm.find_cached_prefix(Sequence("z", [2, 1, 3, 4, 0], SamplingParams())) == []
