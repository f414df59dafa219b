"""AsyncLLMEngine: the paged engine behind an asyncio front, for the server.

One thread owns the ``LLMEngine``: it is the only thread that calls it. The event loop talks to
it through a command list guarded by a condition variable (add, abort, run-a-function); the
thread sleeps on that condition while there is nothing to do (no busy-wait), otherwise it runs
the commands, then one ``engine.step()``, and hands the step's outputs back to the loop with
``call_soon_threadsafe``. Each request has its own ``asyncio.Queue`` (a ``RequestStream``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from pagedlm.engine.engine import LLMEngine
from pagedlm.errors import EngineDeadError, PagedLMError
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloadedError(PagedLMError):
    """The waiting queue is full (``max_waiting``): try again later (HTTP 503)."""


__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineOverloadedError", "RequestAbortedError", "RequestStream",
           "StreamHost"]


class RequestAbortedError(PagedLMError):
    """The request was aborted by the server (shutdown) before it finished."""


class _Aborted:
    """Queue sentinel: the engine dropped this request (abort, shutdown or an engine error)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class RequestStream:
    """The outputs of one request, as the engine produces them. Iterate with ``async for``.
    Bound to the event loop that created it (several loops may share one engine)."""

    def __init__(self, request_id: str, engine: AsyncLLMEngine):
        self.request_id = request_id
        self._engine = engine
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | _Aborted] = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | _Aborted) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Drain what is already queued: a slow consumer skips to the newest output, whose
        # cumulative text and tokens include every earlier delta.
        while not isinstance(item, _Aborted) and not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, _Aborted):
                item = nxt
                break
            item = _merge(item, nxt)
        if isinstance(item, _Aborted):
            self.finished = True
            raise item.error or RequestAbortedError(f"request {self.request_id} was aborted")
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _deliver(batch: list[tuple[RequestStream, RequestOutput | _Aborted]]) -> None:
    for stream, item in batch:
        stream._put(item)


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """``new`` with the deltas of ``old`` prepended (both cumulative otherwise)."""
    for o_old, o_new in zip(old.outputs, new.outputs, strict=True):
        o_new.text_delta = o_old.text_delta + o_new.text_delta
        o_new.token_ids_delta = o_old.token_ids_delta + o_new.token_ids_delta
    return new


