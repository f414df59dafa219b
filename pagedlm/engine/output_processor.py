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

**Across a process** (``serve --engine-core process``, engine/core_process.py) the same seam is
cut in two, and the code above runs on the API server's side:

* In the core, ``CoreDeltas`` takes the output processor's place (``LLMEngine.emit_deltas``): it
  keeps no text and makes no decision (``add_token`` always returns None), and ``make_output``
  returns a ``RequestDelta`` per changed request: per sample the token ids appended since the
  last delta with their raw logprobs and the core's ending (a ``SampleDelta``), the prompt
  logprobs and metrics with the request's first delta (metrics again when it finishes, or every
  delta with speculative decoding), and its error.
* In the API server, ``DeltaProcessor`` (this ``OutputProcessor`` plus the API side's mirror of
  each request, ``RemoteRequest`` / ``RemoteSample``) replays each delta through the same
  ``add_token`` / ``make_output`` the in-process engine calls per token, so text, holdback, stop
  strings, logprobs and deltas are computed by one code. A stop string found there ends the
  sample at that token, as in-process, and ``apply`` returns it so the client tells the core to
  finish the sequence there (``LLMEngine.stop_sequence``: its blocks are freed; tokens the core
  generated past it in the meantime are dropped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pagedlm.engine.sequence import Finish, Sequence
from pagedlm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
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


class _PromptLogprobs:
    """``record_prompt_logprobs``, shared by both output processors of the core (their request
    states have a ``prompt_logprobs`` list)."""

    states: dict[str, Any]

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


class OutputProcessor(_PromptLogprobs):
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


# ---- across a process boundary (engine/core_process.py) ------------------------------------------

# How a sample's ending relates to its last token in a delta (``SampleDelta.finish[2]``): the core
# ended it after that token for a reason of its own that shows the token's text (length, grammar:
# ``add_token`` flushes), by that token itself (a stop token or EOS: never shown as text), or
# apart from any token (an error, an abort: no flush).
END_AFTER, END_AT, END_BY = 0, 1, 2


class SampleDelta(NamedTuple):
    """What one sample did since its request's previous delta (plain values: pickled small)."""

    index: int
    token_ids: list[int]  # appended since the previous delta, in order
    logprobs: list[tuple[float, int] | None] | None  # per token (logprob, rank); None: not asked
    tops: list[Any] | None  # per token the sampler's top (ids, logprobs), or None; None: not asked
    finish: tuple[str, int | str | None, int] | None  # (finish_reason, stop_reason, END_*) once it ended


class RequestDelta(NamedTuple):
    """One step's news of one request, from the core (``CoreDeltas.make_output``)."""

    request_id: str
    samples: tuple[SampleDelta, ...]  # only the samples that changed
    finished: bool  # every sample ended in the core (it has forgotten the request)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # with the first delta only
    metrics: RequestMetrics | None = None  # with the first delta and the last (every one with spec decoding)
    error: str | None = None


@dataclass(slots=True)
class _Pending:
    token_ids: list[int]
    logprobs: list | None
    tops: list | None
    end: int = END_AFTER
    reported: bool = False  # its ending went out in a delta


@dataclass(slots=True)
class _CoreState:
    samples: list[_Pending]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    first: bool = True


class CoreDeltas(_PromptLogprobs):
    """The core's output processor when its outputs go to another process
    (``LLMEngine.emit_deltas``): the same seam as ``OutputProcessor``, but no text and no stop
    strings (``add_token`` never decides an ending); ``make_output`` returns a ``RequestDelta``
    of what changed since the request's previous one."""

    def __init__(self, every_metrics: bool = False):
        self.states: dict[str, _CoreState] = {}
        self.every_metrics = every_metrics  # metrics that change every step (speculative decoding)

    def add_request(self, req: Request, prompt: str | None) -> None:
        asked = req.params.logprobs is not None
        self.states[req.request_id] = _CoreState(
            [_Pending([], [] if asked else None, [] if asked else None) for _ in req.seqs],
            [None] if req.params.prompt_logprobs is not None else None)

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def add_token(self, seq: Sequence, token: int, logprob: tuple[float, int] | None, top,
                  end: Finish | None) -> None:
        s = self.states[seq.request_id].samples[seq.index]
        s.token_ids.append(token)
        if s.logprobs is not None:
            s.logprobs.append(logprob)
            s.tops.append(top)
        if end is not None:
            s.end = END_BY if end.by_token else END_AT
        return None

    def make_output(self, req: Request) -> RequestDelta:
        state = self.states[req.request_id]
        samples = []
        for seq, s in zip(req.seqs, state.samples):
            finish = None
            if seq.is_finished and not s.reported:
                s.reported = True
                finish = (seq.finish_reason, seq.stop_reason, s.end)
            if s.token_ids or finish is not None:
                samples.append(SampleDelta(seq.index, s.token_ids, s.logprobs, s.tops, finish))
                s.token_ids = []
                if s.logprobs is not None:
                    s.logprobs, s.tops = [], []
        req.metrics.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        finished = req.finished
        first, state.first = state.first, False
        if finished:
            del self.states[req.request_id]
        return RequestDelta(req.request_id, tuple(samples), finished, state.prompt_logprobs if first else None,
                            req.metrics if first or finished or self.every_metrics else None, req.error)


class RemoteSample:
    """The API server's view of one sample of a request stepped in another process: what the
    ``OutputProcessor`` reads of a core ``Sequence``."""

    __slots__ = ("request_id", "index", "params", "output_token_ids", "finish_reason", "stop_reason")

    def __init__(self, request_id: str, index: int, params: SamplingParams):
        self.request_id = request_id
        self.index = index
        self.params = params
        self.output_token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class RemoteRequest:
    """The API server's view of a request stepped in another process (what the
    ``OutputProcessor`` reads of a core ``Request``)."""

    __slots__ = ("request_id", "prompt_ids", "params", "seqs", "metrics", "error")

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = [RemoteSample(request_id, i, params) for i in range(params.n)]
        # Replaced by the core's own with the request's first delta.
        self.metrics = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(prompt_ids))
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class DeltaProcessor(OutputProcessor):
    """The ``OutputProcessor`` on the API server's side of a core process: ``apply`` replays a
    core's ``RequestDelta`` token by token through ``add_token`` and ``make_output`` (the very
    calls the in-process engine makes), so the outputs are those of the in-process engine. Call
    it from one thread (it uses the tokenizer)."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self.requests: dict[str, RemoteRequest] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        """Follow a request that the core is about to take."""
        req = RemoteRequest(request_id, list(prompt_ids), params)
        self.add_request(req, prompt)
        self.requests[request_id] = req

    def drop(self, request_id: str) -> None:
        super().drop(request_id)
        self.requests.pop(request_id, None)

    def apply(self, delta: RequestDelta) -> tuple[RequestOutput | None, list[tuple[int, str, int]]]:
        """The request's output after ``delta`` (None when it shows nothing new: the request is
        gone here, or only samples that already ended here moved in the core), and the stop
        strings found: (sample index, stop string, output tokens kept), each a sample that
        ended here and that the core must end too (its later tokens are dropped)."""
        req = self.requests.get(delta.request_id)
        if req is None:
            return None, []
        if delta.prompt_logprobs is not None:
            self.states[req.request_id].prompt_logprobs = delta.prompt_logprobs
        if delta.metrics is not None:
            req.metrics = delta.metrics
        changed = delta.error is not None
        if changed:
            req.error = delta.error
        stops = []
        for index, tokens, lps, tops, finish in delta.samples:
            seq = req.seqs[index]
            if seq.is_finished:  # ended here by a stop string: the core's later news is void
                continue
            changed = True
            last = len(tokens) - 1
            for j, tok in enumerate(tokens):
                seq.output_token_ids.append(tok)
                end = None
                if j == last and finish is not None and finish[2] != END_AFTER:
                    end = Finish(finish[0], finish[1], by_token=finish[2] == END_BY)
                stop = self.add_token(seq, tok, None if lps is None else lps[j], None if tops is None else tops[j],
                                      end)
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    stops.append((index, stop, seq.num_output_tokens))
                    break
            else:
                if finish is not None:
                    seq.finish_reason, seq.stop_reason = finish[0], finish[1]
        if not changed:
            return None, stops
        if stops and req.finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.perf_counter()
        return self._output(req), stops

    def fail(self, request_id: str, message: str) -> RequestOutput | None:
        """End a request whose output processing failed here (a detokenizer error) as the core
        ends one that fails in a step: finish_reason "error" and ``error``. The caller aborts it
        in the core."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.error = message
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
        if req.metrics.finished_time is None:
            req.metrics.finished_time = time.perf_counter()
        return self._output(req)

    def _output(self, req: RemoteRequest) -> RequestOutput:
        out = self.make_output(req)
        if out.finished:
            del self.requests[req.request_id]
        return out
