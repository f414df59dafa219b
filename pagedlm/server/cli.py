"""``pagedlm serve``: the OpenAI-compatible server (FastAPI + uvicorn) over the paged engine.

torch, FastAPI and uvicorn are imported inside the command, so ``pagedlm --help`` stays fast.
SIGTERM / SIGINT drain the server: new requests get 503 (and /health 503), the running ones
finish, for up to ``--shutdown-timeout`` seconds; what is left then is aborted (streams end with
finish_reason "abort"), the engine thread stops, and the process exits 0. A second signal
aborts at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pagedlm.commands import add_engine_args, engine_kwargs, parse_bytes
from pagedlm.errors import PagedLMError


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535] (0 = any free port), got {value}")
    return value


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` that is >= ``low`` (NaN refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


_non_negative, _positive, _non_negative_float = _at_least(0), _at_least(1), _at_least(0, float)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE streaming, metrics).",
                       description="Serve a model over an OpenAI-compatible HTTP API with continuous batching.")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the model's file or directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDLM_API_KEY, else none)")
    p.add_argument("--max-waiting", type=_non_negative, default=None,
                   help="refuse new requests with 503 while N sequences wait for a slot (default: no limit)")
    p.add_argument("--max-body-size", type=parse_bytes, default=1 << 20, help="largest request body (default 1M; 413)")
    p.add_argument("--data-parallel-size", "-dp", type=_positive, default=1,
                   help="run D engine replicas (each with its own KV cache and TP/PP/EP ranks) behind this "
                        "server; a request goes to the replica holding its longest cached prefix, else the "
                        "least loaded (default 1)")
    p.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0,
                   help="on SIGTERM/SIGINT, refuse new requests (503) and let running ones finish for up to "
                        "this many seconds before aborting them (default 30; 0 = abort at once)")
    p.add_argument("--engine-core", choices=["auto", "process", "thread"],
                   default=os.environ.get("PAGEDLM_ENGINE_CORE", "auto"),
                   help="where each engine replica steps: 'process' (a process of its own, so HTTP, JSON and "
                        "SSE never take the engine's GIL) or 'thread' (in this process); 'auto' (default): "
                        "'process' where the machine has a core to spare beside the engine's threads, else "
                        "'thread' (measured on 2 cores: the server's process then takes cores from the "
                        "engine's OpenMP threads, docs/benchmarks.md); torchrun always uses 'thread'")
    p.add_argument("--restart-core", type=_non_negative, default=0, metavar="N",
                   help="restart an engine core process that dies, at most N times in the server's life "
                        "(requests in flight when it dies still end with an error; /health is 503 until the "
                        "new core has loaded). Default 0: the server exits non-zero naming the cause. Needs "
                        "the core in a process: 'auto' then picks 'process', and 'thread' is refused")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # The engine options are the ones generate / chat / bench take (one declaration).
    add_engine_args(p)
    p.add_argument("--seed", dest="engine_seed", type=int, default=argparse.SUPPRESS, help="alias of --engine-seed")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise PagedLMError(f"pagedlm serve needs fastapi and uvicorn: {e}") from e
    from pagedlm.engine.async_engine import AsyncLLMEngine
    from pagedlm.engine.engine import EngineConfig, LLMEngine
    from pagedlm.server.app import ServerConfig, build_app

    kwargs = engine_kwargs(args)
    if args.data_parallel_size > 1 and kwargs.get("launcher") == "torchrun":
        raise ValueError("--data-parallel-size is not supported under torchrun (each replica would need its "
                         "own ranks); start one torchrun job per replica behind a load balancer")
    died: list[str] = []
    server = None

    def on_death(why: str) -> None:  # a core process died: every request in flight has failed
        died.append(why)
        if server is not None:
            server.should_exit = True

    core = args.engine_core
    if args.restart_core:
        if kwargs.get("launcher") == "torchrun":
            raise ValueError("--restart-core is not supported under torchrun (the engine runs in the ranks' "
                             "processes; restart the job instead)")
        if core == "thread":
            raise ValueError("--restart-core needs the engine core in a process of its own (--engine-core "
                             "process or auto): a thread cannot be restarted")
        core = "process"
    if core == "auto":
        import torch

        core = "process" if (os.cpu_count() or 1) > torch.get_num_threads() else "thread"
    if core == "process" and kwargs.get("launcher") != "torchrun":
        from pagedlm.engine.core_process import CoreEngineClient

        # D replicas share the machine's cores: each core process takes its share of threads.
        dp = args.data_parallel_size
        threads = max(1, (os.cpu_count() or 1) // dp) if dp > 1 else None
        replicas = [CoreEngineClient(kwargs, max_waiting=args.max_waiting, on_death=on_death, threads=threads,
                                     restarts=args.restart_core)
                    for _ in range(dp)]
    else:
        replicas = [AsyncLLMEngine(LLMEngine(EngineConfig(**kwargs)), max_waiting=args.max_waiting)
                    for _ in range(args.data_parallel_size)]
    engine = replicas[0].engine
    print(engine.cache_report() + (f"; {len(replicas)} data-parallel replicas" if len(replicas) > 1 else ""),
          file=sys.stderr, flush=True)
    name = args.served_model_name or default_served_name(engine.model_path)
    async_engine = replicas[0]
    if len(replicas) > 1:
        from pagedlm.server.replicas import ReplicaRouter

        async_engine = ReplicaRouter(replicas)
    app = build_app(async_engine, ServerConfig(served_model_name=name, api_key=args.api_key or None,
                                               max_body_bytes=args.max_body_size))
    server = make_server(app, async_engine, args.host, args.port, log_level=args.log_level,
                         shutdown_timeout=args.shutdown_timeout)
    server.run()
    if died:
        print(f"pagedlm serve: {died[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def default_served_name(model_path: str) -> str:
    base = os.path.basename(os.path.normpath(model_path))
    return base.removesuffix(".gguf") or model_path


def make_server(app, async_engine, host: str, port: int, log_level: str = "info",
                graceful_timeout: float = 10.0, shutdown_timeout: float = 0.0):
    """A uvicorn server that drains the engine on SIGTERM/SIGINT and exits 0 (uvicorn re-raises
    the signal after shutdown by default, which would end the process with 128+signal).

    Draining: the listener stays open, so new requests get a 503 rather than a refused
    connection, while running requests have ``shutdown_timeout`` seconds to finish; then what
    is left is aborted and uvicorn shuts down."""
    import contextlib
    import signal
    import threading
    import time

    import uvicorn

    class Server(uvicorn.Server):
        bound_port: int | None = None
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining or shutdown_timeout <= 0:  # a second signal, or no grace: abort now
                self._stop(sig, frame)
                return
            self.draining = True
            async_engine.stop_admitting()
            threading.Thread(target=self._drain, args=(sig,), name="pagedlm-drain", daemon=True).start()

        def _drain(self, sig) -> None:
            deadline = time.monotonic() + shutdown_timeout
            while async_engine.num_in_flight and time.monotonic() < deadline and not self.should_exit:
                time.sleep(0.05)
            left = async_engine.num_in_flight
            if left:
                logging.getLogger("pagedlm.server").warning(
                    "shutdown timeout (%.0f s): aborting %d running requests", shutdown_timeout, left)
            self._stop(sig, None)

        def _stop(self, sig, frame) -> None:
            if not self.should_exit:
                async_engine.drain()  # in-flight requests end now; uvicorn then waits for their replies
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.servers and self.servers[0].sockets:
                sockname = self.servers[0].sockets[0].getsockname()
                self.bound_port = sockname[1]
                print(f"pagedlm serve: listening on http://{host}:{self.bound_port}", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                            lifespan="on", access_log=log_level == "debug")
    return Server(config)
