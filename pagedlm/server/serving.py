"""What /v1/completions and /v1/chat/completions share: ``OpenAIServing``.

A serving class turns one validated request into engine requests and their outputs into an
OpenAI response. The base class holds the steps both endpoints take: the model name check
(``ServedModels``), sampling parameters, starting the engine requests, following their outputs
(``each_output``: latency metrics, aborting what is left when the client goes), the blocking
answer, and the one streaming generator (``stream``) that turns outputs into SSE chunks with
the final usage, timings, an abort or an error. Subclasses (``serving_completion.py``,
``serving_chat.py``) supply the request-specific parts: prompts, the response types, and the
choice a chunk carries for one output (``stream_choice``).

Streams consume the engine's deltas (``CompletionOutput.text_delta`` / ``token_ids_delta``):
the engine already holds back a tail that may become a stop string, and a ``RequestStream``
whose consumer falls behind concatenates the deltas of the outputs it skips, so the sum of the
deltas a stream sees is always the final text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedlm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestAbortedError, RequestStream
from pagedlm.errors import RequestFailedError
from pagedlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.server import protocol as P
from pagedlm.server.errors import APIError, api_error
from pagedlm.server.metrics import ServerMetrics
from pagedlm.server.structured import StructuredFieldError, structured_params

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    if isinstance(obj, P.BaseModel):
        return f"data: {obj.model_dump_json()}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


class ServedModels:
    """The names this server answers to: the served model (also by its path) and each LoRA
    adapter (``--lora-modules``), which a request selects by name."""

    def __init__(self, async_engine: AsyncLLMEngine, name: str):
        engine = async_engine.engine
        self.name, self.path, self.max_model_len = name, engine.model_path, engine.max_model_len
        self.loras = engine.lora_requests
        if name in self.loras:
            raise ValueError(f"LoRA module name {name!r} is the served model's name; rename one of them")
        self.created = int(time.time())

    def check(self, model: str | None):
        """The LoRARequest of a model name that is an adapter; None for the base model."""
        if model is None or model == self.name or model == self.path:
            return None
        if model in self.loras:
            return self.loras[model]
        served = ", ".join(repr(n) for n in [self.name, *self.loras])
        raise APIError(400, f"model {model!r} is not served here; this server serves {served}",
                       param="model", code="model_not_found")

    def response_name(self, model: str | None) -> str:
        return model if model in self.loras else self.name

    def cards(self) -> P.ModelList:
        base = P.ModelCard(id=self.name, created=self.created, root=self.path, max_model_len=self.max_model_len)
        adapters = [P.ModelCard(id=name, created=self.created, root=lora.lora_path, parent=self.name,
                                max_model_len=self.max_model_len) for name, lora in self.loras.items()]
        return P.ModelList(data=[base, *adapters])


# ---- usage and timings -------------------------------------------------------------------------
def _timings(metrics: list[RequestMetrics]) -> P.Timings:
    """llama.cpp-style timings; for several prompts, counts are summed and times span them all."""
    ms = [m for m in metrics if m is not None]
    if not ms:
        return P.Timings()

    def span(a: list[float | None], b: list[float | None]) -> float | None:
        if any(x is None for x in a) or any(x is None for x in b) or not a:
            return None
        return (max(b) - min(a)) * 1000.0 if len(a) > 1 else (b[0] - a[0]) * 1000.0

    arrival = [m.arrival_time for m in ms]
    sched = [m.first_scheduled_time for m in ms]
    first = [m.first_token_time for m in ms]
    done = [m.finished_time for m in ms]
    prompt_n = sum(m.num_prompt_tokens for m in ms)
    cache_n = sum(m.num_cached_tokens for m in ms)
    predicted_n = sum(m.num_generated_tokens for m in ms)
    t = P.Timings(prompt_n=prompt_n, cache_n=cache_n, predicted_n=predicted_n)
    t.queue_ms = None if None in sched else (min(sched) - min(arrival)) * 1000.0
    t.prompt_ms = span(sched, first)
    t.ttft_ms = None if None in first else (max(first) - min(arrival)) * 1000.0
    t.predicted_ms = span(first, done)
    if t.prompt_ms:
        t.prompt_per_second = (prompt_n - cache_n) / t.prompt_ms * 1000.0
    if t.predicted_ms and predicted_n > len(ms):
        t.predicted_per_token_ms = t.predicted_ms / (predicted_n - len(ms))
        t.predicted_per_second = 1000.0 / t.predicted_per_token_ms
    return t


class Usage:
    """The latest output of each prompt of a request, for its usage and timings.
    ``completion=False``: the engine's tokens are not part of the reply (completions' ``echo``
    with ``max_tokens`` 0 generates one and drops it), so ``completion_tokens`` is 0."""

    def __init__(self, outputs: list[RequestOutput] | None = None, completion: bool = True):
        self.outputs: dict[int, RequestOutput] = dict(enumerate(outputs or []))
        self.completion = completion

    def add(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out

    def usage(self) -> P.Usage:
        outs = list(self.outputs.values())
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs) if self.completion else 0
        cached = sum(o.metrics.num_cached_tokens for o in outs if o.metrics is not None)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))

    def timings(self) -> P.Timings:
        return _timings([o.metrics for o in self.outputs.values()])


# ---- client disconnects ------------------------------------------------------------------------
class _ClientGone(Exception):
    pass


async def _until_disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro):
    """Run ``coro``; if the client disconnects first, cancel it (its requests are aborted)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
    if work.cancelled():
        raise _ClientGone()
    return work.result()


