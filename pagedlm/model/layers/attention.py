"""Attention over a paged KV cache, for one flat varlen batch of decodes and prefill chunks.

The batch layout (built by the ModelRunner, read by every attention layer):

    tokens [0, num_decodes)            one new token per decoding sequence
    tokens [num_decodes, num_tokens)   prefill chunks, one contiguous segment per sequence

Each layer's cache is one tensor ``(2, num_blocks, block_size, kv_heads, head_dim)`` (K then V);
token ``t`` of a sequence lives in slot ``block_table[t // block_size] * block_size + t % block_size``.
New K/V are written by ``slot_mapping``; block tables are read for the context.

Backends sit behind one call, ``backend.forward(q, k, v, kv_cache, meta, scale, window)``, and
each owns its metadata class: the layer runs ``meta.backend``. ``BACKENDS`` is the registry.
Multi-head latent attention (``layers/mla.py``) uses two more calls of the same backends:
``write_latent`` and ``decode_latent`` (decode rows attend to a one-slot cache of latents, one
KV head whose values are the first ``value_dim`` columns of the keys).

Every attention layer a model lists in ``attention_layers()`` declares its cache:
``kv_cache_shape(num_blocks, block_size)`` and ``kv_elems_per_token()``; the runner allocates
``kv_cache`` from them (K/V heads here; one latent per token for MLA).

    torch  ``AttentionMetadata``: the portable reference (CPU and CUDA, varlen decodes and prefill
           chunks). Gathers each sequence's blocks into a contiguous copy and calls SDPA.
    paged  ``PagedDecodeMetadata``: decode-only batches of a fixed size, for the compiled decode
           step. Reads K/V where they lie in the cache (block table -> slot index per key) inside
           the score and value reductions, so once compiled no context is copied; rows past a
           sequence's length (block tables are padded) are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm import kernels

# The score of a masked key: finite, so that no softmax over keys can meet -inf - -inf (NaN),
# yet exp(MASKED_SCORE - any real score) is exactly 0 in float32.
MASKED_SCORE = -1e30


def attention_kernel(q: torch.Tensor, kv_cache: torch.Tensor):
    """pagedlm's decode attention kernel (``pagedlm::paged_attention``, pagedlm/kernels) when it
    serves these tensors, else None. It is used once this process has loaded pagedlm's CPU
    kernels (the quantized weights load them): attention then follows the weights, and a
    compiled step's graph is keyed with them (engine/aot.py ``StepSpec.kernels``)."""
    ops = kernels.loaded()
    if (ops is None or q.device.type != "cpu" or kv_cache.dim() != 5 or q.shape[-1] % 8
            or kv_cache.dtype not in (torch.float32, torch.bfloat16)):
        return None
    return ops.paged_attention


