"""Output processing: text, stop strings, holdback, deltas and logprobs, apart from the engine core.

The engine core (``engine.py``: schedule -> run -> sample -> append token ids, advance grammars,
account KV blocks) decides everything that is about token ids: stop token ids and EOS,
max_tokens, max_model_len, a grammar that completed. It never looks at text. The
``OutputProcessor`` owns the rest of what a ``RequestOutput`` says, in typed per-request state
(``RequestState``: prompt text, prompt logprobs, one ``SampleState`` per sample with its
incremental detokenizer, text, what was already sent, logprobs and cumulative logprob).

The seam (every call on the engine's thread, inside ``LLMEngine.add_request`` / ``step`` /
``abort_request``; vLLM v1 splits the same way into ``EngineCore`` and ``OutputProcessor``):

* ``add_request(req, prompt)`` when the core admits a request; ``drop(request_id)`` when it is
  aborted. Otherwise the state goes with the request's last output (``make_output``).
* ``add_token(seq, token, logprob, top, end)`` once for every token the core appends, in order
  (a speculative run calls it per kept token). ``end`` is the core's own ending for this token
  (``sequence.Finish``) or None. It records the token's logprobs; detokenizes it unless the token
  itself ended the sequence (a stop token or EOS never shows as text); and returns the stop
  string the text now contains, if any. **That return is a decision**: the core must finish the
  sequence with ("stop", that string), which overrides its own ending (length, grammar), and a
  speculative run stops there. Else, when the core ends the sequence after this token (length,
  grammar), the detokenizer is flushed (an incomplete last character is emitted too).
* ``record_prompt_logprobs(seq, logits, first, count, start)`` after a prefill chunk's forward.
* ``make_output(req)`` -> ``RequestOutput`` for each request the step changed: cumulative text
  and token ids, and the deltas since the request's previous output (``text_delta``,
  ``token_ids_delta``, what a stream sends). While a sample runs, a tail of its text that may be
  the start of a stop string is held back from ``text_delta`` (``stop_prefix_len``): a stream
  never shows text that the stop string will cut.

Errors raised here (a detokenizer failure) end only their request: the core calls ``add_token``
and ``record_prompt_logprobs`` inside its per-request fault isolation (``engine/faults.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagedlm.engine.sequence import Finish, Sequence
from pagedlm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from pagedlm.engine.engine import Request


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass(slots=True)
class SampleState:
    """What one sample's outputs say so far, and how much of it was already sent."""

    detok: IncrementalDetokenizer | None  # None: no tokenizer, or detokenize=False
    logprobs: list[dict[int, Logprob]] | None  # one dict per generated token when logprobs were asked
    text: str = ""
    cum_logprob: float = 0.0
    sent_text: int = 0  # characters of text in earlier outputs' deltas
    sent_tokens: int = 0  # output token ids in earlier outputs' deltas


@dataclass(slots=True)
class RequestState:
    prompt: str | None
    samples: list[SampleState]  # by Sequence.index
    # prompt_logprobs: entry 0 is None (the first token has no context); None when not asked.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}  # by request id, while the request lives

    def add_request(self, req: Request, prompt: str | None) -> None:
        p = req.params
        detokenize = self.tokenizer is not None and p.detokenize
        samples = [SampleState(IncrementalDetokenizer(self.tokenizer, req.prompt_ids, p.skip_special_tokens)
                               if detokenize else None,
                               [] if p.logprobs is not None else None)
                   for _ in req.seqs]
        self.states[req.request_id] = RequestState(prompt, samples,
                                                   [None] if p.prompt_logprobs is not None else None)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    # ---- per token -------------------------------------------------------------------------
    def add_token(self, seq: Sequence, token: int, logprob: tuple[float, int] | None, top,
                  end: Finish | None) -> str | None:
        """Record a token the core appended; the stop string that ends ``seq`` now, else None."""
        s = self.states[seq.request_id].samples[seq.index]
        if logprob is not None:
            s.cum_logprob += logprob[0]
            if s.logprobs is not None:
                entry = {token: Logprob(*logprob)}
                if top is not None:
                    for rank, (tid, v) in enumerate(zip(*top), 1):
                        entry.setdefault(tid, Logprob(v, rank))
                s.logprobs.append(entry)
        if s.detok is None or (end is not None and end.by_token):
            return None
        delta = s.detok.add(token)
        if delta:
            s.text += delta
            p = seq.params
            if p.stop_list and seq.num_output_tokens >= p.min_tokens:
                stop = _cut_at_stop_string(s, p, len(delta))
                if stop is not None:
                    return stop
        if end is not None:  # the core ends the sequence here: emit even an incomplete character
            s.text += s.detok.flush()
        return None

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, first: int, count: int,
                               start: int) -> None:
        """Logprobs of prompt tokens ``start + 1 .. start + count`` from logits rows
        ``first .. first + count`` (each row predicts the next prompt token)."""
        entries = self.states[seq.request_id].prompt_logprobs
        if len(entries) != start + 1:
            return  # recomputed after a preemption: already recorded
        lps = torch.log_softmax(logits[first:first + count], dim=-1)
        k = seq.params.prompt_logprobs
        for r in range(count):
            target = seq.token_ids[start + r + 1]
            entry = {target: Logprob(lps[r, target].item())}
            if k:
                vals, ids = lps[r].topk(k)
                for rank, (tid, v) in enumerate(zip(ids.tolist(), vals.tolist()), 1):
                    entry.setdefault(tid, Logprob(v, rank))
            entries.append(entry)

    # ---- outputs ---------------------------------------------------------------------------
    def make_output(self, req: Request) -> RequestOutput:
        """The request's output now, with the deltas since its previous one; a finished request's
        state is dropped."""
        state = self.states[req.request_id]
        outs = [_completion(seq, s) for seq, s in zip(req.seqs, state.samples)]
        req.metrics.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        finished = req.finished
        if finished:
            del self.states[req.request_id]
        return RequestOutput(req.request_id, state.prompt, req.prompt_ids, outs, finished,
                             state.prompt_logprobs, req.metrics, req.error)


def _cut_at_stop_string(s: SampleState, p: SamplingParams, delta_len: int) -> str | None:
    """The earliest stop string in the text that the last ``delta_len`` characters completed (the
    text is cut there, keeping it if include_stop_str_in_output); None if there is none."""
    text = s.text
    longest = max(len(stop) for stop in p.stop_list)
    window_start = max(0, len(text) - delta_len - longest + 1)
    best = None
    for stop in p.stop_list:
        i = text.find(stop, window_start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return None
    i, stop = best
    s.text = text[: i + len(stop)] if p.include_stop_str_in_output else text[:i]
    return stop


def _completion(seq: Sequence, s: SampleState) -> CompletionOutput:
    text = s.text
    toks = seq.output_token_ids
    # While running, hold back a tail that may be the start of a stop string: a stream must never
    # show text that the stop string will cut.
    ready = len(text) if seq.is_finished else len(text) - stop_prefix_len(text, seq.params.stop_list)
    sent = s.sent_text
    out = CompletionOutput(
        index=seq.index, text=text, token_ids=list(toks),
        cumulative_logprob=s.cum_logprob if seq.params.logprobs is not None else None,
        logprobs=s.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        text_delta=text[sent:ready] if ready > sent else "",
        token_ids_delta=list(toks[s.sent_tokens:]),
    )
    s.sent_text, s.sent_tokens = max(sent, ready), len(toks)
    return out