# ---- streaming state ---------------------------------------------------------------------------
class ChoiceState:
    """One choice of a response: how many of its tokens the client has been sent, whether it
    finished, and (completions' logprobs) the text offset of the next token."""

    __slots__ = ("index", "num_tokens", "finished", "text_offset")

    def __init__(self, index: int):
        self.index = index
        self.num_tokens = 0
        self.finished = False
        self.text_offset = 0

    def take(self, c: CompletionOutput) -> tuple[int, int]:
        """The positions of the tokens ``c`` adds (its ``token_ids_delta``) in the choice."""
        start = self.num_tokens
        self.num_tokens += len(c.token_ids_delta)
        return start, self.num_tokens


@dataclass
class StreamContext:
    """One streamed response: what its chunks share. Subclasses add the endpoint's own state."""

    req: Any
    params: SamplingParams
    rid: str
    num_prompts: int
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[tuple[int, int], ChoiceState] = field(default_factory=dict)
    completion: bool = True  # False: the engine's tokens are dropped from the reply (``Usage``)

    def __post_init__(self) -> None:
        n = self.params.n
        self.choices = {(i, j): ChoiceState(i * n + j) for i in range(self.num_prompts) for j in range(n)}


# ---- the base class ----------------------------------------------------------------------------
class OpenAIServing:
    """Shared request handling of the generating endpoints (see the module docstring)."""

    chunk_type: type[P.BaseModel]  # the response type of one streamed chunk
    prompt_param = "prompt"  # the request field that holds the prompt, for errors about it

    def __init__(self, async_engine: AsyncLLMEngine, models: ServedModels, metrics: ServerMetrics):
        self.async_engine = async_engine
        engine = async_engine.engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self.max_num_seqs = engine.config.max_num_seqs
        self.models = models
        self.metrics = metrics
        self.token_str = functools.lru_cache(maxsize=65536)(self._token_str)

    def _token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False) if self.tokenizer is not None else str(tid)

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt",
                           code="no_tokenizer")

    # ---- sampling parameters --------------------------------------------------------------------
    def check_request(self, req: P._SamplingFields):
        """The checks every generating request starts with; returns its LoRARequest (or None)."""
        lora = self.models.check(req.model)
        self.check_sampling(req)
        return lora

    def check_sampling(self, req: P._SamplingFields) -> None:
        if req.n > self.max_num_seqs:
            raise APIError(400, f"n={req.n} exceeds the server's --max-num-seqs {self.max_num_seqs}", param="n",
                           code="invalid_value")
        bad = [t for t in req.stop_token_ids or [] if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param="stop_token_ids", code="invalid_value")

    def _logit_bias(self, req: P._SamplingFields) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        out = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {self.vocab_size})",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = value
        return out

    @staticmethod
    def structured(req: P._SamplingFields):
        try:
            return structured_params(req)
        except StructuredFieldError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from e

    def make_params(self, req: P._SamplingFields, max_tokens: int | None, logprobs: int | None, constraint=None,
                    n: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        kw: dict[str, Any] = dict(
            n=req.n if n is None else n, max_tokens=max_tokens, logit_bias=self._logit_bias(req),
            structured_outputs=constraint if constraint is not None else self.structured(req),
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
            stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, seed=req.seed, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(req, name)
            if v is not None:
                kw[name] = v
        if req.top_k is not None:
            kw["top_k"] = min(req.top_k, self.vocab_size)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise api_error(e) from e

    # ---- engine requests ------------------------------------------------------------------------
    async def start(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, rid: str,
                    lora=None) -> list[RequestStream]:
        """One engine request per prompt (ids ``{rid}-{i}``); all or none are started."""
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await self.async_engine.add_request(f"{rid}-{i}", text, params, ids, lora))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, Exception) and not isinstance(e, APIError):
                raise api_error(e, self.prompt_param) from e
            raise
        return streams

    def _observe(self, last: dict[tuple[int, int], float], i: int, out: RequestOutput) -> None:
        """Latency metrics of one output; raises RequestFailedError when its request failed."""
        metrics = self.metrics
        now = time.perf_counter()
        m = out.metrics
        for c in out.outputs:
            k = len(c.token_ids_delta)
            if not k:
                continue
            prev = last.get((i, c.index))
            last[(i, c.index)] = now
            if prev is None:  # the first token: its latency is the TTFT, not an ITL
                if c.index == 0 and m is not None and m.first_token_time is not None:
                    metrics.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
                continue
            for _ in range(k):
                metrics.itl.observe((now - prev) / k)
        if out.finished:
            if m is not None and m.finished_time is not None:
                metrics.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
            for c in out.outputs:
                metrics.request_finished(c.finish_reason or "abort")
            if out.error is not None:  # this request failed inside a step; the others went on
                raise RequestFailedError(f"request failed: {out.error}")

    async def each_output(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all streams as they come, observing latency metrics.
        Leaving early (or being cancelled) aborts every unfinished stream."""
        last: dict[tuple[int, int], float] = {}
        try:
            if len(streams) == 1:
                async for out in streams[0]:
                    self._observe(last, 0, out)
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, s: RequestStream) -> None:
                try:
                    async for out in s:
                        queue.put_nowait((i, out, None))
                except Exception as e:
                    queue.put_nowait((i, None, e))

            tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
            try:
                remaining = len(streams)
                while remaining:
                    i, out, err = await queue.get()
                    if err is not None:
                        raise err
                    self._observe(last, i, out)
                    if out.finished:
                        remaining -= 1
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            for s in streams:
                s.abort()

    async def _collect(self, streams: list[RequestStream]) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in self.each_output(streams):
            if out.finished:
                finals[i] = out
        return [finals[i] for i in range(len(streams))]

    async def collect(self, request: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
        """The final output of each stream; None when the client left first (every request is
        then aborted)."""
        try:
            return await _unless_disconnected(request, self._collect(streams))
        except _ClientGone:
            return None
        except (RequestAbortedError, EngineDeadError, RequestFailedError) as e:
            raise api_error(e, generating=True) from e

    @staticmethod
    def json_response(resp: P.BaseModel | None) -> Response:
        """The JSON body; 499 (client closed request) when there is none."""
        if resp is None:
            return Response(status_code=499)
        return Response(resp.model_dump_json(), media_type="application/json")

    # ---- streaming ------------------------------------------------------------------------------
    def streaming_response(self, ctx: StreamContext, streams: list[RequestStream]) -> StreamingResponse:
        return StreamingResponse(self.stream(ctx, streams), media_type="text/event-stream", headers=SSE_HEADERS)

    def head_choices(self, ctx: StreamContext) -> list:
        """Choices of a first chunk sent before any output (none by default)."""
        return []

    def prompt_choices(self, ctx: StreamContext, i: int, out: RequestOutput) -> list:
        """Choices of a chunk sent before the one of prompt ``i``'s output ``out`` (none by
        default; completions' ``echo`` with ``logprobs``: the prompt, once its logprobs are known)."""
        return []

    def stream_choice(self, ctx: StreamContext, ch: ChoiceState, c: CompletionOutput) -> Any | None:
        """The chunk choice for output ``c``'s deltas, or None when it has nothing to send."""
        raise NotImplementedError

    def abort_choice(self, index: int) -> Any:
        """The chunk choice that ends a choice the engine aborted."""
        raise NotImplementedError

    async def stream(self, ctx: StreamContext, streams: list[RequestStream]) -> AsyncIterator[str]:
        """The SSE events of a streamed response: chunks as outputs come (the last content chunk
        carries the timings), usage if asked, abort or error, then ``[DONE]``."""
        usage = Usage(completion=ctx.completion)
        unfinished = len(ctx.choices)
        include_usage = bool(ctx.req.stream_options and ctx.req.stream_options.include_usage)
        model = self.models.response_name(ctx.req.model)

        def chunk(chs: list, **kw) -> str:
            return sse(self.chunk_type(id=ctx.rid, created=ctx.created, model=model, choices=chs, **kw))

        try:
            head = self.head_choices(ctx)
            if head:
                yield chunk(head)
            async for i, out in self.each_output(streams):
                usage.add(i, out)
                first = self.prompt_choices(ctx, i, out)
                if first:
                    yield chunk(first)
                chs = []
                for c in out.outputs:
                    ch = ctx.choices[(i, c.index)]
                    if ch.finished:
                        continue
                    choice = self.stream_choice(ctx, ch, c)
                    if choice is not None:
                        ch.finished = c.finish_reason is not None
                        unfinished -= ch.finished
                        chs.append(choice)
                if chs:
                    yield chunk(chs, timings=None if unfinished else usage.timings())
            if include_usage:
                yield chunk([], usage=usage.usage())
        except (RequestAbortedError, EngineDeadError):
            left = [self.abort_choice(ch.index) for ch in ctx.choices.values() if not ch.finished]
            if left:
                yield chunk(left)
        except Exception as e:
            if not isinstance(e, RequestFailedError):  # a bug, not a request the engine failed
                log.exception("stream %s failed", ctx.rid)
            yield sse(api_error(e, generating=True).body())
        yield SSE_DONE
