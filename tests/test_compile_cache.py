"""Compiled decode steps built off the request path and cached per machine (engine/aot.py,
engine/compiled.py in background mode).

One real build (the tiny model's bucket 1, by two processes racing for the same cache entry)
backs the end-to-end tests; the rest use a fake builder that copies that package into place
when the test says so, so that what runs while a bucket is "compiling" is under the test's control.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pagedlm import LLM, SamplingParams
from pagedlm.engine import aot
from tests.helpers import save_tiny

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 9, 17, 33, 65, 129]}]
ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=32, max_num_seqs=4)

# A process that builds (or finds) bucket 1 in the background, decodes with it and reports.
CHILD = textwrap.dedent("""
    import json, sys
    from pagedlm import LLM, SamplingParams
    llm = LLM(sys.argv[1], enforce_eager=False, compile_mode="background", **json.loads(sys.argv[2]))
    c = llm.engine.runner.compiled
    at_start = c.states()[1]
    c.warmup([1])
    out = llm.generate([{"prompt_token_ids": [5, 9, 17, 33, 65, 129]}],
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    print(json.dumps({"at_start": at_start, "state": c.states()[1], "tokens": out[0].outputs[0].token_ids,
                      "started_builder": c.builder is not None,
                      "prepared": getattr(llm.engine.runner.model, "prepared_from", None), "compiled_steps": c.num_steps,
                      "trusted": [list(k) for k in c.checked], "eager_graphs": [list(k) for k in c.eager_graphs]}))
""")


def _child(model: str, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PAGEDLM_CACHE_DIR": str(cache_dir), "PAGEDLM_ENFORCE_EAGER": "0"}
    return subprocess.Popen([sys.executable, "-c", CHILD, model, json.dumps(ENGINE)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))


def _report(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_aot")))


@pytest.fixture(scope="module")
def reference(tiny) -> list[int]:
    llm = LLM(tiny, enforce_eager=True, **ENGINE)
    return llm.generate(PROMPTS, PARAMS, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory, reference) -> Path:
    """Two processes race to fill the same empty cache entry: both answer correctly, the entry is
    built once (its lock), and the package is the one file left. Returns the cache root."""
    root = tmp_path_factory.mktemp("aot_cache")
    procs = [_child(tiny, root), _child(tiny, root)]
    reports = [_report(p) for p in procs]
    for r in reports:
        assert r["state"] == "compiled" and r["tokens"] == reference
        assert r["compiled_steps"] > 0 and [1, False] in r["trusted"] and not r["eager_graphs"]
    packages = sorted((root / "compiled").glob("*.pt2"))
    assert len(packages) == 1 and packages[0].name.startswith("decode_b1-")
    assert not list((root / "compiled").glob(".tmp-*"))  # nothing half-written left behind
    return root


def test_two_racing_processes_build_once_and_both_answer(built):
    assert built.exists()  # the fixture's assertions are the test


def test_a_second_process_compiles_nothing(tiny, built, reference):
    r = _report(_child(tiny, built))
    assert r["at_start"] == "compiled"  # loaded at start-up
    assert r["prepared"]  # the model too: the builder cached it as it loaded it
    assert not r["started_builder"] and r["tokens"] == reference and r["compiled_steps"] > 0


def _package(built: Path) -> Path:
    return next((built / "compiled").glob("decode_b1-*.pt2"))


def _fake_builder(monkeypatch, built: Path, go: Path | None = None, fail: str | None = None) -> None:
    """The builder becomes a process that waits for ``go`` to exist, then copies the real package
    into place (or writes the failure marker ``fail``)."""
    package = _package(built)

    def command(spec, buckets, expected):
        script = textwrap.dedent(f"""
            import os, shutil, sys, time
            go, src, targets, fail = sys.argv[1], sys.argv[2], sys.argv[3:], {fail!r}
            while go and not os.path.exists(go):
                time.sleep(0.05)
            for t in targets:
                if fail:
                    open(t + ".failed", "w").write(fail)
                else:
                    shutil.copy(src, t + ".part")
                    os.replace(t + ".part", t)
        """)
        return [sys.executable, "-c", script, str(go or ""), str(package), *expected.values()]
    monkeypatch.setattr(aot, "builder_command", command)


def test_steps_run_eagerly_until_the_swap_at_a_step_boundary(tiny, built, reference, monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    go = tmp_path / "go"
    _fake_builder(monkeypatch, built, go)
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
    runner, compiled = llm.engine.runner, llm.engine.runner.compiled
    assert compiled.states()[1] == "eager"
    # The builder runs during steps here (it is stopped during each step otherwise: tested below),
    # so that the test can wait for its copy to land mid-request.
    monkeypatch.setattr(compiled, "builders_paused", contextlib.nullcontext)
    eager_steps = []
    execute = runner._execute_eager

    def spy(inputs):
        eager_steps.append(compiled.states()[1])
        if len(eager_steps) == 6:
            go.touch()  # the "compile" finishes while the request decodes
            deadline = time.monotonic() + 60
            while not compiled.entry(1).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        elif len(eager_steps) > 6:
            time.sleep(0.05)  # eager steps slow enough for the builder's copy to land mid-request
        return execute(inputs)
    runner._execute_eager = spy
    out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference  # eager steps, then compiled ones: the same tokens
    assert "compiling" in eager_steps  # steps went on eagerly while the bucket was being built
    assert compiled.num_steps > 0  # ... and the package took over within the same request
    second = llm.generate(PROMPTS, PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    assert second == reference and compiled.states()[1] == "compiled" and compiled.num_steps > 0
    assert (1, False) in compiled.checked  # the loaded package passed the self-check


def test_a_corrupt_entry_is_rebuilt_with_one_warning(tiny, built, reference, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    _fake_builder(monkeypatch, built)
    (tmp_path / "compiled").mkdir()
    entry = tmp_path / "compiled" / _package(built).name
    entry.write_bytes(_package(built).read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
        compiled = llm.engine.runner.compiled
        compiled.wait([1])
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference and compiled.states()[1] == "compiled"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("pagedlm")]
    assert len(warnings) == 1 and "does not load" in warnings[0] and "rebuilding" in warnings[0]
    assert entry.read_bytes() == _package(built).read_bytes()


def test_a_failed_build_leaves_the_bucket_eager_with_one_warning(tiny, built, reference, monkeypatch, tmp_path,
                                                                 caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    _fake_builder(monkeypatch, built, fail="RuntimeError: no C++ compiler")
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
        compiled = llm.engine.runner.compiled
        compiled.warmup([1])
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference
    assert compiled.states()[1] == "eager" and "no C++ compiler" in compiled.aot_failed[1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("pagedlm")]
    assert len(warnings) == 1 and "could not be built" in warnings[0]


GROUP_ENGINE = {**ENGINE, "max_num_seqs": 32, "num_kv_blocks": 96}


def test_a_dynamic_group_of_buckets_shares_one_package(tiny, monkeypatch, tmp_path):
    """Buckets 16 and 32 (and 64) are one package with a dynamic batch dimension: built once, loaded
    once, and each bucket's steps give the eager step's tokens."""
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(aot, "builder_command", lambda *a: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(aot, "_idle_priority", lambda threads: None)  # not this test process
    # The builder, in this process, matches the engine's kernels through the environment and the
    # kernels' state: both put back afterwards.
    from pagedlm import kernels

    monkeypatch.setenv("PAGEDLM_KERNELS", os.environ.get("PAGEDLM_KERNELS", "1"))
    monkeypatch.setattr(kernels, "_state", dict(kernels._state))
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **GROUP_ENGINE)
    compiled = llm.engine.runner.compiled
    entries = {b: compiled.entry(b) for b in (8, 16, 32)}
    assert entries[16] == entries[32] != entries[8] and entries[16].name.startswith("decode_b16-64-")
    assert aot.builder_main(compiled.aot, [16, 32], {b: str(entries[b]) for b in (16, 32)}) == 0
    assert sorted(p.name for p in (tmp_path / "compiled").glob("*.pt2")) == [entries[16].name]

    prompts = [{"prompt_token_ids": [(7 * i + j) % 97 + 1 for j in range(5 + i % 7)]} for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = LLM(tiny, enforce_eager=True, **GROUP_ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **GROUP_ENGINE)
    compiled = llm.engine.runner.compiled
    assert compiled.states()[16] == compiled.states()[32] == "compiled"  # loaded at start-up
    assert compiled.packages[16].loader is compiled.packages[32].loader  # one library
    for n in (24, 12):  # bucket 32, then bucket 16
        out = llm.generate(prompts[:n], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref[:n]]
    assert {(16, False), (32, False)} <= compiled.checked and not compiled.eager_graphs


def test_a_dynamic_group_that_fails_to_build_falls_back_to_a_package_per_bucket(tiny, monkeypatch, tmp_path,
                                                                               caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    asked = []

    def command(spec, buckets, expected):
        asked.append(sorted(Path(p).name.split("-")[0] for p in expected.values()))
        script = "import sys\nfor t in sys.argv[1:]: open(t + '.failed', 'w').write('test: cannot export')"
        return [sys.executable, "-c", script, *expected.values()]
    monkeypatch.setattr(aot, "builder_command", command)
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        llm = LLM(tiny, enforce_eager=False, compile_mode="background", **GROUP_ENGINE)
        compiled = llm.engine.runner.compiled
        compiled.warmup([16, 32])
    assert asked == [["decode_b16", "decode_b16"], ["decode_b16", "decode_b32"]]  # the group, then one each
    assert compiled.entry(16) != compiled.entry(32) and compiled.states()[16] == "eager"
    assert "cannot export" in compiled.aot_failed[32]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("pagedlm")]
    assert "shared by batch buckets [16, 32]" in warnings[0] and "each builds its own" in warnings[0]
    assert len(warnings) == 3  # the group, then each bucket once


def _key(tiny: str, **kw) -> str:
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **{**ENGINE, **kw})
    return llm.engine.runner.compiled.entry(1).name


def test_cache_keys_follow_what_changes_the_code(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "builder_command", lambda *a: [sys.executable, "-c", "pass"])
    base = _key(tiny)
    assert _key(tiny) == base  # same inputs, same key
    assert _key(tiny, dtype="bfloat16") != base
    assert _key(tiny, block_size=8) != base
    assert _key(tiny, quantization="int8") != base
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
    compiled = llm.engine.runner.compiled
    assert compiled.entry(2).name != compiled.entry(1).name
    # Not keyed by run-time values: the KV pool's size.
    assert _key(tiny, num_kv_blocks=64) == base
    # Another architecture (a shape) keys differently.
    other = save_tiny("llama", str(tmp_path / "wider"), hidden_size=96)
    assert _key(other) != base
    # The same key in another process.
    code = ("import json, sys; from pagedlm import LLM; "
            "llm = LLM(sys.argv[1], enforce_eager=False, compile_mode='background', **json.loads(sys.argv[2])); "
            "print(llm.engine.runner.compiled.entry(1).name)")
    out = subprocess.run([sys.executable, "-c", code, tiny, json.dumps(ENGINE)], capture_output=True, text=True,
                         env={**os.environ, "PAGEDLM_ENFORCE_EAGER": "0"}, timeout=600,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == base


def test_cache_warm_and_list(tiny, built, monkeypatch, tmp_path, capsys):
    from pagedlm.cli import main

    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    _fake_builder(monkeypatch, built)
    assert main(["cache", "warm", "--model", tiny, "--dtype", "float32", "--max-num-seqs", "4", "--buckets", "1"]) == 0
    assert "bucket    1: compiled" in capsys.readouterr().out
    assert main(["cache", "list", "--kind", "compiled"]) == 0
    assert "decode_b1-" in capsys.readouterr().out
    assert main(["cache", "warm", "--model", tiny, "--dtype", "float32", "--max-num-seqs", "4", "--buckets", "3"]) == 2
    assert "no decode bucket 3" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "compiled")


def _fresh_cache_with_kernels(monkeypatch, tmp_path) -> None:
    """An empty cache root (no prepared models); skips where pagedlm's kernels cannot be built."""
    from pagedlm import kernels

    if kernels.ops() is None:
        pytest.skip("no C++ compiler: pagedlm's kernels are not built here")
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDLM_PREPARED_CACHE", "0")


def test_cache_warm_on_a_first_run_waits_for_the_kernels(tiny, built, monkeypatch, tmp_path, capsys):
    """`pagedlm cache warm` of a quantized model on a machine whose kernels are still building:
    it used to ask for buckets under the key without the kernels, which nobody builds (builders
    key with the kernels), and wait for them forever. Now it waits for the kernels, then asks
    for the buckets under the key later processes look up."""
    import threading

    from pagedlm.cli import main
    from tests.test_prepared import _SlowKernels

    _fresh_cache_with_kernels(monkeypatch, tmp_path)
    launched = []

    def command(spec, buckets, expected, after_kernels=False):
        launched.append((spec.kernels, buckets, after_kernels))
        script = "import sys\nfor t in sys.argv[1:]: open(t + '.failed', 'w').write('test: not built')"
        return [sys.executable, "-c", script, *expected.values()]

    monkeypatch.setattr(aot, "builder_command", command)
    slow = _SlowKernels(monkeypatch)
    timer = threading.Timer(1.0, lambda: setattr(slow, "done", True))  # the build ends a second later
    timer.start()
    try:
        rc = main(["cache", "warm", "--model", tiny, "--quantization", "int8", "--dtype", "float32",
                   "--max-num-seqs", "4", "--buckets", "1"])
    finally:
        timer.cancel()
    captured = capsys.readouterr()
    assert "waiting for pagedlm's CPU kernels" in captured.err
    assert launched == [(True, [1], False)]  # one builder, under the key with the kernels
    assert rc == 1 and "bucket    1: eager (test: not built)" in captured.out


def test_the_builder_loads_the_model_the_engine_keyed(smollm2):
    """The builder reloads the model from the StepSpec. SmolLM2's GGUF has int4 and int8 weights,
    whose dense crossovers are measured apart: with different values for the two kinds, the
    builder's keys still equal the engine's for every bucket."""
    from pagedlm import kernels

    # Both sides with the kernels: built first (in a fresh cache the engine's weights would wait for
    # them while the rebuilt model, loaded later, might find them built).
    kernels.ops()
    llm = LLM(smollm2, enforce_eager=False, compile_mode="background", num_kv_blocks=8, max_num_seqs=64)
    runner = llm.engine.runner
    qweights = aot.quantized_weights(runner.model)
    assert {q.kind for q in qweights} == {"int4", "int8"}
    spec = runner.compiled.aot
    assert set(spec.dense_min_rows) == {"int4", "int8"}  # measured per kind, handed to the builder
    for q in qweights:  # as if measured: the two kinds cross over at different batch sizes
        q.dense_min_rows = 12 if q.kind == "int4" else 40
    spec = dataclasses.replace(spec, dense_min_rows={"int4": 12, "int8": 40})
    rebuilt = aot._load_model(spec)
    for b in (1, 16, 64):  # 16: past the int4 crossover, not the int8 one
        assert spec.path(rebuilt, b) == spec.path(runner.model, b)
    # A crossover inside a dynamic group splits it: 16 and 32 share a package, 64 has its own.
    assert [aot.package_rows(runner.model, b) for b in (8, 16, 32, 64)] == [(8, 8), (16, 32), (16, 32), (64, 64)]
    assert spec.path(rebuilt, 16) == spec.path(rebuilt, 32) != spec.path(rebuilt, 64)


def test_an_engine_leaves_a_bucket_to_the_builder_that_claimed_it(tiny, built, reference, monkeypatch, tmp_path):
    """A bucket another process's builder is making (its claim is held: here by the test) starts
    no second builder; the engine loads the entry once it appears. A builder given a claimed
    bucket exits at once, without loading the model or leaving a failure marker."""
    from pagedlm import cache

    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    spawned = tmp_path / "spawned"

    def command(spec, buckets, expected):
        return [sys.executable, "-c", f"open({str(spawned)!r}, 'w').close()"]
    monkeypatch.setattr(aot, "builder_command", command)
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
    compiled = llm.engine.runner.compiled
    entry = compiled.entry(1)
    fd = cache.claim(entry)
    assert fd is not None and cache.claimed(entry) and cache.claim(entry) is None
    try:
        assert aot.builder_main(compiled.aot, [1], {1: str(entry)}) == 0
        assert not Path(str(entry) + aot.FAILED_SUFFIX).exists()
        compiled.request([1])
        compiled.poll(force=True)
        assert compiled.builder is None and compiled.states()[1] == "compiling"
        shutil.copy(_package(built), entry)  # the other builder publishes, then exits
    finally:
        os.close(fd)
    assert not cache.claimed(entry)
    compiled.wait([1], timeout_s=30)
    out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference and compiled.states()[1] == "compiled"
    assert not spawned.exists()


def test_a_claim_dropped_without_an_entry_leaves_the_bucket_eager(tiny, monkeypatch, tmp_path, caplog):
    from pagedlm import cache

    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
    compiled = llm.engine.runner.compiled
    fd = cache.claim(compiled.entry(1))
    compiled.request([1])
    compiled.poll(force=True)
    assert compiled.states()[1] == "compiling" and compiled.builder is None
    os.close(fd)  # that builder died without publishing
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        compiled.wait([1], timeout_s=30)
    assert compiled.states()[1] == "eager" and "without building it" in compiled.aot_failed[1]


def test_a_first_process_leaves_a_builder_that_waits_for_the_kernels(tiny, monkeypatch, tmp_path):
    """A machine's first process may exit before pagedlm's kernels are built (its weights wait
    for them, and a package is keyed with the kernels its step calls). The buckets it asked for
    go to a builder that waits for the kernels, then builds under the key a later process, which
    has them, looks up."""
    from pagedlm import kernels
    from tests.test_prepared import _SlowKernels

    _fresh_cache_with_kernels(monkeypatch, tmp_path)
    launched = []

    def command(spec, buckets, expected, after_kernels=False):
        launched.append((spec, buckets, after_kernels))
        return [sys.executable, "-c", "pass"]
    monkeypatch.setattr(aot, "builder_command", command)
    slow = _SlowKernels(monkeypatch)
    first = LLM(tiny, quantization="int8", enforce_eager=False, compile_mode="background", **ENGINE)
    assert first.engine.runner.compiled.kernels_pending
    first.generate(PROMPTS, PARAMS, use_tqdm=False)  # bucket 1 asked for, the kernels still building
    assert [(b, after) for _, b, after in launched] == [([1], True)]
    spec = launched[0][0]
    assert spec.kernels and spec.dense_min_rows is None  # measured again with the kernels

    # The builder, in this process: it waits while the kernels build, then loads and builds.
    looks = []
    monkeypatch.setattr(kernels, "ready", lambda: looks.append(1) or len(looks) > 2)
    monkeypatch.setattr(aot.time, "sleep", lambda s: None)
    monkeypatch.setattr(aot, "_idle_priority", lambda threads: None)  # not this test process
    slow.done = True
    assert aot.builder_main(spec, [1], {}, after_kernels=True) == 0
    assert len(looks) == 3
    first.generate(PROMPTS, PARAMS, use_tqdm=False)  # the first engine switches (and gives back its core)
    from pagedlm.engine import threads

    assert not first.engine.runner.compiled.kernels_pending and "kernels" not in threads._yielded

    later = LLM(tiny, quantization="int8", enforce_eager=False, compile_mode="background", **ENGINE)
    compiled = later.engine.runner.compiled
    assert not compiled.kernels_pending and compiled.entry(1).exists()
    out = later.generate(PROMPTS, PARAMS, use_tqdm=False)
    ref = LLM(tiny, quantization="int8", enforce_eager=True, **ENGINE).generate(PROMPTS, PARAMS, use_tqdm=False)
    assert compiled.states()[1] == "compiled" and out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


# ---- builders stop while a step runs ------------------------------------------------------------

def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _reaches(pid: int, stopped: bool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (_proc_state(pid) == "T") == stopped:
            return True
        time.sleep(0.02)
    return False


def _child_of(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError(f"process {pid} started no child")


ROOT = Path(__file__).resolve().parent.parent
SLEEPER = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
needs_proc = pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                                reason="reads process states and children from /proc")


@needs_proc
def test_builders_and_their_compilers_stop_while_a_step_runs():
    """A builder and the compiler it runs (its process group) are stopped inside
    ``builders_paused`` and run again after it."""
    import types

    from pagedlm.engine.compiled import CompiledDecode

    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    try:
        child = _child_of(proc.pid)
        holder = types.SimpleNamespace(builder=proc, after_builder=None)
        with CompiledDecode.builders_paused(holder):
            assert _reaches(proc.pid, True) and _reaches(child, True)
        assert _reaches(proc.pid, False) and _reaches(child, False)
        proc.kill()
        proc.wait()
        with CompiledDecode.builders_paused(holder):  # an exited builder: nothing to signal
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@needs_proc
def test_the_engine_stops_its_builder_during_each_step(tiny, built, reference, monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    go = tmp_path / "go"
    _fake_builder(monkeypatch, built, go)
    llm = LLM(tiny, enforce_eager=False, compile_mode="background", **ENGINE)
    runner, compiled = llm.engine.runner, llm.engine.runner.compiled
    states = []
    execute = runner._execute_eager

    def spy(inputs):
        if compiled.builder is not None and compiled.builder.poll() is None:
            states.append(_reaches(compiled.builder.pid, True, timeout=2.0))  # SIGSTOP lands at once
        return execute(inputs)

    runner._execute_eager = spy
    try:
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert out[0].outputs[0].token_ids == reference
        assert states and all(states)  # stopped in every step it was alive for
        assert _reaches(compiled.builder.pid, False)  # and running between steps
    finally:
        go.touch()
        compiled.builder.wait(30)


@needs_proc
def test_a_builder_whose_engine_dies_mid_step_goes_on(tmp_path):
    """The engine is killed while its builder's group is stopped: the kernel's SIGCONT
    (PR_SET_PDEATHSIG, set by ``cache.IDLE_LAUNCH``) wakes the builder, which wakes its compiler."""
    (tmp_path / "fake_builder_mod.py").write_text(SLEEPER)
    engine = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        from pagedlm.cache import IDLE_LAUNCH
        p = subprocess.Popen([sys.executable, "-c", IDLE_LAUNCH, "fake_builder_mod"], start_new_session=True)
        print(p.pid, flush=True)
        sys.stdin.readline()  # the test saw the compiler start
        os.killpg(p.pid, signal.SIGSTOP)  # a step begins ...
        print("stopped", flush=True)
        sys.stdin.readline()  # the test saw both stop
        os._exit(0)  # ... and the engine dies in it
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    parent = subprocess.Popen([sys.executable, "-c", engine], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    pid = int(parent.stdout.readline())
    try:
        child = _child_of(pid)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "stopped"
        assert _reaches(pid, True) and _reaches(child, True)
        parent.stdin.write("die\n")
        parent.stdin.flush()
        assert parent.wait(10) == 0
        assert _reaches(pid, False) and _reaches(child, False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_moe_model_decodes_eagerly_without_starting_a_builder(tmp_path, monkeypatch, caplog):
    """The expert routing reads its counts on the host: no package of a MoE step can be built, so
    none is tried (every build failed, in every process, with a warning per bucket)."""
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))

    def no_builder(*a, **k):
        raise AssertionError("a builder was started for a MoE model")
    monkeypatch.setattr(aot, "builder_command", no_builder)
    moe = save_tiny("mixtral", str(tmp_path / "moe"))
    with caplog.at_level(logging.INFO, logger="pagedlm"):
        llm = LLM(moe, enforce_eager=False, compile_mode="background", **ENGINE)
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert llm.engine.runner.compiled is None and len(out[0].outputs[0].token_ids) == PARAMS.max_tokens
    assert any("MoE models decode eagerly" in r.getMessage() for r in caplog.records)
