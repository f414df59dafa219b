"""Two pieces of a fast first use: the prepared-model cache (a loaded, quantized model mapped back
in a later process: loader/prepared.py) and pagedlm's kernels built off the request path
(torch's kernels multiply until they load, then the waiting weights switch at a step boundary)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from pagedlm import LLM, SamplingParams, kernels
from pagedlm.config import ModelConfig
from pagedlm.engine.aot import quantized_weights
from pagedlm.loader import prepared
from pagedlm.model.registry import load_model
from tests.helpers import save_tiny

needs_kernels = pytest.mark.skipif(kernels.ops() is None, reason="pagedlm's kernels do not build here")

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 9, 17, 33, 65, 129]}, {"prompt_token_ids": [7, 8, 200]}]
ROWS = {"int4": 9, "int8": 9}  # a fixed crossover: what it is measured to be must not matter here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny("llama", str(tmp_path_factory.mktemp("prepared_tiny")))


def _tensors(model) -> dict[str, torch.Tensor]:
    out = {f"p:{n}": p for n, p in model.named_parameters()}
    for i, q in enumerate(quantized_weights(model)):
        out.update({f"q{i}:packed": q.packed, f"q{i}:scales": q.scales, f"q{i}:dense": q.dense})
        if q.kernel_scales is not None:
            out[f"q{i}:kernel_scales"] = q.kernel_scales
    return out


def _same_model(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for qa, qb in zip(quantized_weights(a), quantized_weights(b), strict=True):
        assert (qa.kind, qa.dense_min_rows, qa.int8_act, qa.one_row_gemv) == (qb.kind, qb.dense_min_rows, qb.int8_act,
                                                                              qb.one_row_gemv)
        assert (qa.kernel is None) == (qb.kernel is None)


@needs_kernels
@pytest.mark.parametrize("quantization", ["int4", "int8", "none"])
def test_a_saved_model_loads_back_the_same(tiny, tmp_path, monkeypatch, quantization, caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig.from_pretrained(tiny)
    fresh = load_model(tiny, cfg, torch.float32, quantization=quantization, dense_min_rows=9, save_prepared=True)
    entries = list((tmp_path / prepared.KIND).glob("*.pt"))
    assert len(entries) == 1
    with caplog.at_level(logging.INFO, logger="pagedlm"):
        again = load_model(tiny, cfg, torch.float32, quantization=quantization, dense_min_rows=9)
    assert any("model loaded from the cache" in r.getMessage() for r in caplog.records)
    _same_model(fresh, again)
    # ... and it decodes the same tokens through the engine.
    want = LLM(tiny, quantization=quantization, extra={"dense_min_rows": 9}, num_kv_blocks=16)
    got = [o.outputs[0].token_ids for o in want.generate(PROMPTS, PARAMS, use_tqdm=False)]
    monkeypatch.setenv("PAGEDLM_PREPARED_CACHE", "0")
    ref = LLM(tiny, quantization=quantization, extra={"dense_min_rows": 9}, num_kv_blocks=16)
    assert got == [o.outputs[0].token_ids for o in ref.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_the_key_follows_what_changes_the_loaded_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig.from_pretrained(tiny)

    def key(**kw):
        args = {"dtype": torch.float32, "device": "cpu", "quantization": "int8", "dense_min_rows": None, **kw}
        return prepared.entry(tiny, cfg, **args).name

    base = key()
    assert key() == base  # stable
    assert len({base, key(dtype=torch.bfloat16), key(quantization="int4"), key(dense_min_rows=9)}) == 4
    with monkeypatch.context() as m:
        m.setattr(kernels, "ops", lambda wait=True: None)  # torch's kernels multiply: another model
        assert key() != base
    if kernels.ops() is not None:  # the kernels' activations (switches a benchmark flips)
        from pagedlm.model.layers import quant

        for flag in ("INT4_INT8_ACTIVATIONS", "INT8_INT8_ACTIVATIONS"):
            with monkeypatch.context() as m:
                m.setattr(quant, flag, not getattr(quant, flag))
                assert key() != base, flag
    weights = os.path.join(tiny, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the checkpoint was rewritten
    try:
        assert key() != base
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepared.entry(tiny, cfg, torch.float32, "meta", "none", None) is None  # CPU only
    monkeypatch.setenv("PAGEDLM_PREPARED_CACHE", "0")
    assert prepared.entry(tiny, cfg, torch.float32, "cpu", "none", None) is None


def test_a_corrupt_entry_is_dropped_with_one_warning(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig.from_pretrained(tiny)
    load_model(tiny, cfg, torch.float32, quantization="int8", dense_min_rows=9, save_prepared=True)
    entry = next((tmp_path / prepared.KIND).glob("*.pt"))
    entry.write_bytes(entry.read_bytes()[:5000])  # truncated
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        model = load_model(tiny, cfg, torch.float32, quantization="int8", dense_min_rows=9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "does not load" in warnings[0] and "loading the checkpoint" in warnings[0]
    assert not entry.exists() and quantized_weights(model)


class _SlowKernels:
    """pagedlm's kernels as if their compiler were still running: ``ops(wait=False)`` is None
    until ``done``; the real library afterwards."""

    def __init__(self, monkeypatch):
        self.done = False
        real_ops = kernels.ops
        monkeypatch.setattr(kernels, "ops", lambda wait=True: real_ops() if (self.done or wait) else None)
        monkeypatch.setattr(kernels, "build_state", lambda: "ready" if self.done else "building")
        monkeypatch.setattr(kernels, "build_failed", lambda: None)


@needs_kernels
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_torch_kernels_until_pagedlms_are_built_then_the_same_model(tiny, tmp_path, monkeypatch, quantization):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDLM_PREPARED_CACHE", "0")
    ref = LLM(tiny, quantization=quantization, extra={"dense_min_rows": 9}, num_kv_blocks=16)
    want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, PARAMS, use_tqdm=False)]

    slow = _SlowKernels(monkeypatch)
    threads = torch.get_num_threads()
    llm = LLM(tiny, quantization=quantization, extra={"dense_min_rows": 9}, num_kv_blocks=16,
              compile_mode="background")
    qws = quantized_weights(llm.engine.runner.model)
    assert qws and all(q.kernel is None and q.pending_kernel is not None for q in qws)
    if threads > 1:
        assert torch.get_num_threads() == threads - 1  # a core left to the compiler
    before = llm.generate(PROMPTS, PARAMS, use_tqdm=False)  # torch's kernels: answers meanwhile
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in before)
    assert all(q.kernel is None for q in qws)

    slow.done = True
    time.sleep(0.25)  # the engine looks for the library at most every 0.2 s
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert all(q.kernel is not None and q.pending_kernel is None for q in qws)  # switched at a step
    assert torch.get_num_threads() == threads
    _same_model(ref.engine.runner.model, llm.engine.runner.model)
    assert got == want


@needs_kernels
def test_the_crossover_is_measured_again_once_the_kernels_load(tiny, tmp_path, monkeypatch):
    """While the kernels build, the crossover against torch's kernels is only the provisional one
    (one row each way: ~0.1 s where measuring it took ~2 s of a first process); once pagedlm's
    load, the crossover is measured with them (a fresh server's 32-row steps otherwise stayed on
    the dense GEMM over float32 weights: 305 ms a step instead of ~60, measured)."""
    from pagedlm.model.layers import quant

    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDLM_PREPARED_CACHE", "0")
    slow = _SlowKernels(monkeypatch)
    measured, provisional = [], []

    def crossover(ws, dtype, **kw):
        measured.append(all(w.kernel is not None for w in ws))
        return 64

    def provisional_crossover(ws, dtype):
        provisional.append(all(w.kernel is None and w.pending_kernel is not None for w in ws))
        return 1

    monkeypatch.setattr(quant, "measure_crossover", crossover)
    monkeypatch.setattr(quant, "provisional_crossover", provisional_crossover)
    llm = LLM(tiny, quantization="int4", num_kv_blocks=16, compile_mode="background")
    qws = [q for q in quantized_weights(llm.engine.runner.model) if q.kind == "int4"]
    assert qws and all(q.dense_min_rows == 1 and q.kernel is None for q in qws)
    assert provisional == [True] and measured == []
    slow.done = True
    time.sleep(0.25)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(q.kernel is not None and q.dense_min_rows == 64 for q in qws)
    assert measured == [True] and provisional == [True]


def test_a_failed_kernel_build_keeps_torchs_kernels_with_one_warning(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PAGEDLM_CACHE_DIR", str(tmp_path))
    slow = _SlowKernels(monkeypatch)
    llm = LLM(tiny, quantization="int8", extra={"dense_min_rows": 9}, num_kv_blocks=16, compile_mode="background")
    monkeypatch.setattr(kernels, "build_state", lambda: "failed: g++: internal compiler error")
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        out = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "internal compiler error" in warnings[0]
    assert all(q.kernel is None and q.pending_kernel is None for q in quantized_weights(llm.engine.runner.model))
    assert not slow.done
