"""Batched sampling with per-request parameters.

Order, per row: penalties (repetition over prompt + output, frequency / presence over output)
-> logit_bias -> min_tokens (EOS and stop ids masked) -> the grammar's token bitmask (structured
output; where it and min_tokens leave nothing, the grammar wins) -> greedy rows take the argmax -> temperature ->
top-k -> top-p -> min-p -> a draw by the exponential race: argmax(p / E), E ~ Exp(1), which
picks token i with probability p_i. Each seeded request draws its noise from its own generator,
one vocab-sized draw per token, so its samples do not depend on what else is in the batch.
Logprobs are of the model's raw distribution (log_softmax of the logits), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedlm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # the sequence's tokens, by reference: sliced only when a penalty needs them
    num_prompt_tokens: int
    generator: torch.Generator | None
    banned: list[int]  # ids masked by min_tokens this step
    allowed: torch.Tensor | None = None  # structured output: int32 bitmask of the tokens the grammar allows

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each sampled token (when any row asked)
    ranks: list[int] | None  # rank of each sampled token in the raw distribution (1 = likeliest)
    top_logprobs: list[tuple[list[int], list[float]] | None]  # per row: top ids and logprobs


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            ids = torch.tensor(r.output_ids, dtype=torch.long)
            counts = torch.zeros(vocab, dtype=logits.dtype).index_add_(0, ids, torch.ones(len(ids), dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _plain_greedy(r: SamplingRow) -> bool:
    p = r.params
    return (p.greedy and p.logprobs is None and not r.banned and p.repetition_penalty == 1.0
            and not p.frequency_penalty and not p.presence_penalty and r.allowed is None and not p.logit_bias)


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            bias = {t: v for t, v in r.params.logit_bias.items() if t < vocab}
            logits[i, torch.tensor(list(bias), dtype=torch.long)] += torch.tensor(list(bias.values()),
                                                                                  dtype=logits.dtype)


def _apply_grammar(logits: torch.Tensor, rows: list[SamplingRow], unbanned: torch.Tensor | None) -> None:
    """Mask the constrained rows in place; a row that min_tokens bans and the mask together leave
    empty is masked from ``unbanned`` (the logits before the bans) instead: the grammar wins."""
    from pagedlm.engine.structured import apply_bitmask

    idx = [i for i, r in enumerate(rows) if r.allowed is not None]
    masks = torch.stack([rows[i].allowed for i in idx])
    every = len(idx) == len(rows)
    sel = None if every else torch.tensor(idx, dtype=torch.long)
    sub = logits if every else logits[sel]
    apply_bitmask(sub, masks)
    if unbanned is not None:
        banned = [k for k, i in enumerate(idx) if rows[i].banned]
        for k in banned:
            if torch.isneginf(sub[k]).all():
                fallback = unbanned[idx[k]: idx[k] + 1].clone()
                apply_bitmask(fallback, masks[k: k + 1])
                sub[k] = fallback[0]
    if not every:
        logits[sel] = sub


def adjust_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalties, logit_bias, min_tokens bans and grammar masks (the logits greedy rows take the
    argmax of); returns a new tensor when anything changes, so the caller's logits stay untouched."""
    if any(r.params.repetition_penalty != 1.0 or r.params.frequency_penalty or r.params.presence_penalty
           for r in rows):
        logits = logits.clone()
        _apply_penalties(logits, rows)
    elif any(r.banned or r.params.logit_bias or r.allowed is not None for r in rows):
        logits = logits.clone()
    _apply_logit_bias(logits, rows)
    constrained = any(r.allowed is not None for r in rows)
    unbanned = logits.clone() if constrained and any(r.banned for r in rows) else None
    for i, r in enumerate(rows):
        if r.banned:
            logits[i, torch.tensor(r.banned, dtype=torch.long)] = float("-inf")
    if constrained:
        _apply_grammar(logits, rows, unbanned)
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a random row draws from: temperature, top-k, top-p, min-p over adjusted
    logits (one row per entry of ``params``, none greedy)."""
    vocab = logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    sub = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        ks = torch.tensor([k if k > 0 else vocab for k in top_k])
        ranks = torch.arange(vocab)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
        probs_sorted = sorted_logits.softmax(dim=-1)
        # keep the smallest head whose mass reaches top_p (always at least the top token)
        before = probs_sorted.cumsum(dim=-1) - probs_sorted
        ps = torch.tensor(top_p, dtype=sub.dtype)
        sorted_logits = sorted_logits.masked_fill(before >= ps[:, None], float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter_(1, order, sorted_logits)
    probs = sub.softmax(dim=-1)
    if any(m > 0 for m in min_p):
        mp = torch.tensor(min_p, dtype=probs.dtype)
        probs = probs.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, the first index where values tie (as ``argmax``; NaN counts as the
    largest in both). ``max(dim=-1).indices`` computes the same indices ~2-2.5x faster than
    torch's CPU ``argmax`` (SmolLM2's 49152 logits: 32 against 64 us a row, 0.85 against 2.1 ms
    for 64 rows), a few percent of a batch-1 decode step."""
    return logits.max(dim=-1).indices


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from an (unnormalised) distribution by the exponential race: argmax(p / E)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def sample(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator | None = None
           ) -> SamplerOutput:
    """logits: (rows, vocab), float32."""
    logits = logits.float()
    n, vocab = logits.shape
    if all(_plain_greedy(r) for r in rows):
        # Greedy fast path: one argmax, nothing built per row.
        return SamplerOutput(greedy_tokens(logits).tolist(), None, None, [None] * n)
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = adjust_logits(logits, rows)

    tokens = greedy_tokens(logits)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, dtype=torch.long)
        probs = sampling_probs(logits[idx], [rows[i].params for i in random_rows])
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            noise[j].exponential_(generator=rows[i].generator or default_generator)
        tokens[idx] = (probs / noise).argmax(dim=-1)

    token_list = tokens.tolist()
    lp, ranks, top = None, None, [None] * n
    if raw_logprobs is not None:
        lp, ranks, top = token_logprobs(raw_logprobs, tokens, [r.params.logprobs for r in rows])
    return SamplerOutput(token_list, lp, ranks, top)


def token_logprobs(raw_logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int | None]
                   ) -> tuple[list[float], list[int], list[tuple[list[int], list[float]] | None]]:
    """Per row: the logprob of its token in the raw distribution (before penalties, masks and
    temperature, as vLLM reports them), its rank (1 = likeliest) and, where ``ks[i]`` asks, the
    ids and logprobs of the row's ``ks[i]`` likeliest tokens."""
    chosen = raw_logprobs.gather(1, tokens[:, None])
    lp = chosen.squeeze(1).tolist()
    ranks = ((raw_logprobs > chosen).sum(dim=-1) + 1).tolist()
    top = [None] * len(ks)
    for i, k in enumerate(ks):
        if k:
            vals, ids = raw_logprobs[i].topk(k)
            top[i] = (ids.tolist(), vals.tolist())
    return lp, ranks, top
