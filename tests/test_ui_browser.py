"""The page of ``pagedlm serve`` in a real headless browser (Debian's ``chromium``, driven by
Playwright through ``executable_path``; ``make install-test`` installs it) against a real
``pagedlm serve`` subprocess on loopback with the tiny model.

Each test saves screenshots of the states it checks under ``test-artifacts/ui/`` (or
``$PAGEDLM_TEST_ARTIFACTS``)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import launch_serve, stop_serve, tiny_model_dir

API_KEY = "sk-ui"
ARTIFACTS = Path(os.environ.get("PAGEDLM_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")) / "ui"
# 32 MiB of KV for the tiny model: 4,096 blocks of 16 tokens (the "several thousand blocks" case).
SERVE_ARGS = ["--api-key", API_KEY, "--kv-cache-memory", "32M", "--max-num-seqs", "64", "--max-model-len", "2048"]


def chromium_path() -> str:
    path = os.environ.get("PAGEDLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium (make install-test does)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = launch_serve(tiny_model_dir(tmp_path_factory), *SERVE_ARGS)
    try:
        yield url
    finally:
        assert stop_serve(proc) == 0


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    pg.fill("#api-key", API_KEY)
    pg.dispatch_event("#api-key", "change")
    pg.wait_for_function("window.pagedlmView.updates > 0")  # the live view is connected
    yield pg
    if not pg.is_closed():
        pg.close()
    assert not errors, errors  # no uncaught exception in the page's scripts


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def state(api) -> dict:
    r = api.get("/v1/engine/state")
    assert r.status_code == 200
    return r.json()


def wait_idle(api, timeout: float = 15.0) -> dict:
    """Until no sequence is left; then every block must be free or cached."""
    deadline = time.monotonic() + timeout
    while True:
        s = state(api)
        if not s["sequences"]:
            assert s["counts"]["used"] == s["counts"]["shared"] == 0
            assert s["counts"]["free"] + s["counts"]["cached"] == s["num_blocks"]
            return s
        assert time.monotonic() < deadline, f"requests still live after {timeout} s: {s['queues']}"
        time.sleep(0.05)


def set_params(pg, **values) -> None:
    for name, v in values.items():
        if name == "ignore_eos":
            pg.set_checked("#p-ignore_eos", bool(v))
        else:
            pg.fill(f"#p-{name}", str(v))


def send_chat(pg, text: str) -> None:
    pg.fill("#prompt", text)
    pg.click("#send")


def shown_count(pg, kind: str) -> int:
    return int(pg.inner_text(f"#count-{kind}"))


class Streams:
    """``n`` streaming completions in threads, each reading until ``close()`` (which drops the
    connections: the server aborts them) or its end."""

    def __init__(self, url: str, prompts: list[str], max_tokens: int):
        self.stop = threading.Event()
        self.started = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(url, p, max_tokens), daemon=True) for p in prompts]
        for t in self.threads:
            t.start()

    def _run(self, url: str, prompt: str, max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                if r.status_code != 200:
                    self.errors.append(f"HTTP {r.status_code}")
                    return
                for line in r.iter_lines():
                    if line.startswith("data: ") and self.stop.is_set():
                        return
        except httpx.HTTPError as e:
            self.errors.append(repr(e))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)
        assert not self.errors, self.errors


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_streams_text_and_shows_final_timings(page, api):
    set_params(page, temperature=0, max_tokens=1000, ignore_eos=True)
    send_chat(page, "Tell me about **paged** attention and `blocks`.")
    page.wait_for_function(
        "document.querySelector('.msg.assistant.streaming .content')?.textContent.length > 0")
    first_len = len(page.inner_text(".msg.assistant .content"))
    shot(page, "chat-streaming")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
    shot(page, "chat-done")
    assert len(page.inner_text(".msg.assistant .content")) > first_len  # text arrived in pieces
    meta = page.eval_on_selector(".msg.assistant .meta", "e => ({...e.dataset, text: e.textContent})")
    assert meta["finish"] == "length" and meta["completionTokens"] == "1000"
    assert float(meta["ttftMs"]) > 0 and float(meta["tokPerS"]) > 0
    assert "TTFT" in meta["text"] and "tok/s" in meta["text"] and "1000 completion tokens" in meta["text"]
    assert page.inner_text(".msg.user .content") == "Tell me about **paged** attention and `blocks`."
    wait_idle(api)


def test_markdown_is_rendered_and_escaped(page):
    html = page.evaluate("renderMarkdown('# T\\n**b** and `x<y`\\n```py\\nprint(1)\\n```\\n<img src=x onerror=alert(1)>')")
    assert "<h3>T</h3>" in html and "<strong>b</strong>" in html and "<code>x&lt;y</code>" in html
    assert '<pre class="code"><span class="lang">py</span><code>print(1)</code></pre>' in html
    assert "<img" not in html and "&lt;img" in html


def test_stop_aborts_the_request_and_frees_its_blocks(page, api):
    before = state(api)["metrics"]["generation_tokens"]
    set_params(page, temperature=0, max_tokens=1800, ignore_eos=True)
    send_chat(page, "Count slowly.")
    page.wait_for_function("document.querySelector('.msg.assistant.streaming .content')?.textContent.length > 40")
    rid = page.get_attribute(".msg.assistant", "data-request-id")
    assert rid and rid.startswith("chatcmpl-")
    # The engine view lists it as running, holding blocks.
    page.wait_for_selector(f"#queue-running li[data-request-id^='{rid}']")
    assert shown_count(page, "used") > 0
    shot(page, "stop-before")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert page.get_attribute(".msg.assistant .meta", "data-finish") == "stopped"
    # The view shows it gone and its blocks released (nothing else runs).
    page.wait_for_function(
        "(rid) => !document.querySelector(`#queues li[data-request-id^='${rid}']`)"
        " && document.getElementById('count-used').textContent === '0'"
        " && document.getElementById('count-shared').textContent === '0'", arg=rid)
    shot(page, "stop-after")
    s = wait_idle(api)
    generated = s["metrics"]["generation_tokens"] - before
    assert 0 < generated < 1800  # aborted server-side, not run to its end
    time.sleep(0.3)
    assert state(api)["metrics"]["generation_tokens"] - before == generated  # and not still running


def test_closing_the_page_mid_stream_frees_the_request(browser, server, api):
    pg = browser.new_page()
    pg.goto(server + "/")
    pg.fill("#api-key", API_KEY)
    pg.dispatch_event("#api-key", "change")
    set_params(pg, temperature=0, max_tokens=1800, ignore_eos=True)
    send_chat(pg, "Keep going.")
    pg.wait_for_function("document.querySelector('.msg.assistant.streaming .content')?.textContent.length > 40")
    assert state(api)["queues"]["running"] == 1
    pg.close()
    s = wait_idle(api)
    assert s["queues"] == {"running": 0, "waiting": 0, "preempted": 0}


# ---- the engine view -----------------------------------------------------------------------------
def test_shared_prefix_blocks_counted_as_the_engine_counts(page, api, server):
    prefix = "In the paged cache, one copy of a common prompt prefix serves every request that starts with it. " * 3
    first = Streams(server, [prefix + "first"], 1900)
    deadline = time.monotonic() + 30
    # The others come once the first one's prompt is computed and cached, so they share its blocks.
    while not any(s["output_tokens"] > 0 for s in state(api)["sequences"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rest = Streams(server, [prefix + f"request {i}" for i in range(5)], 1900)
    try:
        deadline = time.monotonic() + 30
        while True:
            s = state(api)
            holders: dict[int, int] = {}
            for seq in s["sequences"]:
                for b in seq["blocks"]:
                    holders[b] = holders.get(b, 0) + 1
            from_tables = sum(1 for n in holders.values() if n >= 2)
            shown = shown_count(page, "shared")
            if s["queues"]["running"] == 6 and s["counts"]["shared"] == from_tables == shown > 0:
                break
            assert time.monotonic() < deadline, (s["counts"], from_tables, shown, s["queues"])
            time.sleep(0.05)
        # The prefix is 3 x 96 characters: at least a few full 16-token blocks are shared by all six.
        assert s["counts"]["shared"] >= 3
        assert max(s["blocks"]["ref"]) == 6
        # The page's numbers are the counts of the very snapshot it drew.
        view = page.evaluate("() => { const s = window.pagedlmView.state; return {counts: s.counts, ref: s.blocks.ref}; }")
        assert view["counts"]["shared"] == sum(1 for r in view["ref"] if r >= 2)
        # Hover a shared block: its owners and its token text.
        bid = view["ref"].index(max(view["ref"]))
        box = page.locator("#blocks").bounding_box()
        cell, cols = page.evaluate("() => [pagedlmView.grid.cell, pagedlmView.grid.cols]")
        page.mouse.move(box["x"] + (bid % cols) * cell + cell / 2, box["y"] + (bid // cols) * cell + cell / 2)
        page.wait_for_selector("#tooltip pre.tokens")
        tip = page.inner_text("#tooltip")
        assert f"block {bid}" in tip and "shared" in tip and tip.count("cmpl-") >= 2
        shot(page, "shared-prefix")
    finally:
        rest.close()
        first.close()
    wait_idle(api)
    page.wait_for_function("document.getElementById('count-shared').textContent === '0'")
    shot(page, "shared-prefix-after")


def test_view_follows_64_concurrent_requests_on_4096_blocks(page, api, server):
    assert state(api)["num_blocks"] == 4096
    prompts = [f"Request {i}: " + "tell me about pages and blocks. " * (1 + i % 4) for i in range(64)]
    load = Streams(server, prompts, 1200)
    try:
        deadline = time.monotonic() + 60
        while state(api)["queues"]["running"] < 64:
            assert time.monotonic() < deadline, state(api)["queues"]
            time.sleep(0.05)
        start = page.evaluate("window.pagedlmView.updates")
        page.wait_for_function("(n) => window.pagedlmView.updates >= n + 8", arg=start, timeout=30_000)
        shown = int(page.inner_text("#queue-running-count"))
        assert shown > 0 and len(page.query_selector_all("#queue-running li.seq")) == shown
        used = shown_count(page, "used") + shown_count(page, "shared")
        assert used > 64  # every running request holds blocks
        shot(page, "load-64")
        draw = page.evaluate("window.pagedlmView.drawMs")
        (ARTIFACTS / "load-64-draw-ms.json").write_text(json.dumps({"draw_ms": draw}))
    finally:
        load.close()
    wait_idle(api)


# ---- bad input through the page --------------------------------------------------------------------
def test_page_shows_wrong_key_and_bad_parameters(page):
    set_params(page, temperature=-1, max_tokens=8)
    send_chat(page, "hi")
    page.wait_for_selector(".msg.assistant.error")
    err = page.inner_text(".msg.assistant.error .content")
    assert "HTTP 400" in err and "temperature" in err
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('server-status').textContent === 'API key needed'")
    set_params(page, temperature=0.5)
    send_chat(page, "hi again")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.error').length === 2")
    assert "HTTP 401" in page.inner_text(".msg.assistant.error >> nth=1")
    page.wait_for_function("document.getElementById('pool-info').textContent.includes('HTTP 401')")
    shot(page, "bad-input")
