"""Two "nodes" on loopback: two torchrun invocations (``--nnodes 2 --nproc-per-node 1``, c10d
rendezvous, gloo) serving the tiny model with PP=2 across them. Greedy outputs equal one
process's; killing one node makes rank 0 name the dead rank within seconds and end the request
in flight with an error; then every process of both launches is gone (no orphans)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from pagedlm import LLM, SamplingParams
from tests.server_fixtures import tiny_model_dir

PROMPTS = ["Hello world", "The quick brown fox", "One two three four five six", "a"]
MAX_TOKENS = 16
ENGINE = ["--dtype", "float32", "--kv-cache-memory", "4M", "--enforce-eager"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(port: int, model: str) -> subprocess.Popen:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "pagedlm", "serve", "--model", model, *ENGINE,
           "--port", "0", "--shutdown-timeout", "2", "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        p = psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    llm = LLM(model, dtype="float32", kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return model, [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.timeout(300)
def test_two_nodes_on_loopback_match_one_process_and_a_dead_node_is_named(reference):
    model, expected = reference
    port = _free_port()
    # Node 0 first: it hosts torchrun's rendezvous store (the endpoint), which must outlive the
    # node we kill, and, with the lower pid on the same address, it becomes rank 0.
    nodes = [_torchrun(port, model)]
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline and nodes[0].poll() is None
        time.sleep(0.1)
    nodes.append(_torchrun(port, model))
    every = {}  # pid -> psutil.Process, of both launches, for the orphan check
    lines: dict[int, list[str]] = {0: [], 1: []}
    try:
        # Whichever node the rendezvous made rank 0 prints the URL; the other never listens.
        url = None

        def read(i):
            for line in nodes[i].stderr:
                lines[i].append(line)

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for t in readers:
            t.start()
        deadline = time.monotonic() + 120
        while url is None:
            for i in range(2):
                for line in list(lines[i]):
                    if "listening on " in line:
                        url, head = line.split("listening on ")[1].strip(), i
            assert all(n.poll() is None for n in nodes), "".join(lines[0] + lines[1])
            assert time.monotonic() < deadline, "".join(lines[0] + lines[1])
            time.sleep(0.1)
        assert head == 0, "the node started second became rank 0"
        other = nodes[1]
        for n in nodes:
            every.update({p.pid: p for p in _tree(n)})
        assert len(every) == 4  # two torchrun agents, each with one pagedlm rank

        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            got = {}

            def ask(i):
                got[i] = http.post("/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS,
                                                            "temperature": 0, "ignore_eos": True})
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [got[i].json()["choices"][0]["text"] for i in range(len(PROMPTS))] == expected

            # A long request in flight, then the other node dies (its torchrun agent, SIGKILL).
            events: list[str] = []

            def stream():
                body = {"prompt": "Hello", "max_tokens": 1800, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

            reader = threading.Thread(target=stream)
            reader.start()
            time.sleep(1.0)
            os.kill(other.pid, signal.SIGKILL)
            t0 = time.monotonic()
            reader.join(30)
            assert not reader.is_alive()
            took = time.monotonic() - t0
            assert events[-1] == "[DONE]"
            err = json.loads(events[-2])["error"]
            assert err["code"] == "request_failed" and "worker rank 1" in err["message"], err
            assert took < 10, took
            health = http.get("/health")
            assert health.status_code == 503 and "worker rank 1" in health.json()["error"]["message"]

        nodes[head].send_signal(signal.SIGTERM)  # the agent forwards it to rank 0, which exits 0
        nodes[head].wait(60)
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in every.values()):
            assert time.monotonic() < deadline, [p for p in every.values() if p.is_running()]
            time.sleep(0.2)
    finally:
        for i in lines:  # shown by pytest when the test fails
            print(f"---- node {i} stderr ----\n" + "".join(lines[i]))
        for n in nodes:
            for p in _tree(n):
                p.kill()
            n.kill()
            n.wait(10)
