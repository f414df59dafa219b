"""The engine core in a process of its own, for the server (``pagedlm serve``; issue 23).

In one process the scheduler, the model step, the HTTP handlers, JSON and SSE encoding and the
event loop take turns on one GIL, and a streamed request's tokens wait for them. Here the
``LLMEngine`` runs in a child process whose loop does nothing but take commands and step; it
never touches text: its steps return per-request deltas of token ids (``LLMEngine.emit_deltas``).
The API server's process keeps HTTP, chat templates, tokenization, detokenization, stop strings
and the event loop. Both talk over one pipe (``multiprocessing.connection``: pickled messages;
tensors never cross):

    server -> core   ("add", call_id, request_id, prompt, params, prompt_token_ids, lora_request)
                                                prompt: None once encoded here (only ids cross)
                     ("abort", request_id)      ("abort_all", reason)
                     ("finish", request_id, index, stop_string, num_output_tokens)
                                                a stop string ended that sample (LLMEngine.stop_sequence)
                     ("call", call_id, name, args)   name in CALLS: metrics, engine view, warm-up
                     ("stop",)
    core -> server   ("ready", facts) | ("failed", why)     once, after the model loaded
                     ("deltas", [RequestDelta, ...])        every step that produced some
                     ("reply", call_id, ok, value)          value, or the exception raised
                     ("aborted", [request_id, ...], why)    abort_all / a failed step
                     ("buckets", {bucket: state})           when a decode bucket changes state

A ``RequestDelta`` (engine/output_processor.py) carries, per sample that changed, only the token
ids appended in that step with their raw logprobs and the core's ending; the prompt logprobs and
the request's metrics come with its first delta (metrics again with its last). The server replays
each delta through the same ``OutputProcessor`` code the in-process engine runs per token
(``DeltaProcessor``, on the server's one tokenizer thread): text, holdback, stop strings,
logprobs, ``RequestOutput``s. A stop string found there ends the sample at once (its output is the
in-process engine's: same text, tokens and usage) and a "finish" message ends it in the core,
which frees its blocks and drops the tokens it generated meanwhile. A step's message at 32
concurrent requests of 64 tokens (the tests' tiny model, benchmarks/core_message_bytes.py) went
from 14.8 kB of cumulative ``RequestOutput``s to 1.7 kB of deltas (with 5 logprobs each: 178 kB to
4.4 kB), and no longer grows with the length of the replies.

``CoreEngineClient`` offers the ``AsyncLLMEngine`` surface the app uses (the app does not know
which it has). Its ``engine`` is ``EngineFacts``: what the core reported at start-up (limits,
model config, adapters) plus a tokenizer loaded in this process. A core that dies is seen by
the reader thread at once (the pipe closes): every in-flight request ends with
``RequestFailedError`` (a waiting call with ``EngineDeadError``), ``/health`` turns 503, and
``on_death`` (the CLI: exit non-zero) is told why. With ``restarts=N`` (``serve --restart-core N``)
the reader thread instead starts a new core, at most N times in the client's life: the requests in
flight still fail (their KV state died with the core), ``/health`` and new requests get 503 while
the new core loads, and once it has reported ready the client serves from it (same tokenizer,
same output processor, a new pipe and writer thread); ``restarts`` counts the restarts
(``pagedlm:engine_core_restarts_total``). ``on_death`` is called only when no restart is left
(or the last one failed).

The offline ``LLM`` and the thread engine (``AsyncLLMEngine``) never use this module: they call
the same ``LLMEngine`` in-process, with its ``OutputProcessor`` inside the step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pagedlm.engine.async_engine import (
    EngineOverloadedError,
    RequestAbortedError,
    RequestStream,
    StreamHost,
    _Aborted,
)
from pagedlm.engine.output_processor import DeltaProcessor, RequestDelta
from pagedlm.errors import EngineDeadError, RequestFailedError
from pagedlm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

BUCKET_POLL_S = 0.5  # how often the core looks for decode-bucket state changes


@dataclass
class EngineFacts:
    """What the API server reads from the engine, reported by the core once it is loaded."""

    model_path: str
    weights_path: str
    model_config: Any  # ModelConfig
    config: Any  # EngineConfig
    max_model_len: int
    num_kv_blocks: int
    lora_requests: dict
    report: str  # LLMEngine.cache_report()
    tokenizer: Any = None  # loaded in the server's process (ModelSource: from its cache)
    dead: Any = None  # why the core is gone (None while it runs)

    def cache_report(self) -> str:
        return self.report


# ---- the core process ------------------------------------------------------------------------

def _facts(engine) -> EngineFacts:
    return EngineFacts(engine.model_path, engine.weights_path, engine.model_config, engine.config,
                       engine.max_model_len, engine.num_kv_blocks, dict(engine.lora_requests),
                       engine.cache_report())


def _call(engine, name: str, args: tuple) -> Any:
    from pagedlm.engine import state

    if name == "metrics":
        return engine.get_metrics()
    if name == "snapshot":
        return engine.snapshot_state(*args)
    if name == "block":
        return state.block_detail(engine, *args)
    if name == "warm_structured":
        engine.structured_outputs()
        return None
    raise ValueError(f"unknown engine call {name!r}")


def core_main(conn, engine_kwargs: dict, max_waiting: int | None, log_level: int, threads: int | None = None) -> None:
    """The child process: build the engine, report, then take commands and step until "stop"."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (core): %(message)s")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from pagedlm.engine.engine import EngineConfig, LLMEngine
    from pagedlm.engine.state import decode_buckets

    try:
        engine = LLMEngine(EngineConfig(**engine_kwargs))
    except BaseException as e:  # noqa: BLE001 - reported to the server, which fails its start
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    engine.emit_deltas()  # text and stop strings are the server's
    conn.send(("ready", _facts(engine)))
    buckets, next_bucket_poll = None, 0.0

    def abort_everything(why: str) -> None:
        ids = list(engine.requests)
        for rid in ids:
            engine.abort_request(rid)
        if ids:
            conn.send(("aborted", ids, why))

    while True:
        # Commands first; block for one only when there is nothing to step.
        while conn.poll(0 if engine.has_unfinished_requests() else BUCKET_POLL_S):
            msg = conn.recv()
            kind = msg[0]
            if kind == "stop":
                abort_everything("the server is shutting down")
                conn.send(("stopped",))
                return
            if kind == "add":
                _, cid, rid, prompt, params, ids, lora = msg
                try:
                    if max_waiting is not None:
                        waiting = engine.get_metrics()["num_requests_waiting"]
                        if waiting >= max_waiting:
                            raise EngineOverloadedError(
                                f"server overloaded: {waiting} sequences already wait for a slot (--max-waiting "
                                f"{max_waiting}); retry later")
                    engine.add_request(rid, prompt, params, prompt_token_ids=ids, lora_request=lora)
                    conn.send(("reply", cid, True, None))
                except Exception as e:  # noqa: BLE001 - the request's own error, for its caller
                    conn.send(("reply", cid, False, e))
            elif kind == "abort":
                if msg[1] in engine.requests:
                    engine.abort_request(msg[1])
            elif kind == "finish":
                engine.stop_sequence(*msg[1:])
            elif kind == "abort_all":
                abort_everything(msg[1])
            elif kind == "call":
                _, cid, name, args = msg
                try:
                    conn.send(("reply", cid, True, _call(engine, name, args)))
                except Exception as e:  # noqa: BLE001
                    conn.send(("reply", cid, False, e))
        now = time.monotonic()
        if now >= next_bucket_poll:
            next_bucket_poll = now + BUCKET_POLL_S
            if (b := decode_buckets(engine)) != buckets:
                buckets = b
                conn.send(("buckets", b))
        if not engine.has_unfinished_requests():
            continue
        try:
            outputs = engine.step()
        except Exception:  # noqa: BLE001 - a bug in a step fails the batch, not the server
            why = traceback.format_exc(limit=3)
            log.error("engine step failed; aborting all requests:\n%s", why)
            abort_everything(f"the engine step failed: {why.strip().splitlines()[-1]}")
            continue
        if outputs:
            conn.send(("deltas", outputs))


