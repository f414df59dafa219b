"""The OpenAI-compatible HTTP API over an ``AsyncLLMEngine``.

``build_app(async_engine, ServerConfig(...))`` returns a FastAPI app with /v1/completions,
/v1/chat/completions (both with SSE streaming), /v1/models, /tokenize, /detokenize, /health and
/metrics. Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
Tokenizing and chat templating run on the engine thread (the only thread that touches the
tokenizer's mutable state); the event loop only routes outputs and formats JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedlm.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestStream,
)
from pagedlm.engine.engine import stop_prefix_len
from pagedlm.errors import RequestFailedError, RequestRejectedError
from pagedlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.server import protocol as P
from pagedlm.server import tools as T
from pagedlm.server.metrics import ServerMetrics
from pagedlm.server.structured import StructuredFieldError, structured_params
from pagedlm.server.ui import install_ui

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": P.ErrorResponse, "description": d}
    for s, d in ((400, "Invalid request"), (401, "Missing or wrong API key"), (413, "Request body too large"),
                 (503, "Overloaded or shutting down"))
}

_FIELD_RE = re.compile(r"^([a-z_]+)[ :]")
_KNOWN_PARAMS = set(P.ChatCompletionRequest.model_fields) | set(P.CompletionRequest.model_fields) | {
    "stop_token_ids", "prompt_token_ids"}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_param(loc) -> str | None:
    """'messages.0.content' from pydantic's ('body', 'messages', 0, 'content', 'str'): field names
    and indices, without the union-branch tags pydantic puts in the path."""
    parts = []
    for x in loc:
        if x in ("body", "query", "path") and not parts:
            continue
        if isinstance(x, int) or (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", x) and x not in _UNION_TAGS):
            parts.append(str(x))
    return ".".join(parts) or None


def _param_from_message(message: str, prompt_param: str) -> str | None:
    """The request field an engine error names (its messages start with the field's name)."""
    if message.startswith(("prompt", "request")):
        return prompt_param
    m = _FIELD_RE.match(message)
    if m and m.group(1) in _KNOWN_PARAMS:
        return m.group(1)
    return None


class _BodyLimitAndAuth:
    """Pure ASGI middleware: API key on /v1/* (and the tokenizer routes), then a body size limit
    (413). Bodies without Content-Length are buffered up to the limit and replayed."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def _reply(self, send, status: int, body: dict, headers: list | None = None) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith(self.PROTECTED):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await self._reply(send, 401, error_body(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                    None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        too_big = error_body(f"request body exceeds the limit of {self.max_body} bytes", "invalid_request_error",
                             None, "request_too_large")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, 400, error_body("invalid Content-Length header",
                                                               "invalid_request_error"))
            if int(length) > self.max_body:
                return await self._reply(send, 413, too_big)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._reply(send, 413, too_big)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---- helpers ---------------------------------------------------------------------------------
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


class _Choice:
    """Streaming state of one choice: what text and tokens the client has already been sent."""

    __slots__ = ("index", "sent_text", "sent_tokens", "finished", "text_offset")

    def __init__(self, index: int):
        self.index = index
        self.sent_text = 0
        self.sent_tokens = 0
        self.finished = False
        self.text_offset = 0

    def next_text(self, out: CompletionOutput, stops: list[str]) -> str:
        """New text to send; while running, hold back a tail that may be the start of a stop
        string (the engine cuts a matched stop string out of the text, so it must never have
        been sent)."""
        text = out.text
        end = len(text)
        if out.finish_reason is None and stops:
            end -= stop_prefix_len(text, stops)
        if end <= self.sent_text:
            return ""
        delta = text[self.sent_text:end]
        self.sent_text = end
        return delta


class _Usage:
    def __init__(self):
        self.outputs: dict[int, RequestOutput] = {}

    def add(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out

    def usage(self) -> P.Usage:
        outs = list(self.outputs.values())
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        cached = sum(o.metrics.num_cached_tokens for o in outs if o.metrics is not None)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))

    def timings(self) -> P.Timings:
        return _timings([o.metrics for o in self.outputs.values()])


def _sse(obj: Any) -> str:
    if isinstance(obj, P.BaseModel):
        return f"data: {obj.model_dump_json()}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- the app ---------------------------------------------------------------------------------
def build_app(async_engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    engine = async_engine.engine
    tokenizer = engine.tokenizer
    vocab_size = engine.model_config.vocab_size
    max_num_seqs = engine.config.max_num_seqs
    model_name = config.served_model_name
    loras = engine.lora_requests  # adapters served by name (--lora-modules)
    if model_name in loras:
        raise ValueError(f"LoRA module name {model_name!r} is the served model's name; rename one of them")
    metrics = ServerMetrics(model_name)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not async_engine.is_running:
            async_engine.start()
        if tokenizer is not None:  # build the grammar tables now rather than in a request's step
            try:
                # every engine (data-parallel replicas: each its own, on its own thread)
                for one in getattr(async_engine, "replicas", [async_engine]):
                    await one.call(one.engine.structured_outputs)
            except Exception as e:  # noqa: BLE001 - structured output is then refused per request
                log.warning("structured output unavailable: %s", e)
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="pagedlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over the pagedlm paged engine.")
    app.state.async_engine = async_engine
    app.state.metrics = metrics

    # ---- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        if not errs:
            return error_response(400, "invalid request")
        err = errs[0]
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {err.get('msg', '')}", code="invalid_json")
        param = _loc_param(err.get("loc", ()))
        # A union (prompt, content, stop) reports one error per alternative: show them together.
        same = [e_ for e_ in errs if _loc_param(e_.get("loc", ())) == param]
        if param is None:  # a whole-body check (e.g. an unsupported field): the message names it
            m = _FIELD_RE.match(err.get("msg", "").removeprefix("Value error, "))
            param = m.group(1) if m and m.group(1) in _KNOWN_PARAMS | set(P.UNSUPPORTED_FIELDS) else None
        msgs = list(dict.fromkeys(e_.get("msg", "invalid value").removeprefix("Value error, ") for e_ in same))
        msg = msgs[0] if len(msgs) == 1 else "invalid value; " + " or ".join(msgs[:4])
        others = len(errs) - len(same)
        more = f" (and {others} more error{'s' if others > 1 else ''})" if others else ""
        where = "" if param and msg.startswith(param) else f"{param}: " if param else "request body: "
        return error_response(400, f"{where}{msg}{more}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    def _engine_error(e: Exception, prompt_param: str = "prompt") -> APIError:
        if isinstance(e, EngineOverloadedError):
            return APIError(503, str(e), "server_overloaded", None, "overloaded")
        if isinstance(e, EngineDeadError | RequestAbortedError):
            return APIError(503, str(e), "service_unavailable", None, "shutting_down")
        if isinstance(e, RequestRejectedError):
            return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
        if isinstance(e, ValueError | TypeError):
            return APIError(400, str(e), param=_param_from_message(str(e), prompt_param), code="invalid_value")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError):
        err = _engine_error(e)
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(TypeError)
    async def _type_error(request: Request, e: TypeError):
        err = _engine_error(e)
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, e: EngineDeadError):
        err = _engine_error(e)
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    # ---- shared request handling -------------------------------------------------------------
    def check_model(model: str | None):
        """The LoRARequest of a model name that is an adapter; None for the base model."""
        if model is None or model == model_name or model == engine.model_path:
            return None
        if model in loras:
            return loras[model]
        served = ", ".join(repr(n) for n in [model_name, *loras])
        raise APIError(400, f"model {model!r} is not served here; this server serves {served}",
                       param="model", code="model_not_found")

    def response_model(req) -> str:
        return req.model if req.model in loras else model_name

    def check_unsupported(req: P._SamplingFields) -> None:
        if req.n > max_num_seqs:
            raise APIError(400, f"n={req.n} exceeds the server's --max-num-seqs {max_num_seqs}", param="n",
                           code="invalid_value")
        bad = [t for t in req.stop_token_ids or [] if t >= vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                           param="stop_token_ids", code="invalid_value")

    def logit_bias(req: P._SamplingFields) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        out = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = value
        return out

    def structured(req: P._SamplingFields):
        try:
            return structured_params(req)
        except StructuredFieldError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from e

    def make_params(req: P._SamplingFields, max_tokens: int | None, logprobs: int | None, constraint=None,
                    n: int | None = None) -> SamplingParams:
        kw: dict[str, Any] = dict(
            n=req.n if n is None else n, max_tokens=max_tokens, logit_bias=logit_bias(req),
            structured_outputs=constraint if constraint is not None else structured(req), min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
            stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, seed=req.seed, logprobs=logprobs)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(req, name)
            if v is not None:
                kw[name] = v
        if req.top_k is not None:
            kw["top_k"] = min(req.top_k, vocab_size)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise _engine_error(e) from e

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt",
                           code="no_tokenizer")

    @functools.lru_cache(maxsize=65536)
    def token_str(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False) if tokenizer is not None else str(tid)

    async def start(prompts: list[tuple[str | None, list[int]]], params: SamplingParams, rid: str,
                    prompt_param: str, lora=None) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await async_engine.add_request(f"{rid}-{i}", text, params, ids, lora))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, Exception) and not isinstance(e, APIError):
                raise _engine_error(e, prompt_param) from e
            raise
        return streams

    async def each_output(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from all streams as they come, observing latency metrics.
        Leaving early (or being cancelled) aborts every unfinished stream."""
        last: dict[tuple[int, int], float] = {}

        def observe(i: int, out: RequestOutput) -> None:
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

        try:
            if len(streams) == 1:
                async for out in streams[0]:
                    observe(0, out)
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
                    observe(i, out)
                    if out.finished:
                        remaining -= 1
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            for s in streams:
                s.abort()

    async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in each_output(streams):
            if out.finished:
                finals[i] = out
        return [finals[i] for i in range(len(streams))]

    async def run_blocking(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
        try:
            return await _unless_disconnected(request, collect(streams))
        except (RequestAbortedError, EngineDeadError) as e:
            raise APIError(503, f"request aborted: {e}", "service_unavailable", None, "shutting_down") from e
        except RequestFailedError as e:
            raise APIError(500, str(e), "internal_error", None, "request_failed") from e

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/health", response_model=P.HealthResponse, responses={503: {"model": P.ErrorResponse}})
    async def health():
        problem = async_engine.health_error()
        if problem is not None:
            return error_response(503, problem, "service_unavailable")
        return P.HealthResponse(status="ok")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def get_metrics():
        try:
            snap = await async_engine.get_metrics()
        except EngineDeadError:
            snap = {}
        return Response(metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses={401: ERROR_RESPONSES[401]})
    async def list_models():
        base = P.ModelCard(id=model_name, created=created, root=engine.model_path, max_model_len=engine.max_model_len)
        adapters = [P.ModelCard(id=name, created=created, root=lora.lora_path, parent=model_name,
                                max_model_len=engine.max_model_len) for name, lora in loras.items()]
        return P.ModelList(data=[base, *adapters])

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(req: P.TokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = await async_engine.call(lambda: _render_chat(tokenizer, msgs, req.add_generation_prompt)[1])
        else:
            ids = await async_engine.call(
                lambda: list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]))
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(req: P.DetokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        bad = [t for t in req.tokens if t >= vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="tokens",
                           code="invalid_value")
        text = await async_engine.call(lambda: tokenizer.decode(req.tokens))
        return P.DetokenizeResponse(prompt=text)

    stream_200 = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={**ERROR_RESPONSES, **stream_200})
    async def completions(req: P.CompletionRequest, request: Request):
        lora = check_model(req.model)
        check_unsupported(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix", code="unsupported")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not returned here)",
                           param="echo", code="unsupported")
        best_of = req.best_of if req.best_of is not None else req.n
        if best_of < req.n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({req.n})", param="best_of", code="invalid_value")
        if best_of > req.n and req.stream:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of", code="unsupported")
        if best_of > max_num_seqs:
            raise APIError(400, f"best_of={best_of} exceeds the server's --max-num-seqs {max_num_seqs}",
                           param="best_of", code="invalid_value")
        # best_of ranks samples by cumulative logprob, so logprobs are computed for it (and shown only if asked).
        logprobs = req.logprobs if best_of == req.n or req.logprobs is not None else 0
        params = make_params(req, req.max_tokens, logprobs, n=best_of)
        prompts = await _completion_prompts(req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await start(prompts, params, rid, "prompt", lora)
        if req.stream:
            echoes = [await _prompt_text(p) for p in prompts] if req.echo else None
            return StreamingResponse(_stream_completion(req, params, streams, rid, echoes),
                                     media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            finals = await run_blocking(request, streams)
        except _ClientGone:
            return Response(status_code=499)
        choices, usage = [], _Usage()
        for i, out in enumerate(finals):
            usage.add(i, out)
            best = sorted(out.outputs, key=lambda c: -(c.cumulative_logprob or 0.0))[:req.n] if best_of > req.n \
                else out.outputs
            echo = (await _prompt_text(prompts[i])) if req.echo else ""
            for j, c in enumerate(best):
                ch = _Choice(i * req.n + j)
                choices.append(P.CompletionChoice(
                    index=ch.index, text=echo + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=_completion_logprobs(c, ch, 0, len(c.token_ids)) if req.logprobs is not None else None))
        resp = P.CompletionResponse(id=rid, model=response_model(req), choices=choices, usage=usage.usage(),
                                    timings=usage.timings())
        return Response(resp.model_dump_json(), media_type="application/json")

    async def _prompt_text(prompt: tuple[str | None, list[int]]) -> str:
        text, ids = prompt
        if text is not None:
            return text
        need_tokenizer()
        return await async_engine.call(lambda: tokenizer.decode(ids))

    async def _completion_prompts(prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)
        elif isinstance(prompt[0], int):
            return [(None, list(prompt))]
        else:
            return [(None, list(p)) for p in prompt]
        need_tokenizer()
        ids = await async_engine.call(lambda: [list(tokenizer(t)["input_ids"]) for t in texts])
        return list(zip(texts, ids, strict=True))

    def _completion_logprobs(c: CompletionOutput, ch: _Choice, start: int, end: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for pos in range(start, end):
            if c.logprobs is None or pos >= len(c.logprobs):
                break
            tok = c.token_ids[pos]
            entry = c.logprobs[pos]
            s = token_str(tok)
            lp.tokens.append(s)
            lp.token_logprobs.append(entry[tok].logprob if tok in entry else None)
            top: dict[str, float] = {}
            for t, v in entry.items():  # the sampled token first; ids that decode alike keep the first
                top.setdefault(token_str(t), v.logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(ch.text_offset)
            ch.text_offset += len(s)
        return lp

    async def _stream_completion(req: P.CompletionRequest, params: SamplingParams, streams: list[RequestStream],
                                 rid: str, echoes: list[str] | None) -> AsyncIterator[str]:
        created_at = int(time.time())
        choices = {(i, j): _Choice(i * params.n + j) for i in range(len(streams)) for j in range(params.n)}
        unfinished = len(choices)
        usage = _Usage()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stops = params.stop_list

        def chunk(chs: list[P.CompletionChoice], **kw) -> str:
            return _sse(P.CompletionResponse(id=rid, created=created_at, model=response_model(req), choices=chs, **kw))

        try:
            if echoes:
                yield chunk([P.CompletionChoice(index=ch.index, text=echoes[i]) for (i, _), ch in choices.items()])
            async for i, out in each_output(streams):
                usage.add(i, out)
                chs = []
                for c in out.outputs:
                    ch = choices[(i, c.index)]
                    if ch.finished:
                        continue
                    text = ch.next_text(c, stops)
                    new_tokens = len(c.token_ids) - ch.sent_tokens
                    logprobs = None
                    if params.logprobs is not None and new_tokens:
                        logprobs = _completion_logprobs(c, ch, ch.sent_tokens, len(c.token_ids))
                    ch.sent_tokens = len(c.token_ids)
                    if text or logprobs or c.finish_reason:
                        ch.finished = c.finish_reason is not None
                        unfinished -= ch.finished
                        chs.append(P.CompletionChoice(index=ch.index, text=text, logprobs=logprobs,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                if chs:  # the last content chunk carries the timings
                    yield chunk(chs, timings=None if unfinished else usage.timings())
            if include_usage:
                yield chunk([], usage=usage.usage())
        except (RequestAbortedError, EngineDeadError):
            left = [P.CompletionChoice(index=ch.index, text="", finish_reason="abort") for ch in choices.values()
                    if not ch.finished]
            if left:
                yield chunk(left)
        except RequestFailedError as e:
            yield _sse(error_body(str(e), "internal_error", None, "request_failed"))
        except Exception as e:
            log.exception("stream %s failed", rid)
            yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"))
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**ERROR_RESPONSES, **stream_200})
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        lora = check_model(req.model)
        check_unsupported(req)
        try:
            plan = T.plan_tools(req)
        except T.ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from e
        constraint = structured(req)
        if plan.structured is not None:
            if constraint is not None:
                raise APIError(400, f"tool_choice {plan.mode!r} constrains the output to a tool call; "
                                    "do not also set response_format or a guided field", param="tool_choice",
                               code="invalid_value")
            constraint = plan.structured
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = make_params(req, max_tokens, logprobs, constraint)
        need_tokenizer()
        msgs = T.template_messages(req)
        try:
            text, ids = await async_engine.call(
                lambda: _render_chat(tokenizer, msgs, req.add_generation_prompt, plan))
        except (ValueError, TypeError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", param="messages", code="invalid_value") from e
        except Exception as e:  # jinja2 errors raised by the model's template (e.g. role order)
            if type(e).__module__.startswith("jinja2"):
                raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                               code="invalid_value") from e
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await start([(text, ids)], params, rid, "messages", lora)
        if req.stream:
            return StreamingResponse(_stream_chat(req, params, streams, rid, plan), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            finals = await run_blocking(request, streams)
        except _ClientGone:
            return Response(status_code=499)
        out = finals[0]
        usage = _Usage()
        usage.add(0, out)
        choices = []
        for c in out.outputs:
            content, calls = T.reply_calls(plan, c.text, req.parallel_tool_calls)
            tool_calls = [P.ToolCallOut(id=T.new_call_id(), function=P.FunctionCallOut(name=n, arguments=a))
                          for n, a in calls] or None
            choices.append(P.ChatChoice(
                index=c.index, message=P.ChatMessageOut(content=content, tool_calls=tool_calls),
                finish_reason=_chat_finish(c.finish_reason, bool(calls)), stop_reason=c.stop_reason,
                logprobs=_chat_logprobs(c, 0, len(c.token_ids), params.logprobs) if req.logprobs else None))
        resp = P.ChatCompletionResponse(id=rid, model=response_model(req), choices=choices, usage=usage.usage(),
                                        timings=usage.timings())
        return Response(resp.model_dump_json(), media_type="application/json")

    def _chat_logprobs(c: CompletionOutput, start: int, end: int, k: int) -> P.ChatLogprobs:
        content = []
        for pos in range(start, end):
            if c.logprobs is None or pos >= len(c.logprobs):
                break
            tok = c.token_ids[pos]
            entry = c.logprobs[pos]
            s = token_str(tok)
            # The k most likely: the engine's entry holds the sampled token and the top k.
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
            content.append(P.TokenLogprob(
                token=s, logprob=entry[tok].logprob if tok in entry else float("nan"), bytes=list(s.encode()),
                top_logprobs=[P.TopLogprob(token=token_str(t), logprob=v.logprob, bytes=list(token_str(t).encode()))
                              for t, v in top]))
        return P.ChatLogprobs(content=content)

    async def _stream_chat(req: P.ChatCompletionRequest, params: SamplingParams, streams: list[RequestStream],
                           rid: str, plan: T.ToolPlan) -> AsyncIterator[str]:
        created_at = int(time.time())
        choices = [_Choice(i) for i in range(params.n)]
        replies = [T.ToolStream(plan, req.parallel_tool_calls) for _ in range(params.n)]
        unfinished = len(choices)
        usage = _Usage()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stops = params.stop_list

        def chunk(chs: list[P.ChatChunkChoice], **kw) -> str:
            return _sse(P.ChatCompletionChunk(id=rid, created=created_at, model=response_model(req), choices=chs, **kw))

        try:
            yield chunk([P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                         for i in range(params.n)])
            async for _, out in each_output(streams):
                usage.add(0, out)
                chs = []
                for c in out.outputs:
                    ch = choices[c.index]
                    if ch.finished:
                        continue
                    ch.next_text(c, stops)  # advances ch.sent_text to the stop-safe end of the text
                    reply = replies[c.index]
                    text, calls = reply.update(c.text[:ch.sent_text], c.finish_reason is not None)
                    logprobs = None
                    if req.logprobs and len(c.token_ids) > ch.sent_tokens:
                        logprobs = _chat_logprobs(c, ch.sent_tokens, len(c.token_ids), params.logprobs)
                    ch.sent_tokens = len(c.token_ids)
                    if text or calls or logprobs or c.finish_reason:
                        ch.finished = c.finish_reason is not None
                        unfinished -= ch.finished
                        delta = P.DeltaMessage(content=text or None, tool_calls=calls or None)
                        chs.append(P.ChatChunkChoice(index=ch.index, delta=delta, logprobs=logprobs,
                                                     finish_reason=_chat_finish(c.finish_reason, reply.has_calls),
                                                     stop_reason=c.stop_reason))
                if chs:  # the last content chunk carries the timings
                    yield chunk(chs, timings=None if unfinished else usage.timings())
            if include_usage:
                yield chunk([], usage=usage.usage())
        except (RequestAbortedError, EngineDeadError):
            left = [P.ChatChunkChoice(index=ch.index, delta=P.DeltaMessage(), finish_reason="abort")
                    for ch in choices if not ch.finished]
            if left:
                yield chunk(left)
        except RequestFailedError as e:
            yield _sse(error_body(str(e), "internal_error", None, "request_failed"))
        except Exception as e:
            log.exception("stream %s failed", rid)
            yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"))
        yield "data: [DONE]\n\n"

    install_ui(app, async_engine, SSE_HEADERS)
    app.add_middleware(_BodyLimitAndAuth, api_key=config.api_key or None, max_body_bytes=config.max_body_bytes)
    return app


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool,
                 plan: T.ToolPlan | None = None) -> tuple[str, list[int]]:
    """Chat text and its ids, as ``LLM.chat`` does: the template already holds the special tokens."""
    text = T.render_chat(tokenizer, messages, plan or T.ToolPlan("none"), add_generation_prompt)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_finish(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a choice that ended normally called tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason
