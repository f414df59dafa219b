"""Server test helpers: the tiny model the server tests use, and a real uvicorn server in a thread.

The model is the shared tiny Llama of ``tests.helpers.save_tiny`` (trained byte-level BPE, ChatML
template), with two changes for serving tests: a 2048-token context, so a long generation gives
the overload and shutdown tests seconds of room; and a sharpened ``lm_head``, so greedy choices
are far from ties and a request decodes the same alone or in a batch of 32.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.helpers import save_tiny


def _sharpen_lm_head(path: str, factor: float = 20.0) -> None:
    import os

    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * factor
    save_file(tensors, f, metadata={"format": "pt"})


_built: dict[str, str] = {}


def tiny_model_dir(tmp_path_factory) -> str:
    """Build the tiny model once per test session (shared by every server test module)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _built:
        path = save_tiny("llama", str(tmp_path_factory.mktemp("tiny_llama_server")), max_position_embeddings=2048)
        _sharpen_lm_head(path)
        _built[key] = path
    return _built[key]


class ServerThread:
    """A real uvicorn server for an app on 127.0.0.1 and a free port, in a thread.

    ``stop()`` goes through the same path as SIGTERM (drain the engine, then uvicorn's
    graceful shutdown) and waits, bounded, for the thread to end."""

    def __init__(self, app, async_engine, startup_timeout: float = 60.0):
        from pagedlm.server.cli import make_server

        self.server = make_server(app, async_engine, "127.0.0.1", 0, log_level="warning", graceful_timeout=5.0)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.startup_timeout = startup_timeout
        self.url = ""

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.bound_port}"
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def serve_engine(model_dir: str, name: str = "tiny", **config) -> Iterator[ServerThread]:
    """A server (model name ``name``) over an in-process ``LLMEngine(EngineConfig(model=model_dir,
    **config))`` in an ``AsyncLLMEngine`` thread; ``srv.engine`` is the engine. The ``client`` and
    ``http`` fixtures of tests/conftest.py talk to a module's ``server`` fixture made with it."""
    from pagedlm.engine.async_engine import AsyncLLMEngine
    from pagedlm.engine.engine import EngineConfig, LLMEngine
    from pagedlm.server.app import ServerConfig, build_app

    engine = LLMEngine(EngineConfig(model=model_dir, **config))
    aeng = AsyncLLMEngine(engine)
    with ServerThread(build_app(aeng, ServerConfig(served_model_name=name)), aeng) as srv:
        srv.engine = engine
        yield srv


def launch_serve(model: str, *args: str, timeout: float = 90.0):
    """Start ``pagedlm serve`` as a subprocess on a free loopback port; returns (process, URL).
    The caller stops it (SIGTERM). ``process.stderr_lines``: its stderr after start-up."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pagedlm.cli", "serve", "--model", model, "--dtype", "float32", "--port", "0",
           "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PAGEDLM_API_KEY": ""})
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"pagedlm serve exited during start-up (rc {proc.returncode})")
            if "listening on " in line:
                proc.stderr_lines = []  # what it writes from now on (the pipe kept drained)
                threading.Thread(target=lambda: proc.stderr_lines.extend(proc.stderr), daemon=True).start()
                return proc, line.split("listening on ")[1].strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"pagedlm serve did not start within {timeout} s")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def stop_serve(proc, timeout: float = 30.0) -> int:
    """SIGTERM, then wait (kill if it hangs); returns the exit status."""
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise
