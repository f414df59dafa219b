"""Speculative decoding: propose k tokens cheaply, verify them in one target forward pass.

Per step, before scheduling, a proposer gives each decoding sequence up to ``k`` tokens
(``Sequence.spec_tokens``). The scheduler gives the sequence a row of ``1 + k`` query tokens (its
last token, then the proposals) and blocks for them; the runner computes logits at every one of
those rows in the same forward pass as the rest of the batch (compiled: ``1 + k`` decode rows over
one block table; eager: a prefill segment over the cached context). ``verify`` then keeps the
longest accepted run plus one token from the target:

* greedy requests: a proposal is accepted while it equals the target's argmax; the first
  mismatch is replaced by that argmax, so the output is exactly plain greedy decoding's;
* sampled requests: the rejection sampling of Leviathan et al. / Chen et al.: accept proposal
  ``d`` with probability ``min(1, p(d) / q(d))``, else draw from ``max(0, p - q)`` normalised;
  after k acceptances draw a bonus token from ``p``. ``p`` is the distribution plain sampling
  would draw from (penalties, bans, temperature, top-k/p, min-p), ``q`` the proposer's (a point
  mass for n-gram lookup), so every output token is distributed exactly as without speculation.

The engine appends the kept tokens one at a time through the normal stop checks (EOS, stop ids,
stop strings, max_tokens), registering full blocks of computed tokens before each, exactly as a
plain decode step would; after the run, blocks holding only rejected tokens are released
(``BlockManager.trim``). Rejected tokens' K/V slots are simply overwritten later: nothing is cached
past the computed (accepted) tokens.

Proposers: ``NgramProposer`` (prompt lookup, no model) and ``DraftModelProposer`` (a smaller model
with the same vocabulary, its own runner, KV cache and block pool).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagedlm.engine.block_manager import BlockManager
from pagedlm.engine.scheduler import SchedulerOutput
from pagedlm.engine.sequence import Sequence
from pagedlm.model.layers.sampler import (
    SamplingRow,
    adjust_logits,
    draw,
    greedy_tokens,
    sampling_probs,
    token_logprobs,
)
from pagedlm.outputs import SpecDecodeStats

log = logging.getLogger(__name__)

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    """vLLM's ``--speculative-config`` fields that apply here."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4  # n-gram: longest suffix looked up
    prompt_lookup_min: int = 1  # n-gram: shortest suffix looked up
    model: str | None = None  # draft_model: HF directory or .gguf file with the target's vocabulary
    quantization: str | None = None  # draft_model: None = the target's setting
    # Not a vLLM field. n-gram: verify, per sequence and step, only as many of the (up to k)
    # proposed tokens as pay for their rows in the measured step cost (``AdaptivePolicy``);
    # False: always verify every proposal, as vLLM does.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {self.adaptive!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) is larger than prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.method == "draft_model":
            if not self.model:
                raise ValueError("speculative method 'draft_model' needs 'model' (the draft model's path)")
            if not os.path.exists(self.model):
                raise ValueError(f"draft model path does not exist: {self.model!r}")

    @classmethod
    def build(cls, value: Any, num_speculative_tokens: int | None = None) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict, a JSON string or None; ``num_speculative_tokens``
        (the CLI's --num-speculative-tokens) overrides k and alone turns on n-gram lookup."""
        if value is None and num_speculative_tokens is None:
            return None
        if isinstance(value, cls):
            fields = dict(vars(value))
        elif value is None:
            fields = {}
        elif isinstance(value, str):
            try:
                fields = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from e
        elif isinstance(value, dict):
            fields = dict(value)
        else:
            raise TypeError(f"speculative_config must be a dict, a JSON string or None, got {type(value).__name__}")
        if not isinstance(fields, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown speculative_config field(s): {', '.join(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        if num_speculative_tokens is not None:
            fields["num_speculative_tokens"] = num_speculative_tokens
        return cls(**fields)


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (len(tokens), vocab) draft distributions; None: point masses
    key: int = 0  # what predicts its acceptance (n-gram: the length of the matched suffix)
    # Structured output: the grammar's mask at each verification row (row i: after tokens[:i]).
    masks: torch.Tensor | None = None


# ---- proposers ------------------------------------------------------------------------------
class NgramProposer:
    """Prompt lookup (vLLM's ``ngram``): find the latest earlier occurrence of the sequence's last
    n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) and propose the tokens
    that followed it. No model: code edits, summaries and quotes copy their context."""

    def __init__(self, cfg: SpeculativeConfig):
        self.min_n, self.max_n = cfg.prompt_lookup_min, cfg.prompt_lookup_max

    def propose(self, seqs: list[tuple[Sequence, int]], engine) -> dict[int, Proposal]:
        out = {}
        for seq, k in seqs:
            tokens, n = lookup_match(seq.token_ids, self.min_n, self.max_n, k)
            if tokens:
                out[seq.seq_id] = Proposal(tokens, key=n)
        return out

    def release(self, live_ids: set[int]) -> None:
        pass


def lookup(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier match of the longest suffix of
    ``token_ids`` of length in [min_n, max_n]."""
    return lookup_match(token_ids, min_n, max_n, k)[0]


def lookup_match(token_ids: list[int], min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """``lookup``'s tokens and the length of the suffix that matched (0: no match)."""
    n_tokens = len(token_ids)
    if n_tokens < min_n + 1:
        return [], 0
    arr = np.asarray(token_ids, dtype=np.int64)
    # Candidate starts: where the last token occurs before the end (the match's last position).
    ends = np.flatnonzero(arr[:-1] == arr[-1])
    if ends.size == 0:
        return [], 0
    for n in range(min(max_n, n_tokens - 1), min_n - 1, -1):
        ok = ends[ends >= n - 1]
        for back in range(1, n):
            if ok.size == 0:
                break
            ok = ok[arr[ok - back] == arr[n_tokens - 1 - back]]
        if ok.size:
            start = int(ok[-1]) + 1  # the latest match: the nearest context is the likeliest copy
            return token_ids[start:start + k], n
    return [], 0


class _Shadow(Sequence):
    """A target sequence's copy in the draft model's block pool."""

    __slots__ = ("synced",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.synced = 0  # leading tokens known equal to the target's at the last sync


class DraftModelProposer:
    """A smaller model with the target's vocabulary proposes k tokens autoregressively: one
    forward that catches up on the tokens it has not seen (the prompt at first, then the tokens
    accepted last step) and proposes the first token, then k - 1 one-token forwards (compiled
    decode steps unless the engine is eager). Each target sequence has a shadow ``Sequence`` in
    the draft's own block pool; after verification the shadow keeps the K/V of the common prefix
    with the target's tokens and recomputes the rest."""

    def __init__(self, cfg: SpeculativeConfig, engine):
        from pagedlm.engine.model_runner import ModelRunner
        from pagedlm.loader.source import ModelSource

        source = ModelSource.open(cfg.model)  # the target's own source if it names the same file
        mcfg = source.config
        target_vocab = engine.model_config.vocab_size
        if mcfg.vocab_size != target_vocab:
            raise ValueError(f"draft model {cfg.model!r} has a vocabulary of {mcfg.vocab_size} tokens, the target "
                             f"model {target_vocab}: speculative decoding needs the same vocabulary")
        tok = source.tokenizer()
        if tok is not None and engine.tokenizer is not None and tok.get_vocab() != engine.tokenizer.get_vocab():
            raise ValueError(f"draft model {cfg.model!r} has a different tokenizer from the target model: "
                             "speculative decoding needs the same vocabulary")
        ec = engine.config
        self.runner = ModelRunner(source, mcfg, engine.dtype, ec.device,
                                  quantization=cfg.quantization or ec.quantization,
                                  enforce_eager=ec.enforce_eager, max_num_seqs=ec.max_num_seqs,
                                  compile_mode=ec.compile_mode)
        # As many tokens as the target's cache, plus room for every sequence's proposals.
        bs = ec.block_size
        num_blocks = engine.block_manager.num_blocks + ec.max_num_seqs * (-(-cfg.num_speculative_tokens // bs) + 1)
        self.runner.allocate_kv_cache(num_blocks, bs)
        self.bm = BlockManager(num_blocks, bs, enable_prefix_caching=False)
        self.max_len = min(engine.max_model_len, mcfg.max_position_embeddings)
        self.shadows: dict[int, _Shadow] = {}

    def release(self, live_ids: set[int]) -> None:
        """Free the shadows of sequences that no longer decode (finished, preempted, aborted)."""
        for sid in [s for s in self.shadows if s not in live_ids]:
            self.bm.free(self.shadows.pop(sid))

    def _sync(self, seq: Sequence) -> _Shadow:
        """The shadow of ``seq``, its computed K/V cut back to the prefix it shares with ``seq``."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = self.shadows[seq.seq_id] = _Shadow(seq.request_id, seq.token_ids, seq.params)
            shadow.num_prompt_tokens = seq.num_prompt_tokens
        old = shadow.token_ids
        common = min(shadow.num_computed_tokens, len(seq.token_ids))
        for i in range(shadow.synced, common):
            if old[i] != seq.token_ids[i]:
                common = i
                break
        shadow.token_ids = list(seq.token_ids)
        shadow.num_computed_tokens = common
        shadow.synced = len(seq.token_ids)
        return shadow

    def propose(self, seqs: list[tuple[Sequence, int]], engine) -> dict[int, Proposal]:
        active: list[tuple[Sequence, Sequence, int]] = []
        for seq, k in seqs:
            k = min(k, self.max_len - seq.num_tokens)
            if k < 1:
                continue
            shadow = self._sync(seq)
            if not self.bm.allocate(shadow, shadow.num_tokens - shadow.num_computed_tokens + k - 1):
                self.bm.free(self.shadows.pop(seq.seq_id))  # draft pool full: this one decodes plainly
                continue
            active.append((seq, shadow, k))
        tokens: dict[int, list[int]] = {seq.seq_id: [] for seq, _, _ in active}
        probs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq, _, _ in active}
        limit = {seq.seq_id: k for seq, _, k in active}
        # Constrained sequences draft under their grammar (q is the masked draft distribution, so
        # every proposal is one the grammar allows); the masks are verification's too.
        walks = {seq.seq_id: engine.grammars.walk(seq.grammar, k) for seq, _, k in active if seq.grammar is not None}
        try:
            for step in range(max(limit.values(), default=0)):
                batch = [(seq, shadow) for seq, shadow, _ in active if limit[seq.seq_id] > step]
                if not batch:
                    break
                # One-token rows first, as the scheduler orders a step: the attention backend
                # takes a step's first rows as its decodes (out of order, they read wrong rows).
                batch.sort(key=lambda b: b[1].num_tokens - b[1].num_computed_tokens > 1)
                choices = self._draft_step(batch, walks, probs, engine)
                for (seq, sh), tok in zip(batch, choices, strict=True):
                    sh.token_ids.append(tok)
                    tokens[seq.seq_id].append(tok)
                    walk = walks.get(seq.seq_id)
                    if walk is not None and not walk.push(tok):
                        limit[seq.seq_id] = step + 1  # the grammar is complete: the sequence ends there
        finally:
            masks = {sid: walk.close() for sid, walk in walks.items()}
        return {sid: Proposal(t, torch.stack(probs[sid]) if probs[sid] else None, masks=masks.get(sid))
                for sid, t in tokens.items()}

    def _draft_step(self, batch: list[tuple[Sequence, Sequence]], walks: dict, probs: dict, engine) -> list[int]:
        """One draft forward over ``batch`` (target, shadow): the next draft token of each."""
        sched = SchedulerOutput([(sh, sh.num_tokens - sh.num_computed_tokens) for _, sh in batch])
        inputs = self.runner.prepare(sched)
        logits = self.runner.execute(inputs)[[i for _, i in inputs.samples]]
        for _, sh in batch:
            sh.num_computed_tokens = sh.num_tokens
        rows = [SamplingRow(seq.params, sh.token_ids, sh.num_prompt_tokens, None,
                            engine.banned_ids(seq, sh.num_tokens - seq.num_tokens),
                            walks[seq.seq_id].mask if seq.seq_id in walks else None) for seq, sh in batch]
        logits = adjust_logits(logits, rows)
        sampled = [i for i, (seq, _) in enumerate(batch) if not seq.params.greedy]
        dist = sampling_probs(logits[sampled], [batch[i][0].params for i in sampled]) if sampled else None
        choice = greedy_tokens(logits).tolist()
        for j, i in enumerate(sampled):
            seq = batch[i][0]
            choice[i] = draw(dist[j], engine.generator_of(seq))
            probs[seq.seq_id].append(dist[j])
        return choice


# ---- verification ---------------------------------------------------------------------------
def verify(logits: torch.Tensor, seq: Sequence, proposal: list[int], q: torch.Tensor | None, engine,
           masks: torch.Tensor | None = None) -> tuple[list[int], int]:
    """(tokens to append, proposals accepted) for one sequence. ``logits``: the target's raw
    logits at its last token and at each proposal (``1 + len(proposal)`` rows); ``masks``: a
    constrained request's grammar mask per row (row i: the grammar after ``proposal[:i]``)."""
    k = len(proposal)
    # Each row's adjusted distribution sees the context as if the proposals before it were kept.
    context = seq.token_ids + proposal
    rows = [SamplingRow(seq.params, context[:seq.num_tokens + i], seq.num_prompt_tokens, None,
                        engine.banned_ids(seq, i), None if masks is None else masks[i]) for i in range(k + 1)]
    logits = adjust_logits(logits, rows)
    if seq.params.greedy:
        target = greedy_tokens(logits).tolist()
        a = next((i for i in range(k) if target[i] != proposal[i]), k)
        return proposal[:a] + [target[a]], a
    p = sampling_probs(logits, [seq.params] * (k + 1))
    gen = engine.generator_of(seq)
    u = torch.rand(k, generator=gen).tolist() if k else []
    for i, d in enumerate(proposal):
        qd = 1.0 if q is None else float(q[i, d])
        if u[i] * qd < float(p[i, d]):  # accept with probability min(1, p(d) / q(d))
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: accepting was the only outcome
            continue
        return proposal[:i] + [draw(residual, gen)], i
    return proposal + [draw(p[k], gen)], k

# ---- how much to verify ---------------------------------------------------------------------
class AdaptivePolicy:
    """How many of its proposed tokens each sequence verifies in this step.

    Verifying ``k`` proposals costs ``k`` more rows in the step's forward pass, and on a CPU a
    row is not free: the weight-only kernels' time grows with the rows (measured on SmolLM2: a
    4-row step ~1.7x a 1-row step). A proposal pays only when the tokens it is expected to add
    outweigh that. Per step, the policy maximises the expected tokens per second of the whole
    step: ``(rows + sum_i E_i(k_i)) / t(rows + sum_i k_i)``, choosing each sequence's ``k_i``
    greedily, likeliest sequences first, where

    * ``t(r)`` is the measured time of a compiled decode step of ``r`` rows' bucket
      (``CompiledDecode.step_seconds``, a moving average of this engine's own steps);
    * ``E(k) = a + a^2 + ... + a^k``: the expected accepted tokens when each proposal is accepted
      with probability ``a`` once its predecessors are (a run stops at the first rejection);
    * ``a`` is estimated per proposal *kind* (n-gram: the length of the matched suffix, which
      separates copies from coincidences): the sequence's own accepted / tested counts for that
      kind, plus the engine-wide rate of the kind counted as ``STRENGTH`` observations (so a new
      sequence starts from what the engine has seen, and its own history soon dominates).

    Without a measured step cost for the bucket that verifying everything needs (eager steps,
    CUDA, a bucket not compiled yet) every proposal is verified, so the cost gets measured.
    """

    STRENGTH = 2.0  # observations the engine-wide rate is worth to one sequence
    DECAY = 0.99  # per update of the engine-wide counts: recent traffic counts more
    PRIOR = (1.0, 2.0)  # engine-wide (accepted, tested) before any observation: a = 1/2

    def __init__(self, cost_table):
        self.cost_table = cost_table  # () -> (bucket sizes, {bucket: seconds}) or None
        self.engine_counts: dict[int, list[float]] = {}  # kind -> [accepted, tested]
        self.seq_counts: dict[int, dict[int, list[float]]] = {}  # seq_id -> kind -> [accepted, tested]

    def acceptance(self, seq_id: int, kind: int) -> float:
        ga, gt = self.engine_counts.get(kind, self.PRIOR)
        a, t = self.seq_counts.get(seq_id, {}).get(kind, (0.0, 0.0))
        return (a + self.STRENGTH * ga / gt) / (t + self.STRENGTH)

    def observe(self, seq_id: int, kind: int, proposed: int, accepted: int) -> None:
        """A verification: ``accepted`` of ``proposed`` tokens; a rejection (if any) is one more
        test that failed."""
        tested = accepted + (accepted < proposed)
        g = self.engine_counts.setdefault(kind, list(self.PRIOR))
        g[0] = g[0] * self.DECAY + accepted
        g[1] = g[1] * self.DECAY + tested
        c = self.seq_counts.setdefault(seq_id, {}).setdefault(kind, [0.0, 0.0])
        c[0] += accepted
        c[1] += tested

    def release(self, live_ids: set[int]) -> None:
        for sid in [s for s in self.seq_counts if s not in live_ids]:
            del self.seq_counts[sid]

    def choose(self, num_rows: int, proposals: list[tuple[int, int, int]]) -> dict[int, int]:
        """``proposals``: (seq_id, kind, tokens proposed) of the decoding sequences that have
        some; ``num_rows``: the step's rows without any proposal (one per decoding sequence).
        Returns how many tokens each sequence verifies."""
        full = {sid: n for sid, _, n in proposals}
        table = self.cost_table()
        if table is None:
            return full
        sizes, seconds = table

        def cost(rows: int) -> float | None:
            bucket = next((b for b in sizes if b >= rows), None)
            return None if bucket is None else seconds.get(bucket)

        all_rows = num_rows + sum(full.values())
        base = cost(num_rows)
        if base is None or (cost(all_rows) is None and all_rows <= sizes[-1]):
            return full  # a bucket it needs is not measured yet: verify everything, and it will be
        chosen = {}
        rows, tokens, rate = num_rows, float(num_rows), num_rows / base
        ranked = sorted(((self.acceptance(sid, kind), sid, n) for sid, kind, n in proposals), reverse=True)
        for a, sid, n in ranked:
            best_k, best_rate, expected, gain = 0, rate, 0.0, 0.0
            for k in range(1, n + 1):
                expected += a ** k
                t = cost(rows + k)
                if t is not None and (tokens + expected) / t > best_rate:
                    best_k, best_rate, gain = k, (tokens + expected) / t, expected
            chosen[sid] = best_k
            rows, tokens, rate = rows + best_k, tokens + gain, best_rate
        return chosen


class SpecDecoder:
    """The engine's seam: ``propose`` before scheduling, ``proposal_of`` when verifying."""

    def __init__(self, cfg: SpeculativeConfig, engine):
        self.cfg = cfg
        self.k = cfg.num_speculative_tokens
        self.proposer = NgramProposer(cfg) if cfg.method == "ngram" else DraftModelProposer(cfg, engine)
        # Engine-wide (per request: RequestMetrics.spec_decode); every position listed from the start.
        self.stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * self.k)
        self.proposals: dict[int, Proposal] = {}
        # A draft model's proposals cost its own forward passes, which the step-cost table does
        # not see: it verifies every proposal.
        adaptive = cfg.adaptive and cfg.method == "ngram"
        self.policy = AdaptivePolicy(lambda: step_cost_table(engine.runner, self.host_seconds)) if adaptive else None
        compiled = getattr(engine.runner, "compiled", None)
        if adaptive and compiled is not None:
            # Buckets between the powers of two, so that a verification of 1 + j rows pays for
            # little padding (3 rows cost ~1.5 plain steps here, not bucket 4's ~1.7).
            compiled.add_sizes([b for b in (3, 6, 12) if b <= 1 + self.k])
        # What a step costs besides its compiled forward (scheduling, sampling, output
        # processing): the same for any number of rows, so it makes rows relatively cheaper.
        self.host_seconds = 0.0
        self._mark: tuple[float, int] | None = None  # (time, compiled steps) at the last propose

    def warmup(self, buckets: list[int] | None) -> None:
        runner = getattr(self.proposer, "runner", None)
        if runner is not None and runner.compiled is not None:
            runner.compiled.warmup([b for b in buckets if b in runner.compiled.sizes] if buckets else None)

    def budget(self, seq: Sequence, max_model_len: int) -> int:
        """How many tokens ``seq`` may propose now: k, less near max_tokens / max_model_len
        (the last token of a run is always the target's own)."""
        p = seq.params
        if seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        k = min(self.k, max_model_len - seq.num_tokens)
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_output_tokens - 1)
        return max(0, k)

    def _time_host(self, engine) -> None:
        """Moving average of a step's time outside its compiled forward: the time between two
        proposals with exactly one compiled step between them, less that step's forward."""
        compiled = getattr(engine.runner, "compiled", None)
        if compiled is None:
            return
        now = time.perf_counter()
        if self._mark is not None and compiled.num_steps == self._mark[1] + 1 and now - self._mark[0] < 1.0:
            host = max(0.0, now - self._mark[0] - compiled.last_step_seconds)
            self.host_seconds = host if not self.host_seconds else self.host_seconds + 0.1 * (host - self.host_seconds)
        self._mark = (now, compiled.num_steps)

    def propose(self, running: list[Sequence], engine) -> None:
        if self.policy is not None:
            self._time_host(engine)
        want = []
        for seq in running:
            seq.spec_tokens = []
            k = self.budget(seq, engine.max_model_len)
            if k:
                want.append((seq, k))
        self.proposer.release({seq.seq_id for seq, _ in want})
        self.proposals = self.proposer.propose(want, engine) if want else {}
        self._grammar_cut(want)
        keep = None
        if self.policy is not None:
            self.policy.release({seq.seq_id for seq in running})
            decoding = sum(seq.num_tokens - seq.num_computed_tokens == 1 for seq in running)
            keep = self.policy.choose(decoding, [(sid, p.key, len(p.tokens)) for sid, p in self.proposals.items()])
        for seq, _ in want:
            prop = self.proposals.get(seq.seq_id)
            if prop is not None:
                seq.spec_tokens = list(prop.tokens if keep is None else prop.tokens[:keep[seq.seq_id]])
                if seq.grammar is not None and seq.spec_tokens and prop.masks is None:
                    prop.masks = engine.grammars.masks_along(seq.grammar, seq.spec_tokens)

    def _grammar_cut(self, want: list[tuple[Sequence, int]]) -> None:
        """Cut each constrained sequence's point-mass proposal (n-gram) before the first token its
        grammar rejects, and after one that completes it. Exact: verification would reject that
        token for sure (its masked probability is 0) and draw from p, as it now draws the bonus
        token from p; and nothing after a completing token is appended."""
        for seq, _ in want:
            prop = self.proposals.get(seq.seq_id)
            if prop is not None and seq.grammar is not None and prop.masks is None and prop.probs is None:
                prop.tokens = prop.tokens[: seq.grammar.validate_tokens(prop.tokens)]
                if not prop.tokens:
                    del self.proposals[seq.seq_id]

    def verify(self, logits: torch.Tensor, seq: Sequence, engine) -> tuple[list[int], int, list | None]:
        """Verify ``seq.spec_tokens`` (possibly cut by the scheduler) against ``logits``: the
        tokens to append, the proposals accepted, and (when the request asks for logprobs) each
        token's ((logprob, rank), top logprobs) from its own row, as plain sampling reports them."""
        proposal = seq.spec_tokens
        prop = self.proposals[seq.seq_id]
        q = None if prop.probs is None else prop.probs[: len(proposal)]
        masks = None if prop.masks is None else prop.masks[: len(proposal) + 1]
        tokens, accepted = verify(logits, seq, proposal, q, engine, masks)
        if self.policy is not None:
            self.policy.observe(seq.seq_id, prop.key, len(proposal), accepted)
        logprobs = None
        if seq.params.logprobs is not None:
            raw = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
            lp, ranks, top = token_logprobs(raw, torch.tensor(tokens), [seq.params.logprobs] * len(tokens))
            logprobs = [((lp[j], ranks[j]), top[j]) for j in range(len(tokens))]
        return tokens, accepted, logprobs


def step_cost_table(runner, host_seconds: float = 0.0) -> tuple[list[int], dict[int, float]] | None:
    """(bucket sizes, measured seconds of a decode step per bucket: its compiled forward plus
    ``host_seconds``) of a runner that decodes through compiled CPU steps; None otherwise
    (eager, CUDA: times without a device synchronisation would be launch times)."""
    compiled = getattr(runner, "compiled", None)
    if compiled is None or compiled.failed or compiled.device.type != "cpu":
        return None
    return compiled.sizes, {b: t + host_seconds for b, t in compiled.step_seconds.items()}