class StreamHost:
    """The request streams of an engine front (``AsyncLLMEngine``, ``core_process.CoreEngineClient``):
    registration, ``generate``, and handing outputs to each stream's event loop."""

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}  # guarded by _lock: event loops and the engine side
        self._lock = threading.Lock()
        self._draining = False  # shutting down: refuse new requests

    @property
    def draining(self) -> bool:
        return self._draining

    def health_error(self) -> str | None:
        """Why the engine cannot take requests (None: healthy), for /health."""
        if self.engine.dead is not None:
            return f"the engine is dead: {self.engine.dead}"
        if self._draining:
            return "the server is shutting down"
        if not self.is_running:
            return "the engine is not running"
        return None

    def stop_admitting(self) -> None:
        """Graceful shutdown, step one (thread-safe): refuse new requests (503); running ones go on."""
        self._draining = True


    @property
    def num_in_flight(self) -> int:
        """Requests whose streams have not ended (graceful shutdown waits for 0)."""
        with self._lock:
            return len(self._streams)

    def _register(self, request_id: str) -> RequestStream:
        stream = RequestStream(request_id, self)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        return stream

    def _forget(self, request_id: str) -> None:
        """The request was refused or cancelled before the engine took it: abort it anyway."""
        with self._lock:
            self._streams.pop(request_id, None)
        self.abort(request_id)  # cancelled after the engine took it: do not leave it running

    async def generate(self, request_id: str, prompt: str | None, params: SamplingParams,
                       prompt_token_ids: list[int] | None = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving the loop early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, prompt_token_ids, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _post(self, items: list[tuple[str, RequestOutput | _Aborted]]) -> None:
        """Hand each output to its stream's event loop, one call per loop (thread-safe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue  # aborted, or its client left
                if isinstance(item, _Aborted) or item.finished:
                    del self._streams[request_id]
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


class AsyncLLMEngine(StreamHost):
    """Runs an ``LLMEngine`` on its own thread; ``generate`` streams ``RequestOutput``s.

    ``max_waiting``: refuse new requests (``EngineOverloadedError``) while that many sequences
    already wait for a slot. ``None`` = no limit.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"max_waiting must be a non-negative integer, got {max_waiting!r}")
        super().__init__()
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the last engine error, for /health

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine is already started")
        self._stopping = self._draining = False
        self._thread = threading.Thread(target=self._run, name="pagedlm-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def decode_buckets(self) -> dict[str, str] | None:
        """Each decode bucket's state (compiled / compiling / eager): read-only membership tests
        on the engine thread's dicts, safe from the event loop."""
        from pagedlm.engine.state import decode_buckets

        return decode_buckets(self.engine)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request, stop the thread and wait for it. Safe to call twice."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0f s", timeout)
            self._thread = None

    # ---- requests --------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                          prompt_token_ids: list[int] | None = None, lora_request=None) -> RequestStream:
        """Queue a request; raises the engine's ValueError / TypeError for a bad one, and
        ``EngineOverloadedError`` when the waiting queue is full."""
        if self._draining:
            raise EngineDeadError("the server is shutting down")
        stream = self._register(request_id)

        def add() -> None:
            if self.max_waiting is not None:
                waiting = self.engine.get_metrics()["num_requests_waiting"]
                if waiting >= self.max_waiting:
                    raise EngineOverloadedError(
                        f"server overloaded: {waiting} sequences already wait for a slot (--max-waiting "
                        f"{self.max_waiting}); retry later")
            self.engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids,
                                    lora_request=lora_request)

        try:
            await self.call(add)
        except BaseException:
            self._forget(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once). Unknown or finished ids are ignored."""
        def run() -> None:
            if request_id in self.engine.requests:
                self.engine.abort_request(request_id)
            self._post([(request_id, _Aborted())])

        self._submit(run)

    def drain(self) -> None:
        """Refuse new requests and abort the running ones (thread-safe)."""
        self._draining = True
        self.abort_all()

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        """Abort every request (thread-safe, safe from a signal handler)."""
        def run() -> None:
            self._abort_everything(RequestAbortedError(reason))

        self._submit(run)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread (between steps) and return its result."""
        return await asyncio.wrap_future(self._submit(fn))

    async def get_metrics(self) -> dict[str, float]:
        return await self.call(self.engine.get_metrics)

    async def snapshot_state(self, include_blocks: bool = True) -> dict[str, Any]:
        return await self.call(lambda: self.engine.snapshot_state(include_blocks))

    async def block_detail(self, block_id: int) -> dict[str, Any]:
        from pagedlm.engine import state

        return await self.call(lambda: state.block_detail(self.engine, block_id))

    async def warm_structured(self) -> None:
        """Build the grammar tables now, not in a request's step."""
        await self.call(self.engine.structured_outputs)

    # ---- the engine thread -----------------------------------------------------------------
    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, never lost
                fut.set_exception(e)

        with self._cond:
            if self._thread is None or self._stopping:
                fut.set_exception(EngineDeadError("the engine is not running (shutting down)"))
                return fut
            self._commands.append(run)
            self._cond.notify()
        return fut

    def _abort_everything(self, error: BaseException) -> None:
        ids = list(self.engine.requests)
        for rid in ids:
            self.engine.abort_request(rid)
        self._post([(rid, _Aborted(error)) for rid in ids])

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for run in commands:
                run()
            if stopping:
                # _submit refuses new commands once _stopping is set, so none are left behind.
                self._abort_everything(EngineDeadError("the server is shutting down"))
                return
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug in a step must not kill the server: fail the batch
                log.exception("engine step failed; aborting all requests")
                self.error = e
                self._abort_everything(e)
                continue
            self._post([(out.request_id, out) for out in outputs])
