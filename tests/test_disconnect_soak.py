"""A light run of benchmarks/disconnect_soak.py: 40 streamed requests against a real ``pagedlm
serve`` whose clients leave before the headers, before the first token or mid-stream (a few read
to the end), with more clients than batch slots so that some leave while queued. Afterwards the
engine holds nothing (no request running or waiting, no KV block in use), /health is 200, and no
request got an error or hung — with the engine core in a thread and in a process."""

from __future__ import annotations

import pytest

from benchmarks.disconnect_soak import DisconnectConfig, check, launch, run_disconnects
from tests.server_fixtures import stop_serve, tiny_model_dir


@pytest.mark.timeout(120)
@pytest.mark.parametrize("core", ["thread", "process"])
def test_clients_that_leave_leave_nothing_behind(tmp_path_factory, core):
    model = tiny_model_dir(tmp_path_factory)
    proc, url = launch(model, ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "4M",
                               "--max-num-seqs", "6", "--engine-core", core])
    try:
        cfg = DisconnectConfig(streams=40, concurrency=12, seed=3, max_tokens=(8, 48), settle_timeout_s=15)
        report = run_disconnects(url, cfg)
    finally:
        code = stop_serve(proc)
    assert check(report) == [], report
    assert code == 0
    assert report["streams"] == 40 and sum(report["outcomes"].values()) == 40, report
    ended = report["outcomes"]
    assert ended.get("before_first_token: left before the first token", 0) > 0, ended
    assert ended.get("mid_stream: left mid-stream", 0) > 0, ended
    assert ended.get("complete: completed", 0) > 0, ended
