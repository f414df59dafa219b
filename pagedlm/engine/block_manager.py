"""The KV block pool: ref counts, a prefix cache of full blocks, LRU reuse of freed blocks.

A full block is cached under the key ``(parent's content id, its token ids)``; a first block's
parent is the sequence's ``prefix_root`` (-1, or its LoRA adapter's key: adapters never share). Content ids are
fresh integers given when a block is registered, so a key names one exact prefix: no hash
collision can map two different prefixes to one block, and when a block is evicted and reused,
keys of its old children (which name its old content id) can never match again.

Freed blocks keep their cached content and join the free queue's tail; allocation takes from
the head (least recently freed first), evicting the cached content of the block it takes.
Blocks with nothing cached go to the head, as nothing is lost by reusing them first.
"""

from __future__ import annotations

from collections import OrderedDict

from pagedlm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "key", "content_id")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: tuple | None = None  # (parent content id, token ids) while cached
        self.content_id = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[tuple, int] = {}  # key -> block id
        self._next_content_id = 0
        # Metrics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids caching the longest prefix of full blocks of ``seq``. The last token is never
        taken from the cache: its logits are needed to sample."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        found: list[int] = []
        parent = seq.prefix_root
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            bid = self.cached.get((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            if bid is None:
                break
            found.append(bid)
            parent = self.blocks[bid].content_id
        return found

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Give ``seq`` the blocks it needs to hold ``num_computed_tokens + num_new_tokens``
        tokens (after taking ``cached_blocks`` as its computed prefix). All or nothing."""
        cached_blocks = cached_blocks or []
        have = len(seq.block_table) + len(cached_blocks)
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need_new = max(0, self.blocks_needed(total) - have)
        reusing_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if need_new + reusing_free > self.num_free_blocks:
            return False
        for bid in cached_blocks:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_queue[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
        if cached_blocks:
            seq.num_hashed_blocks = len(cached_blocks)
            seq.prefix_parent = self.blocks[cached_blocks[-1]].content_id
        for _ in range(need_new):
            bid, _ = self.free_queue.popitem(last=False)
            block = self.blocks[bid]
            self._evict(block)
            block.ref_count = 1
            seq.block_table.append(bid)
        return True

    def _evict(self, block: Block) -> None:
        if block.key is not None:
            if self.cached.get(block.key) == block.block_id:
                del self.cached[block.key]
            block.key = None
            block.content_id = -1

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that ``seq``'s computed tokens have filled since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.prefix_parent if seq.num_hashed_blocks else seq.prefix_root
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.key is None:
                key = (parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
                if key not in self.cached:  # another sequence may have computed the same block
                    block.key = key
                    block.content_id = self._next_content_id
                    self._next_content_id += 1
                    self.cached[key] = block.block_id
                else:
                    # Same content exists in another block: chain later blocks off that one so a
                    # third sequence with this prefix still finds them.
                    parent = self.blocks[self.cached[key]].content_id
                    continue
            parent = block.content_id
        if full > seq.num_hashed_blocks:
            seq.num_hashed_blocks = full
            seq.prefix_parent = parent

    def trim(self, seq: Sequence) -> None:
        """Release the tail blocks past what ``seq``'s computed tokens fill (speculative decoding:
        blocks allocated for proposed tokens that were rejected). They hold nothing cached: only
        blocks of computed tokens are ever registered."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            bid = seq.block_table.pop()
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count == 0 and block.key is None, f"trimmed block {bid} is shared or cached"
            self.free_queue[bid] = None
            self.free_queue.move_to_end(bid, last=False)

    def forget(self, seq: Sequence) -> list[int]:
        """The blocks only ``seq`` holds, taken out of the prefix cache (call before freeing a
        sequence whose K/V may hold non-finite values: the caller clears those blocks, and
        nothing they held can be found as a cached prefix). Blocks shared with other live
        sequences were computed before ``seq`` joined them and stay as they are."""
        private = [bid for bid in seq.block_table if self.blocks[bid].ref_count == 1]
        for bid in private:
            self._evict(self.blocks[bid])
        # Later blocks of this sequence chain off the evicted content ids: never matched again.
        seq.num_hashed_blocks = 0
        seq.prefix_parent = -1
        return private

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks, tail first so a shared prefix outlives its private suffix."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} ref count went negative"
            if block.ref_count == 0:
                self.free_queue[bid] = None
                if block.key is None:
                    self.free_queue.move_to_end(bid, last=False)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.prefix_parent = -1

    def check_invariants(self, live: list[Sequence]) -> None:
        """For tests: ref counts equal the live tables' use; free blocks are exactly ref 0."""
        counts = [0] * self.num_blocks
        for s in live:
            for b in s.block_table:
                counts[b] += 1
        for b in self.blocks:
            assert b.ref_count == counts[b.block_id], f"block {b.block_id}: ref {b.ref_count} != {counts[b.block_id]}"
            assert (b.ref_count == 0) == (b.block_id in self.free_queue), f"block {b.block_id} free-list mismatch"
        for key, bid in self.cached.items():
            assert self.blocks[bid].key == key
