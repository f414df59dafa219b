"""A bounded soak (about 40 s) of a real ``pagedlm serve`` process: Poisson load with random
lengths, client disconnects, aborts, bad requests and injected faults (benchmarks/soak.py, whose
longer runs are in docs/benchmarks.md). Nothing lost or hung, no 5xx but the injected faults, the
engine empty afterwards (KV usage 0), RSS within 5 %, threads and fds flat."""

from __future__ import annotations

import pytest

from benchmarks.soak import SoakConfig, check, launch, run_soak
from pagedlm.config import ModelConfig
from tests.server_fixtures import tiny_model_dir

MAX_MODEL_LEN = 512


@pytest.mark.timeout(300)
def test_soak_loses_and_leaks_nothing(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    vocab = ModelConfig.from_pretrained(model).vocab_size
    poison = vocab - 1
    proc, url = launch(model, poison, ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                                       "--kv-cache-memory", "8M", "--max-num-seqs", "32"])
    try:
        cfg = SoakConfig(duration_s=25, warmup_s=5, rate=6, seed=1, poison=poison, vocab_size=vocab,
                         max_model_len=MAX_MODEL_LEN, request_timeout_s=60)
        report = run_soak(url, proc.pid, cfg)
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert check(report) == [], report
    assert code == 0
    # Every kind of request was exercised, and the faults really were injected.
    assert all(report["sent"].get(k, 0) > 0 for k in ("ok", "disconnect", "abort", "bad", "fault")), report["sent"]
    assert report["outcomes"].get("fault: error result", 0) == report["sent"]["fault"]
    assert report["outcomes"].get("disconnect: left mid-stream", 0) > 0
