"""The server's one mapping from exceptions to OpenAI-style errors.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}``: as a JSON
response before a stream starts, as a ``data:`` event inside a stream after it has.
``api_error`` decides status, type, param and code for any exception; the exception handlers
``install_error_handlers`` adds and the serving classes' streams both go through it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedlm.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestAbortedError
from pagedlm.errors import RequestFailedError, RequestRejectedError
from pagedlm.server import protocol as P

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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


def api_error(e: BaseException, prompt_param: str = "prompt", generating: bool = False) -> APIError:
    """The OpenAI error for ``e``. ``prompt_param``: the field that holds the prompt ("prompt" or
    "messages"), named by errors about it. ``generating``: ``e`` ended a request the engine had
    already taken: its abort is then "request aborted", not a refusal to take it, and a
    ValueError or TypeError is the server's fault, not the request's."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloadedError):
        return APIError(503, str(e), "server_overloaded", None, "overloaded")
    if isinstance(e, EngineDeadError | RequestAbortedError):
        return APIError(503, f"request aborted: {e}" if generating else str(e), "service_unavailable", None,
                        "shutting_down")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), "internal_error", None, "request_failed")
    if isinstance(e, RequestRejectedError) and not generating:
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, ValueError | TypeError) and not generating:
        return APIError(400, str(e), param=_param_from_message(str(e), prompt_param), code="invalid_value")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def _validation_error(e: RequestValidationError) -> APIError:
    errs = e.errors()
    if not errs:
        return APIError(400, "invalid request")
    err = errs[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('msg', '')}", code="invalid_json")
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
    return APIError(400, f"{where}{msg}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises becomes an OpenAI error body."""

    async def mapped(request: Request, e: Exception):
        return api_error(e).response()

    async def validation(request: Request, e: RequestValidationError):
        return _validation_error(e).response()

    async def http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    async def unexpected(request: Request, e: Exception):
        # A bug in a route: logged with its traceback; the client gets the exception's type only.
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    for exc in (APIError, ValueError, TypeError, EngineDeadError):
        app.add_exception_handler(exc, mapped)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)
