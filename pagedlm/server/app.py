"""The OpenAI-compatible HTTP API over an ``AsyncLLMEngine``: ``build_app`` wires the routes.

``build_app(async_engine, ServerConfig(...))`` returns a FastAPI app with /v1/completions,
/v1/chat/completions (both with SSE streaming), /v1/models, /tokenize, /detokenize,
/tokenizer_info, /health and /metrics. The requests are handled by the serving classes (``serving_completion.py``,
``serving_chat.py``, ``serving_tokenization.py`` over ``serving.py``); every error becomes an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` through ``errors.py``.
This module holds only the routes, the API-key and body-size middleware, and the lifespan.
Tokenizing and chat templating run on the engine thread (the only thread that touches the
tokenizer's mutable state); the event loop only routes outputs and formats JSON.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from pagedlm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedlm.server import protocol as P
from pagedlm.server.errors import ERROR_RESPONSES, error_body, error_response, install_error_handlers
from pagedlm.server.metrics import ServerMetrics
from pagedlm.server.serving import SSE_HEADERS, ServedModels
from pagedlm.server.serving_chat import OpenAIServingChat
from pagedlm.server.serving_completion import OpenAIServingCompletion
from pagedlm.server.serving_tokenization import OpenAIServingTokenization
from pagedlm.server.ui import install_ui

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def build_app(async_engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    models = ServedModels(async_engine, config.served_model_name)
    metrics = ServerMetrics(models.name)
    completion = OpenAIServingCompletion(async_engine, models, metrics)
    chat = OpenAIServingChat(async_engine, models, metrics)
    tokenization = OpenAIServingTokenization(async_engine, models, metrics)

    app = FastAPI(title="pagedlm", version="0.1.0", lifespan=_lifespan(async_engine),
                  description="OpenAI-compatible API over the pagedlm paged engine.")
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    install_error_handlers(app)

    @app.get("/health", response_model=P.HealthResponse, responses={503: {"model": P.ErrorResponse}})
    async def health():
        problem = async_engine.health_error()
        if problem is not None:
            return error_response(503, problem, "service_unavailable")
        return P.HealthResponse(status="ok", decode_buckets=async_engine.decode_buckets())

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def get_metrics():
        try:
            snap = await async_engine.get_metrics()
        except EngineDeadError:
            snap = {}
        return Response(metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses={401: ERROR_RESPONSES[401]})
    async def list_models():
        return models.cards()

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(req: P.TokenizeRequest):
        return await tokenization.tokenize(req)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(req: P.DetokenizeRequest):
        return await tokenization.detokenize(req)

    @app.get("/tokenizer_info", response_model=P.TokenizerInfoResponse, responses=ERROR_RESPONSES)
    async def tokenizer_info():
        return await tokenization.tokenizer_info()

    stream_200 = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses={**ERROR_RESPONSES, **stream_200})
    async def completions(req: P.CompletionRequest, request: Request):
        return await completion.create(req, request)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**ERROR_RESPONSES, **stream_200})
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        return await chat.create(req, request)

    install_ui(app, async_engine, SSE_HEADERS)
    app.add_middleware(_BodyLimitAndAuth, api_key=config.api_key or None, max_body_bytes=config.max_body_bytes)
    return app


def _lifespan(async_engine: AsyncLLMEngine):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not async_engine.is_running:
            async_engine.start()
        if async_engine.engine.tokenizer is not None:  # build the grammar tables now, not in a request's step
            try:
                # every engine (data-parallel replicas: each its own, on its own thread)
                for one in getattr(async_engine, "replicas", [async_engine]):
                    await one.warm_structured()
            except Exception as e:  # noqa: BLE001 - structured output is then refused per request
                log.warning("structured output unavailable: %s", e)
        try:
            yield
        finally:
            async_engine.shutdown()

    return lifespan


class _BodyLimitAndAuth:
    """Pure ASGI middleware: API key on /v1/* (and the tokenizer routes), then a body size limit
    (413). Bodies without Content-Length are buffered up to the limit and replayed."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")

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