# ---- the server's side -----------------------------------------------------------------------

class CoreEngineClient(StreamHost):
    """An ``LLMEngine`` in a child process behind the ``AsyncLLMEngine`` interface.

    The constructor starts the core and waits until its model is loaded (raising what the core
    raised if it could not start). ``on_death(why)`` is called (from the reader thread) once if
    the core process dies while the server runs."""

    def __init__(self, engine_kwargs: dict, max_waiting: int | None = None,
                 on_death: Callable[[str], None] | None = None, start_timeout: float = 1800.0,
                 threads: int | None = None, restarts: int = 0):
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"max_waiting must be a non-negative integer, got {max_waiting!r}")
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ValueError(f"restarts must be a non-negative integer, got {restarts!r}")
        super().__init__()
        self.max_waiting = max_waiting
        self.on_death = on_death
        self.max_restarts = restarts
        self.restarts = 0  # cores started after one died
        self._spawn_args = (engine_kwargs, max_waiting, threads)
        self._start_timeout = start_timeout
        self._stopping = False
        # Guards the swap to a restarted core against shutdown (either the new core is installed
        # and shutdown stops it, or the restart sees the shutdown and kills it).
        self._swap = threading.Lock()
        self.process, self._conn, facts = self._spawn()
        self.engine: EngineFacts = facts
        from pagedlm.loader.source import ModelSource

        self.engine.tokenizer = ModelSource.open(self.engine.model_path).tokenizer()
        # Text, stop strings and RequestOutputs from the core's deltas; used on _tok_pool only.
        self._out = DeltaProcessor(self.engine.tokenizer)
        self._buckets: dict | None = None
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # one per core: the writer's
        self._started = False
        # Tokenizer work (``call``, detokenizing deltas) runs on one thread: a fast tokenizer is not
        # shared between threads.
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedlm-tokenizer")
        self._reader = threading.Thread(target=self._read, name="pagedlm-core-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, args=(self._conn, self._outbox),
                                        name="pagedlm-core-writer", daemon=True)

    def _spawn(self) -> tuple[subprocess.Popen, Connection, EngineFacts]:
        """Start a core process and wait until its model is loaded: (process, pipe, its facts).
        Raises ``EngineDeadError`` (the process gone) if it cannot start, or if the client is
        shut down meanwhile."""
        engine_kwargs, max_waiting, threads = self._spawn_args
        # A fresh interpreter (not fork: this process may hold torch's threads; not
        # multiprocessing's spawn: it re-imports the caller's main module) joined by a socket pair.
        ours, theirs = socket.socketpair()
        process = subprocess.Popen([sys.executable, "-m", "pagedlm.engine.core_process", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(ours.detach())
        try:
            try:
                conn.send((engine_kwargs, max_waiting, logging.getLogger().getEffectiveLevel(), threads))
            except OSError:
                pass  # it died at once: seen below
            deadline = time.monotonic() + self._start_timeout
            while not conn.poll(0.2):
                if self._stopping:
                    raise EngineDeadError("the engine core's start was cancelled: the server is shutting down")
                if process.poll() is not None:
                    raise EngineDeadError(f"the engine core exited while starting (exit code {process.returncode})")
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"the engine core did not start within {self._start_timeout:.0f} s")
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                process.wait()
                raise EngineDeadError(
                    f"the engine core exited while starting (exit code {process.returncode})") from None
            if kind != "ready":
                raise EngineDeadError(f"the engine core could not start: {value}")
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            conn.close()
            raise
        return process, conn, value

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise RuntimeError("the engine core client is already started")
        self._started = True
        self._reader.start()
        self._writer.start()

    @property
    def is_running(self) -> bool:
        return self._started and self.engine.dead is None and not self._stopping

    def decode_buckets(self) -> dict[str, str] | None:
        return self._buckets

    def drain(self) -> None:
        self._draining = True
        self.abort_all()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request, stop the core and wait for it. Safe to call twice."""
        with self._swap:  # a core being restarted is killed by the restart, not started
            if self._stopping:
                return
            self._stopping = True
            process, outbox = self.process, self._outbox
        if process.poll() is None and self.engine.dead is None:
            outbox.put(("stop",))
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        if process.poll() is None:
            log.error("the engine core did not stop within %.0f s; killing it", timeout)
            process.kill()
            process.wait()
        outbox.put(None)
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._tok_pool.shutdown(wait=False)

    # ---- requests --------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                          prompt_token_ids: list[int] | None = None, lora_request=None) -> RequestStream:
        if self._draining:
            raise EngineDeadError("the server is shutting down")
        if self.engine.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.engine.dead}")
        stream = self._register(request_id)
        try:
            ids = await self.call(lambda: self._follow(request_id, prompt, params, prompt_token_ids))
            # The prompt's text stays here (the core checks a text prompt only when it cannot be encoded).
            await self._request("add", request_id, prompt if ids is None else None, params, ids, lora_request)
        except BaseException:
            self._forget(request_id)
            raise
        return stream

    def _follow(self, request_id: str, prompt: str | None, params: SamplingParams,
                prompt_token_ids: list[int] | None) -> list[int] | None:
        """(Tokenizer thread) Encode a text prompt and start following the request's outputs;
        the prompt's ids, or None when the core must refuse the prompt (empty, not text)."""
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or not prompt:
                return None
            from pagedlm.engine.engine import encode_prompt

            prompt_token_ids = encode_prompt(self.engine.tokenizer, prompt)
        if isinstance(params, SamplingParams) and isinstance(prompt_token_ids, (list, tuple)):
            self._out.add(request_id, prompt, prompt_token_ids, params)
        return prompt_token_ids

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once); its stream ends now."""
        self._outbox.put(("abort", request_id))
        self._on_tok_thread(self._out.drop, request_id)
        self._post_aborted([request_id], None)

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        self._outbox.put(("abort_all", reason))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` (tokenizer work) off the event loop, on this process's tokenizer thread."""
        return await asyncio.wrap_future(self._tok_pool.submit(fn))

    async def get_metrics(self) -> dict[str, float]:
        try:
            m = await self._request("call", "metrics", ())
        except EngineDeadError:
            if not self.max_restarts:
                raise
            m = {"num_free_blocks": self.engine.num_kv_blocks}  # restarting: no core, nothing held
        m["core_restarts"] = self.restarts
        return m

    async def snapshot_state(self, include_blocks: bool = True) -> dict[str, Any]:
        return await self._request("call", "snapshot", (include_blocks,))

    async def block_detail(self, block_id: int) -> dict[str, Any]:
        return await self._request("call", "block", (block_id,))

    async def warm_structured(self) -> None:
        await self._request("call", "warm_structured", ())

    # ---- the pipe --------------------------------------------------------------------------
    async def _request(self, kind: str, *args) -> Any:
        cid = next(self._ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # against a death: a reply registered here is failed by _fail_all
            if self.engine.dead is not None:
                raise EngineDeadError(f"the engine is dead: {self.engine.dead}")
            self._replies[cid] = fut
            outbox = self._outbox  # this core's: never a restarted one's
        outbox.put((kind, cid, *args))
        return await asyncio.wrap_future(fut)

    def _on_tok_thread(self, fn: Callable, *args) -> None:
        with contextlib.suppress(RuntimeError):  # shut down: nothing is followed any more
            self._tok_pool.submit(fn, *args)

    def _apply(self, deltas: list[RequestDelta]) -> None:
        """(Tokenizer thread) One step's deltas to RequestOutputs for the streams; a stop string
        found ends its sample in the core too."""
        from pagedlm.engine.faults import describe

        items: list = []
        for d in deltas:
            try:
                try:
                    out, stops = self._out.apply(d)
                except Exception as e:  # noqa: BLE001 - a detokenizer error: this request only, as in-process
                    why = f"while appending a token: {describe(e)}"
                    log.warning("request %s failed: %s", d.request_id, why)
                    self._outbox.put(("abort", d.request_id))
                    out, stops = self._out.fail(d.request_id, why), []
            except Exception as e:  # noqa: BLE001 - a bug here: end the request, never leave it hanging
                log.exception("request %s: its output could not be made", d.request_id)
                self._outbox.put(("abort", d.request_id))
                self._out.drop(d.request_id)
                items.append((d.request_id, _Aborted(RequestFailedError(f"the request failed: {describe(e)}"))))
                continue
            for index, stop, kept in stops:
                self._outbox.put(("finish", d.request_id, index, stop, kept))
            if out is not None:
                items.append((out.request_id, out))
        if items:
            self._post(items)

    def _forget_all(self, ids: list[str] | None = None) -> None:
        """(Tokenizer thread) Stop following these requests (None: all)."""
        for rid in list(self._out.requests) if ids is None else ids:
            self._out.drop(rid)

    def _write(self, conn: Connection, outbox: queue.SimpleQueue) -> None:
        while (msg := outbox.get()) is not None:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the core is gone: the reader reports it
                return

    def _read(self) -> None:
        """Read the core's messages; when it dies, fail what was in flight and restart it (if
        allowed), then read the new one's."""
        while True:
            self._read_core(self._conn)
            if self._stopping or not self._core_died():
                return

    def _read_core(self, conn: Connection) -> None:
        """Until the core's pipe closes (or it confirms "stop")."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "deltas":
                self._on_tok_thread(self._apply, msg[1])
            elif kind == "reply":
                _, cid, ok, value = msg
                with self._lock:
                    fut = self._replies.pop(cid, None)
                if fut is not None:
                    fut.set_result(value) if ok else fut.set_exception(value)
            elif kind == "aborted":
                self._on_tok_thread(self._forget_all, msg[1])
                self._post_aborted(msg[1], RequestAbortedError(msg[2]))
            elif kind == "buckets":
                self._buckets = msg[1]
            elif kind == "stopped":
                return

    def _core_died(self) -> bool:
        """(Reader thread) The core's pipe closed while serving: fail every request in flight,
        then restart the core if allowed. True when a new core serves."""
        process = self.process
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1)
        if process.poll() is None:  # it closed its end but lives on: never two cores at once
            process.kill()
            process.wait()
        why = f"the engine core process exited (exit code {process.returncode})"
        restart = self.restarts < self.max_restarts
        with self._lock:
            self.engine.dead = why + (f"; restarting it (restart {self.restarts + 1} of {self.max_restarts})"
                                      if restart else "")
        log.error("%s; failing every request in flight%s", why, "; restarting it" if restart else "")
        self._outbox.put(None)  # its writer ends
        self._conn.close()
        # In-flight requests end with this error (a stream gets it as its last event), not as
        # an abort: nobody asked for them to stop.
        self._fail_all(RequestFailedError(f"the request failed: {why}"), EngineDeadError(why))
        while self.restarts < self.max_restarts and not self._stopping:
            self.restarts += 1
            log.warning("restarting the engine core (restart %d of %d)", self.restarts, self.max_restarts)
            try:
                process, conn, facts = self._spawn()
            except (EngineDeadError, OSError) as e:
                why = f"{why}; restart {self.restarts} of {self.max_restarts} failed: {e}"
                log.error("%s", why)
                continue
            with self._swap:
                if self._stopping:  # shut down while it loaded: it never serves
                    process.kill()
                    process.wait()
                    conn.close()
                    return False
                self._install(process, conn, facts)
            log.warning("the engine core is back (restart %d of %d)", self.restarts, self.max_restarts)
            return True
        if self._stopping:
            return False
        with self._lock:
            self.engine.dead = why
        if self.on_death is not None:
            self.on_death(why)
        return False

    def _install(self, process: subprocess.Popen, conn: Connection, facts: EngineFacts) -> None:
        """(Reader thread, under _swap) Serve from a restarted core: its pipe, a new writer, its
        facts (the same tokenizer and output processor), then admit requests again."""
        self.process, self._conn = process, conn
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        if self.engine.tokenizer is not None:  # the grammar tables before any request (as at start-up)
            outbox.put(("call", next(self._ids), "warm_structured", ()))  # its reply is ignored
        self._writer = threading.Thread(target=self._write, args=(conn, outbox), name="pagedlm-core-writer",
                                        daemon=True)
        self._writer.start()
        self._buckets = None
        for f in dataclasses.fields(EngineFacts):
            if f.name not in ("tokenizer", "dead"):  # the app holds this object: update it in place
                setattr(self.engine, f.name, getattr(facts, f.name))
        with self._lock:
            self._outbox = outbox
            self.engine.dead = None

    def _fail_all(self, error: BaseException, reply_error: BaseException | None = None) -> None:
        with self._lock:
            ids = list(self._streams)
            replies, self._replies = self._replies, {}
        for fut in replies.values():
            if not fut.done():
                fut.set_exception(reply_error or error)
        self._on_tok_thread(self._forget_all)
        self._post_aborted(ids, error)

    def _post_aborted(self, ids: list[str], error: BaseException | None) -> None:
        self._post([(rid, _Aborted(error)) for rid in ids])


def main(argv: list[str] | None = None) -> int:
    """``python -m pagedlm.engine.core_process FD``: the core, on the socket ``FD`` its server passed."""
    fd = int((sys.argv[1:] if argv is None else argv)[0])
    conn = Connection(fd)
    try:
        engine_kwargs, max_waiting, log_level, threads = conn.recv()
    except (EOFError, OSError):
        return 1
    try:
        core_main(conn, engine_kwargs, max_waiting, log_level, threads)
    except (EOFError, OSError, BrokenPipeError):  # the server is gone
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module's copy: what the core pickles must name pagedlm.engine.core_process,
    # not __main__.
    from pagedlm.engine import core_process

    sys.exit(core_process.main())