@dataclass
class PrefillSegment:
    q_start: int  # first token of this chunk in the flat batch
    q_len: int  # tokens in this chunk
    context_len: int  # tokens of the sequence seen after this chunk (cached prefix + chunk)
    block_table: torch.Tensor  # (num_blocks_of_seq,) int64
    # A speculating sequence's 1 + k verification rows: each row attends as the 1-row decode step
    # of its position would (the same SDPA call), so its output, and hence greedy speculation's
    # tokens, equal plain decoding's bit for bit.
    decode_rows: bool = False


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (num_decodes, max_blocks) int64
    decode_context_lens: torch.Tensor | None = None  # (num_decodes,) int64, incl. the new token
    decode_max_context: int = 0
    prefills: list[PrefillSegment] = field(default_factory=list)
    block_size: int = 16
    backend = None  # set below: TorchAttentionBackend
    # Masks are the same for every layer of a step: built once, on first use, per window.
    _mask_cache: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """(num_decodes, 1, 1, T) bool mask over the gathered context, or None when every key is
        visible (a single sequence with no window in force)."""
        key = ("decode", window)
        if key not in self._mask_cache:
            lens = self.decode_context_lens
            t = self.decode_max_context
            need_window = window is not None and t > window
            if self.num_decodes == 1 and not need_window:
                self._mask_cache[key] = None
            else:
                pos = torch.arange(t, device=lens.device)[None, :]
                mask = pos < lens[:, None]
                if need_window:
                    mask &= pos > (lens[:, None] - 1 - window)
                self._mask_cache[key] = mask[:, None, None, :]
        return self._mask_cache[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """(q_len, context_len) bool mask for segment i; None where plain causal attention over the
        chunk itself is exact (no cached prefix and no window in force)."""
        key = ("prefill", i, window)
        if key not in self._mask_cache:
            seg = self.prefills[i]
            offset = seg.context_len - seg.q_len
            need_window = window is not None and seg.context_len > window
            if offset == 0 and not need_window:
                self._mask_cache[key] = None
            else:
                dev = self.slot_mapping.device
                qpos = torch.arange(offset, seg.context_len, device=dev)[:, None]
                kpos = torch.arange(seg.context_len, device=dev)[None, :]
                mask = kpos <= qpos
                if need_window:
                    mask &= kpos > qpos - window
                self._mask_cache[key] = mask
        return self._mask_cache[key]


class TorchAttentionBackend:
    """Portable reference: gathers each sequence's blocks and calls SDPA (GQA without repeating
    K/V: ``enable_gqa``)."""

    name = "torch"

    @staticmethod
    def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        _, nb, bs, h, d = kv_cache.shape
        kv_cache[0].view(nb * bs, h, d).index_copy_(0, slots, k)
        kv_cache[1].view(nb * bs, h, d).index_copy_(0, slots, v)

    @staticmethod
    def forward(
        q: torch.Tensor,  # (tokens, heads, head_dim)
        k: torch.Tensor,  # (tokens, kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        TorchAttentionBackend.write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        kernel = attention_kernel(q, kv_cache)
        if nd and kernel is not None:
            # Each row read in place through its table: no gathered copy of the contexts (a
            # 48-row step copied ~37 MB per layer), and a row's output does not depend on the batch.
            nblocks = (meta.decode_max_context + meta.block_size - 1) // meta.block_size
            out[:nd] = kernel(q[:nd], kv_cache, meta.decode_block_tables[:, :nblocks], meta.decode_context_lens,
                              scale, window or 0)
        elif nd:
            t = meta.decode_max_context
            nblocks = (t + meta.block_size - 1) // meta.block_size
            bt = meta.decode_block_tables[:, :nblocks]
            h, d = kv_cache.shape[-2:]
            # one gather for K and V: (2, nd, nblocks, block, kv_heads, hd) -> 2 x (nd, kv_heads, t, hd)
            kv = kv_cache[:, bt].view(2, nd, -1, h, d)[:, :, :t].transpose(2, 3)
            mask = meta.decode_mask(window)
            if mask is not None:
                # Masked slots (a shorter row's tail, a reused block's unwritten slots) may hold
                # anything: SDPA adds -inf to a masked score (NaN + -inf is NaN) and multiplies a
                # masked value by 0 (0 x NaN is NaN), so zero them in the gathered copy.
                kv = kv.masked_fill(~mask.transpose(-1, -2), 0)  # mask as (nd, 1, t, 1)
            kc, vc = kv[0], kv[1]
            qd = q[:nd].unsqueeze(2)  # (nd, heads, 1, hd)
            o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
            out[:nd] = o.squeeze(2)
        for i, seg in enumerate(meta.prefills):
            s, n = seg.q_start, seg.q_len
            if seg.decode_rows and kernel is not None:
                # Row r as the decode step of its position: the same kernel, context_len - n + r + 1 keys.
                lens = torch.arange(seg.context_len - n + 1, seg.context_len + 1, device=q.device)
                out[s : s + n] = kernel(q[s : s + n], kv_cache, seg.block_table[None].expand(n, -1), lens, scale,
                                        window or 0)
                continue
            if seg.decode_rows and window is None:
                h, d = kv_cache.shape[-2:]
                kv = kv_cache[:, seg.block_table].view(2, 1, -1, h, d).transpose(2, 3)
                for r in range(n):
                    t = seg.context_len - n + r + 1
                    qd = q[s + r : s + r + 1].unsqueeze(2)  # (1, heads, 1, hd), as a decode row
                    o = F.scaled_dot_product_attention(qd, kv[0][:, :, :t], kv[1][:, :, :t], scale=scale,
                                                       enable_gqa=True)
                    out[s + r] = o[0, :, 0]
                continue
            qs = q[s : s + n].transpose(0, 1)  # (heads, n, hd)
            if seg.context_len == n:
                ks, vs = k[s : s + n].transpose(0, 1), v[s : s + n].transpose(0, 1)
            else:
                h, d = kv_cache.shape[-2:]
                kv = kv_cache[:, seg.block_table].view(2, -1, h, d)[:, : seg.context_len].transpose(1, 2)
                ks, vs = kv[0], kv[1]
            mask = meta.prefill_mask(i, window)
            o = F.scaled_dot_product_attention(
                qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
            )
            out[s : s + n] = o.squeeze(0).transpose(0, 1)
        return out

    # ---- multi-head latent attention (layers/mla.py): a one-slot cache of latents ----------
    @staticmethod
    def write_latent(cache: torch.Tensor, latent: torch.Tensor, slots: torch.Tensor) -> None:
        _, nb, bs, _, d = cache.shape
        cache[0].view(nb * bs, d).index_copy_(0, slots, latent)

    @staticmethod
    def decode_latent(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      value_dim: int) -> torch.Tensor:
        """q (decodes, heads, d) against each sequence's cached latents (one KV head of size d,
        values its first ``value_dim`` columns) -> (decodes, heads, value_dim)."""
        nd, t = q.shape[0], meta.decode_max_context
        bt = meta.decode_block_tables[:, : (t + meta.block_size - 1) // meta.block_size]
        d = cache.shape[-1]
        kc = cache[0][bt].view(nd, -1, 1, d)[:, :t].transpose(1, 2)  # (nd, 1, t, d)
        mask = meta.decode_mask(None)
        if mask is not None:  # as in forward: nothing stale in a masked slot reaches the output
            kc = kc.masked_fill(~mask.transpose(-1, -2), 0)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kc, kc[..., :value_dim],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(2)

    @staticmethod
    def context_latents(cache: torch.Tensor, seg: PrefillSegment) -> torch.Tensor:
        """The latents of a prefill segment's whole context (cached prefix + chunk): (context, d)."""
        return cache[0][seg.block_table].view(-1, cache.shape[-1])[: seg.context_len]


@torch.library.custom_op("pagedlm::write_kv", mutates_args=("kv_cache",))
def write_kv_op(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """The cache write as one opaque op that mutates the cache in place: compiled graphs call it
    as is (an index_copy_ into a view of a graph input would be functionalised into a copy of the
    whole cache per layer)."""
    TorchAttentionBackend.write_kv(kv_cache, k, v, slots)


@write_kv_op.register_fake
def _(kv_cache, k, v, slots) -> None:
    return None


@dataclass
class PagedDecodeMetadata:
    """One decode token per row; every tensor has a fixed size per batch bucket, filled in place.
    Padding rows point at a scratch block and are ignored by the caller."""

    slot_mapping: torch.Tensor  # (batch,) int64: where each row's new K/V goes
    block_tables: torch.Tensor  # (batch, width) int64, padded with any valid block id
    context_lens: torch.Tensor  # (batch,) int64, including the new token
    block_size: int = 16
    prefills = ()  # decode-only: every row is a decode

    @property
    def backend(self):
        return PagedAttentionBackend

    @property
    def num_decodes(self) -> int:
        return self.slot_mapping.shape[0]


class PagedAttentionBackend:
    """Decode attention over the paged cache in place (the compiled decode step's backend).

    Written as broadcasts and reductions, not as a gather followed by a matmul: compiled, the key
    and value loads index the cache through the block table inside the reduction loops, and the
    gathered context never exists in memory. Eager, it is correct but slow (the broadcasts are
    materialised); the engine uses it only compiled, and tests hold it to the torch backend."""

    name = "paged"

    @staticmethod
    def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """One index_put_ on the cache tensor itself (not on a view of it): compiled, inductor
        writes the new rows in place (an index_copy_ into a view is functionalised into a copy of
        the whole cache)."""
        bs = kv_cache.shape[2]
        n = slots.shape[0]
        which = torch.arange(2, device=slots.device).repeat_interleave(n)  # (2n,): K rows then V rows
        s2 = slots.repeat(2)
        kv_cache.index_put_((which, s2 // bs, s2 % bs), torch.cat((k, v)))

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: PagedDecodeMetadata, scale: float, window: int | None) -> torch.Tensor:
        PagedAttentionBackend.write_kv(kv_cache, k, v, meta.slot_mapping)
        kernel = attention_kernel(q, kv_cache)
        if kernel is not None:
            return kernel(q, kv_cache, meta.block_tables, meta.context_lens, scale, window or 0)
        _, nb, bs, kvh, d = kv_cache.shape
        return PagedAttentionBackend._attend(q, kv_cache[0].view(nb * bs, kvh, d), kv_cache[1].view(nb * bs, kvh, d),
                                             meta, scale, window, bs)

    @staticmethod
    def write_latent(cache: torch.Tensor, latent: torch.Tensor, slots: torch.Tensor) -> None:
        """One index_put_ on the cache tensor itself, as ``write_kv``."""
        bs = cache.shape[2]
        cache.index_put_((torch.zeros_like(slots), slots // bs, slots % bs), latent[:, None])

    @staticmethod
    def decode_latent(q: torch.Tensor, cache: torch.Tensor, meta: PagedDecodeMetadata, scale: float,
                      value_dim: int) -> torch.Tensor:
        _, nb, bs, _, d = cache.shape
        flat = cache[0].view(nb * bs, 1, d)
        return PagedAttentionBackend._attend(q, flat, flat[..., :value_dim], meta, scale, None, bs)

    @staticmethod
    def _attend(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, meta: PagedDecodeMetadata,
                scale: float, window: int | None, bs: int) -> torch.Tensor:
        """q (b, heads, d) against keys / values (slots, kv_heads, d | dv) read through the block
        tables -> (b, heads, dv)."""
        b, heads, d = q.shape
        kvh, dv = k_all.shape[1], v_all.shape[-1]
        g = heads // kvh
        width = meta.block_tables.shape[1]
        t = torch.arange(width * bs, device=q.device)  # key positions
        slots = meta.block_tables[:, t // bs] * bs + t % bs  # (b, T)
        kc = k_all[slots]  # (b, T, kvh, d): fused into the reduction
        vc = v_all[slots]
        qg = q.view(b, 1, kvh, g, d).float()
        scores = (qg * kc[:, :, :, None, :].float()).sum(-1) * scale  # (b, T, kvh, g)
        lens = meta.context_lens[:, None]
        visible = t[None, :] < lens
        if window is not None:
            visible &= t[None, :] > lens - 1 - window
        # Masked keys get a large finite score, not -inf: a compiled softmax may reduce keys in
        # parts (per vector lane, per thread), and a part whose keys are all masked would compute
        # exp(-inf - -inf) = NaN. A finite floor gives such a part weight 0 once rescaled by the
        # row's true maximum (key 0 is always visible). Selects, not products, keep whatever
        # lies in a masked slot (a padding block, a reused block's unwritten tail, the scratch
        # block) out of the row: 0 x NaN would be NaN.
        vis = visible[:, :, None, None]
        scores = torch.where(vis, scores, MASKED_SCORE)
        p = torch.softmax(scores, dim=1)  # over keys
        vals = torch.where(vis[..., None], vc[:, :, :, None, :].float(), 0.0)
        o = (p[..., None] * vals).sum(1)  # (b, kvh, g, dv)
        return o.reshape(b, heads, dv).to(q.dtype)


AttentionMetadata.backend = TorchAttentionBackend

BACKENDS = {"torch": TorchAttentionBackend, "paged": PagedAttentionBackend}



class Attention(nn.Module):
    """Attention core of one layer: owns nothing but its KV cache slot (set by the runner)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)  # K and V

    def kv_elems_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: (tokens, heads * hd) -> (tokens, heads, hd); same for k/v with kv_heads
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None and getattr(meta, "uses_kv_cache", True):
            raise RuntimeError("attention layer has no KV cache: the ModelRunner allocates it")
        o = meta.backend.forward(q, k, v, self.kv_cache, meta, self.scale, self.sliding_window)
        return o.reshape(-1, self.num_heads * self.head_dim)


# ---- training: causal attention over whole sequences, no KV cache -------------------------------

@dataclass
class CausalTiles:
    """A packed batch regrouped for attention: whole examples (runs of one segment id in a row)
    placed greedily, in order, into ``n`` tiles of ``size`` slots, each tile holding as many
    examples as fit. Attention of a tile is block-diagonal causal over its examples, so SDPA works
    on n x size^2 scores instead of batch x seq_len^2 (the dense block-diagonal mask): with short
    examples packed into long rows nearly all of those would be masked, and SDPA's CPU kernels
    compute masked blocks all the same."""

    gather: torch.Tensor  # (n * size,) flat token index of each slot; batch * seq_len (zero) if empty
    scatter: torch.Tensor  # (batch * seq_len,) slot of each token; n * size (zero) for padding
    mask: torch.Tensor | None  # (n, 1, size, size) bool, True where a query slot may attend a key
    # slot; None: plain causal is exact (one example per tile, no window: the empty slots at a
    # tile's end come after its example and their outputs are dropped)
    n: int
    size: int
    identity: bool  # the tiles are the rows themselves (no gather or scatter needed)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x; index len(x) gives a zero row."""
    return torch.cat((x, x.new_zeros(1, *x.shape[1:]))).index_select(0, index)


class _Regroup(torch.autograd.Function):
    """``_take_rows(x, index)`` whose backward is another gather, by ``inverse``: index and inverse
    are one-to-one between the rows that matter (tokens and the slots that hold them), and the
    rows that do not (padding tokens, empty slots) get zero. index_select's own backward is an
    index_add (a scatter with duplicate handling: several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return _take_rows(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _take_rows(grad.contiguous(), inverse), None, None


def causal_tiles(segment_ids: torch.Tensor, window: int | None, min_size: int = 16) -> CausalTiles:
    """Tiles for ``segment_ids`` (batch, seq_len); tokens with a negative id are padding (their
    attention output is zero). The tile size is the longest example (rounded up to 8 slots)."""
    b, t = segment_ids.shape
    seg = segment_ids.cpu()
    new = torch.ones_like(seg, dtype=torch.bool)  # a run starts at each row start and id change
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = new.reshape(-1).nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([b * t]))
    real = seg.reshape(-1)[starts] >= 0
    runs = list(zip(starts[real].tolist(), lengths[real].tolist()))
    size = max([min_size] + [n for _, n in runs])
    size = -(-size // 8) * 8
    tiles: list[list[tuple[int, int]]] = []
    used = size
    for run in runs:
        if used + run[1] > size:
            tiles.append([])
            used = 0
        tiles[-1].append(run)
        used += run[1]
    n = max(1, len(tiles))
    gather = torch.full((n, size), b * t, dtype=torch.long)
    slot_seg = torch.full((n, size), -1, dtype=torch.long)  # empty slots: their own "example"
    scatter = torch.full((b * t,), n * size, dtype=torch.long)
    for i, tile in enumerate(tiles):
        at = 0
        for j, (start, length) in enumerate(tile):
            gather[i, at:at + length] = torch.arange(start, start + length)
            slot_seg[i, at:at + length] = j
            scatter[start:start + length] = torch.arange(i * size + at, i * size + at + length)
            at += length
    dev = segment_ids.device
    identity = n * size == b * t and bool((scatter == torch.arange(b * t)).all())
    if window is None and all(len(tile) == 1 for tile in tiles):
        return CausalTiles(gather.reshape(-1).to(dev), scatter.to(dev), None, n, size, identity)
    k = torch.arange(size)
    mask = (k[None, :] <= k[:, None])[None] & (slot_seg[:, :, None] == slot_seg[:, None, :])  # (n, size, size)
    if window is not None:  # within an example, slot distance == position distance
        mask = mask & (k[None, :] > k[:, None] - window)[None]
    return CausalTiles(gather.reshape(-1).to(dev), scatter.to(dev), mask[:, None].to(dev), n, size, identity)


@dataclass
class CausalMetadata:
    """A training batch: ``batch`` rows of ``seq_len`` tokens, flattened row-major into the model's
    token dimension. ``segment_ids`` (batch, seq_len) marks packed examples (-1: padding): a token
    attends to earlier tokens of its own segment only (block-diagonal causal attention, computed
    in tiles of whole examples: ``CausalTiles``; positions reset per segment are the caller's).
    None: one sequence per row, padding only at the end (plain causal attention is exact for every
    real token)."""

    batch: int
    seq_len: int
    segment_ids: torch.Tensor | None = None
    uses_kv_cache = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def backend(self):
        return CausalAttentionBackend

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """Unpacked rows: (1, 1, T, T) bool, True where a query may attend a key; None for plain
        causal."""
        if window is None or self.seq_len <= window:
            return None
        if ("mask", window) not in self._cache:
            i = torch.arange(self.seq_len, device=device)
            self._cache["mask", window] = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]
        return self._cache["mask", window]

    def tiles(self, window: int | None) -> CausalTiles:
        """Packed rows: the tiles of their examples (built once per batch and window)."""
        if ("tiles", window) not in self._cache:
            self._cache["tiles", window] = causal_tiles(self.segment_ids, window)
        return self._cache["tiles", window]


class CausalAttentionBackend:
    """Training and scoring: every token of a row attends causally to its row (its segment when
    packed); differentiable, nothing cached. Inference never meets it."""

    name = "causal"

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: CausalMetadata, scale: float, window: int | None) -> torch.Tensor:
        h, d, kvh, dv = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
        if meta.segment_ids is not None:
            tl = meta.tiles(window)
            if not tl.identity:  # each tile's slots, gathered from the flat tokens
                q, k, v = (_Regroup.apply(x, tl.gather, tl.scatter) for x in (q, k, v))
            qt = q.view(tl.n, tl.size, h, d).transpose(1, 2)  # (tiles, heads, size, hd)
            kt = k.view(tl.n, tl.size, kvh, d).transpose(1, 2)  # (tiles, kv_heads, size, hd)
            vt = v.view(tl.n, tl.size, kvh, dv).transpose(1, 2)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tl.mask, is_causal=tl.mask is None,
                                               scale=scale, enable_gqa=True)
            o = o.transpose(1, 2).reshape(tl.n * tl.size, h, dv)
            if tl.identity:
                return o
            return _Regroup.apply(o, tl.scatter, tl.gather)  # token order; padding tokens get zeros
        b, t = meta.batch, meta.seq_len
        qb = q.view(b, t, h, d).transpose(1, 2)  # (b, heads, t, hd)
        kb = k.view(b, t, kvh, d).transpose(1, 2)  # (b, kv_heads, t, hd)
        vb = v.view(b, t, kvh, dv).transpose(1, 2)
        mask = meta.mask(window, q.device)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
        return o.transpose(1, 2).reshape(b * t, h, dv)


BACKENDS["causal"] = CausalAttentionBackend
