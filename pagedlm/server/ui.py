"""The web page of ``pagedlm serve`` and the engine-state API it reads.

``GET /`` is a static page (``static/``: HTML, JS and CSS shipped as package data, no build
step) with a chat and a live view of the KV blocks and the scheduler's queues. It reads:

- ``GET /v1/engine/state``: one JSON snapshot (``pagedlm.engine.state.snapshot``), taken on the
  engine thread between two steps, so counts and block tables always agree with each other.
- ``GET /v1/engine/state/stream``: the same snapshots as server-sent events every
  ``interval_ms``. Open views share snapshots (``StateFeed``): the engine takes at most one
  per half ``MIN_INTERVAL_MS`` (20 a second) however many pages are open.
- ``GET /v1/engine/blocks/{block_id}``: one block's owners and token text (on hover).

The API routes are under /v1/ and so behind the API key like the rest; the page itself is not
(it asks for the key and sends it as a bearer token, never in a URL).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from pagedlm.engine.async_engine import AsyncLLMEngine, EngineDeadError

STATIC_DIR = Path(__file__).parent / "static"
MIN_INTERVAL_MS = 100
DEFAULT_INTERVAL_MS = 250  # the page's rate: four updates a second


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class StateFeed:
    """The newest snapshot (as JSON text) for each ``blocks`` flag, shared by all live views:
    a caller gets the cached one if it is younger than ``max_age`` seconds, else takes a new one
    (one at a time: concurrent callers wait for it rather than each asking the engine)."""

    def __init__(self, async_engine: AsyncLLMEngine):
        self._engine = async_engine
        self._latest: dict[bool, tuple[float, str]] = {}
        self._lock = asyncio.Lock()
        self.snapshots_taken = 0

    async def latest(self, include_blocks: bool, max_age: float) -> str:
        async with self._lock:
            cached = self._latest.get(include_blocks)
            if cached is not None and time.monotonic() - cached[0] < max_age:
                return cached[1]
            snap = await self._engine.snapshot_state(include_blocks)
            text = _dumps(snap)
            self.snapshots_taken += 1
            self._latest[include_blocks] = (time.monotonic(), text)
            return text


def install_ui(app: FastAPI, async_engine: AsyncLLMEngine, sse_headers: dict[str, str]) -> StateFeed:
    """Add the page, its static files and the engine-state routes to ``app``."""
    feed = StateFeed(async_engine)
    app.state.state_feed = feed

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")

    blocks_q = Query(True, description="include the per-block arrays (ref counts and cached flags)")

    @app.get("/v1/engine/state", tags=["engine view"])
    async def engine_state_snapshot(blocks: bool = blocks_q):
        """A snapshot of the KV blocks, the queues and the engine's counters (see docs/server.md)."""
        snap = await async_engine.snapshot_state(blocks)
        return Response(_dumps(snap), media_type="application/json")

    @app.get("/v1/engine/state/stream", tags=["engine view"],
             responses={200: {"content": {"text/event-stream": {}}}})
    async def engine_state_stream(
            blocks: bool = blocks_q,
            interval_ms: int = Query(DEFAULT_INTERVAL_MS, ge=MIN_INTERVAL_MS, le=10_000,
                                     description="time between two events")):
        """The snapshot as server-sent events, one every ``interval_ms`` until the client leaves."""
        return StreamingResponse(_events(feed, async_engine, blocks, interval_ms / 1000.0),
                                 media_type="text/event-stream", headers=sse_headers)

    @app.get("/v1/engine/blocks/{block_id}", tags=["engine view"])
    async def engine_block(block_id: int = PathParam(ge=0, description="index in the KV block pool")):
        """One block: state, owning sequences and the text of its tokens."""
        detail = await async_engine.block_detail(block_id)
        return Response(_dumps(detail), media_type="application/json")

    return feed


async def _events(feed: StateFeed, async_engine: AsyncLLMEngine, blocks: bool,
                  interval: float) -> AsyncIterator[str]:
    """Until the client disconnects (Starlette then cancels this generator) or the server drains."""
    # Views polling at the page's rate all share a snapshot younger than half their interval.
    max_age = max(MIN_INTERVAL_MS / 1000.0, interval) / 2
    loop = asyncio.get_running_loop()
    try:
        while async_engine.is_running and not async_engine.draining:
            start = loop.time()
            yield f"data: {await feed.latest(blocks, max_age)}\n\n"
            # A fixed cadence: the wait for the engine's current step counts towards the interval.
            await asyncio.sleep(max(0.0, interval - (loop.time() - start)))
    except EngineDeadError:
        pass
