"""Structured output: sampling constrained by a grammar (JSON schema, JSON object, regex, choice, Lark).

The grammar library is ``llguidance`` (chosen over ``xgrammar`` by measurement on SmolLM2's
49k vocabulary, docs/benchmarks.md): it builds, per step, a bitmask of the tokens that keep the
output inside the grammar (one bit per vocabulary id), and advances a matcher by each sampled
token. pagedlm's part:

* ``StructuredOutputsParams`` (vLLM's shape) is validated where it is built: a bad schema or
  regex is a ``ValueError`` naming it before any request exists.
* ``GrammarManager`` (one per engine, made at the first constrained request) holds the
  llguidance view of the tokenizer (about 2 s to build for a 49k vocabulary, so only engines
  that use grammars pay it), an LRU cache of compiled grammars (each a ready matcher that new
  sequences deep-copy: ~6 us instead of ~0.4 ms), and one bitmask buffer filled for all
  constrained rows of a step at once.
* ``apply_bitmask`` masks those rows of the logits inside the sampler, after the compiled or
  eager model step (the compiled decode graph returns plain logits; nothing in it changes).

Each sequence owns its matcher (``Sequence.grammar``), advanced by every token it keeps:
``n > 1`` samples each have their own, and a preempted sequence keeps its matcher because
recompute keeps its generated tokens. Speculative decoding walks the matcher along the
proposed tokens to get each verification row's mask, then rolls it back (``GrammarWalk``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pagedlm.sampling_params import StructuredOutputsParams, _ll

GRAMMAR_CACHE_SIZE = 256


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every logit whose bit is 0 in ``bitmask`` (rows, ceil(vocab / 32)) int32
    (bit j of word w is token 32 w + j). numpy's unpackbits expands it in one pass and putmask
    writes through a view of the logits, both single-threaded: cheaper than shifting an int32
    tensor per bit, and free of thread-pool wake-ups (58 us against 213 us for a torch
    masked_fill on a 49k vocabulary)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, : logits.shape[1]]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        np.putmask(logits.numpy(), bits == 0, -np.inf)
    else:
        logits.masked_fill_(torch.from_numpy(bits == 0).to(logits.device), float("-inf"))


class GrammarManager:
    """Compiles grammars against the engine's tokenizer (cached) and fills next-token bitmasks."""

    def __init__(self, tokenizer, vocab_size: int, max_rows: int):
        _ll()  # a clear error when llguidance is missing
        import llguidance.hf
        import llguidance.torch

        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this model has none")
        try:
            self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        except Exception as e:
            raise ValueError(f"structured output cannot use this model's tokenizer: {e}") from e
        self._llt = llguidance.torch
        self.vocab_size = vocab_size
        self.bitmask = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # the server validates on its thread while the engine steps
        self.num_compiled = 0

    def compiled(self, params: StructuredOutputsParams):
        """The compiled grammar: a matcher at its start state, never advanced itself (each
        sequence advances a ``deep_copy()``). ValueError when the grammar does not compile for
        this vocabulary, or when no output of this vocabulary can satisfy it."""
        key = params.to_grammar()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        template = self._compile(params, key)
        with self._lock:
            self._cache[key] = template
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def _compile(self, params: StructuredOutputsParams, grammar: str):
        M = _ll().LLMatcher
        err = M.validate_grammar(grammar, self.ll_tokenizer)
        if err:
            raise ValueError(f"invalid {params.kind}: {err.strip()}"[:1000])
        m = M(self.ll_tokenizer, grammar, log_level=0)
        # The first mask finds a grammar whose language is empty for this vocabulary (the
        # matcher enters its error state), so the request fails now, not mid-generation.
        probe = self._llt.allocate_token_bitmask(1, self.vocab_size)
        self._llt.fill_next_token_bitmask(m, probe, 0)
        if m.is_error():
            raise ValueError(f"this {params.kind} cannot be satisfied by any output of this model's vocabulary: "
                             f"{m.get_error().splitlines()[0] if m.get_error() else 'no token is allowed'}"[:1000])
        m.reset()
        self.num_compiled += 1
        return m

    def fill(self, matchers: list) -> torch.Tensor:
        """Bitmasks (len(matchers), words) of the next allowed tokens, one row after another on
        this thread. llguidance's parallel fill (its own thread pool) was measured slower here:
        on 2 cores its threads contend with the model's OpenMP threads, and constrained decoding
        at batch 8 cost 12-13% of unconstrained tok/s against 5% filled serially
        (docs/benchmarks.md)."""
        n = len(matchers)
        if n > self.bitmask.shape[0]:
            self.bitmask = self._llt.allocate_token_bitmask(n, self.vocab_size)
        mask = self.bitmask[:n]
        for i, m in enumerate(matchers):
            self._llt.fill_next_token_bitmask(m, mask, i)
        return mask

    def walk(self, matcher, k: int) -> GrammarWalk:
        """A walk of ``matcher`` along up to ``k`` speculated tokens (``GrammarWalk``)."""
        return GrammarWalk(self, matcher, k)

    def masks_along(self, matcher, tokens: list[int]) -> torch.Tensor:
        """The masks plain decoding would apply at each position of a speculated run: row i
        after ``tokens[:i]`` (``len(tokens) + 1`` rows). The grammar must accept every token
        (``matcher.validate_tokens``); the matcher is left where it was."""
        walk = self.walk(matcher, len(tokens))
        try:
            for tok in tokens:
                walk.push(tok)
        finally:
            masks = walk.close()
        return masks


class GrammarWalk:
    """Advances a sequence's matcher along speculated tokens, recording the next-token mask at
    each position (row i: after the first i tokens), then rolls it back (``close``), so that the
    tokens verification keeps advance it again through the ordinary append path."""

    def __init__(self, manager: GrammarManager, matcher, k: int):
        self._llt, self.matcher = manager._llt, matcher
        self.masks = manager._llt.allocate_token_bitmask(k + 1, manager.vocab_size)
        self.n = 0  # tokens consumed
        self._llt.fill_next_token_bitmask(matcher, self.masks, 0)

    @property
    def mask(self) -> torch.Tensor:
        """The mask of the next token."""
        return self.masks[self.n]

    def push(self, token: int) -> bool:
        """Consume ``token`` (one the grammar allows); False when the grammar is then complete
        (plain decoding ends the sequence there: nothing after it is worth proposing)."""
        if self.matcher.validate_tokens([token]) != 1 or not self.matcher.consume_token(token):
            raise ValueError(f"speculated token {token} is not allowed by the grammar")
        self.n += 1
        self._llt.fill_next_token_bitmask(self.matcher, self.masks, self.n)
        return not self.matcher.is_stopped()

    def close(self) -> torch.Tensor:
        """Roll the matcher back; the masks recorded (``n + 1`` rows)."""
        if self.n:
            self.matcher.rollback(self.n)
        return self.masks[: self.n + 1]


def advance(matcher, token: int) -> str | None:
    """Feed a sampled token to a sequence's matcher: None to go on, "done" when the grammar is
    complete (nothing but EOS may follow), or an error message."""
    if not matcher.consume_token(token):
        return matcher.get_error() or f"token {token} is not allowed by the grammar"
    return "done" if matcher.is_stopped() else None
