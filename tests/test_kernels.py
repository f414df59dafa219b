"""pagedlm's own CPU kernels (pagedlm/kernels): built for this machine, exact up to float32
rounding, and every row computed identically whatever the number of rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedlm import kernels
from pagedlm.model.layers.quant import quantize_int4, quantize_int8, round_activations_int8

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="no C++ compiler: pagedlm's kernels are not built here")


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    return w, scale


ACTS = pytest.mark.parametrize("act", [False, True], ids=["float-act", "int8-act"])


@needs_kernels
@ACTS
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
def test_int8_mm_equals_float64_reference(rows, act):
    """Float activations: exact up to float32 rounding. int8 activations: exact up to float32
    rounding against x rounded per block of 32 (``round_activations_int8``), and within the
    rounding's own bound against x."""
    w, scale = _weights(203, 96, seed=rows)  # 203 output rows: blocks of 4 / 2 and a tail of 1
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1))
    y = ops.int8_mm(x, w, scale, act)
    assert y.dtype == torch.float32 and y.shape == (rows, 203)
    exact = (x.double() @ w.double().t()) * scale.double()
    if not act:
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
        return
    ref = (round_activations_int8(x).double() @ w.double().t()) * scale.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # Each x rounds by at most half a step (absmax of its block / 127 / 2).
    step = x.abs().reshape(rows, 3, 32).amax(-1).repeat_interleave(32, 1).double() / 127 / 2
    bound = (step @ w.double().abs().t()) * scale.double() + 1e-5
    assert ((y.double() - exact).abs() <= bound).all()
    assert not torch.allclose(y.double(), exact, rtol=1e-7, atol=1e-7)  # the rounding shows: int8 ran


@needs_kernels
@ACTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_mm_rows_are_independent_bit_for_bit(dtype, act):
    """A row's result must not depend on which other rows share the call: a 1-row decode step and
    a k-row speculative verification then produce the same logits, so greedy speculation is
    exactly plain greedy decoding."""
    w, scale = _weights(1003, 576)  # 1003: not a multiple of the 64-output chunks or the tiles
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(2)).to(dtype)
    alone = torch.cat([ops.int8_mm(x[i:i + 1], w, scale, act) for i in range(11)])
    for rows in range(1, 12):
        together = ops.int8_mm(x[:rows], w, scale, act)
        assert together.dtype == dtype
        assert torch.equal(together, alone[:rows]), rows
    assert torch.equal(ops.int8_mm(x[4:9], w, scale, act), alone[4:9])


@needs_kernels
@pytest.mark.parametrize("rows", [3, 40])  # x prepared on the calling thread / split over threads
def test_the_kernels_round_activations_exactly_as_the_reference(rows):
    """Through an identity weight, int8_mm returns x as its int8 activations (code times block
    scale, one rounding): bit for bit ``round_activations_int8``, ties to even included, so the
    tests' float64 references multiply the same x as the kernels."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 96, generator=g)
    x[:, 0] = 127.0  # amax 127: the step is 1, and k + 0.5 ties
    x[:, 1:9] = torch.tensor([2.5, -3.5, 0.5, -0.5, 1.5, -2.5, 126.5, -126.5])
    x[0, 32:64] = 0.0  # an all-zero block
    x[1, 64:96] = -1e-30  # a tiny block
    eye = torch.eye(96, dtype=torch.int8)
    y = ops.int8_mm(x, eye, torch.ones(96), True)
    assert torch.equal(y, round_activations_int8(x))
    assert torch.equal(y[:, 1:9], torch.tensor([2.0, -4.0, 0.0, -0.0, 2.0, -2.0, 126.0, -126.0]).expand(rows, -1))


@needs_kernels
def test_int8_mm_extreme_values_do_not_saturate():
    """|w| = 127 against x rounding to 127 everywhere: vpmaddubsw's int16 pairs at their largest
    (2 x 127 x 127) must not saturate."""
    w = torch.full((8, 64), 127, dtype=torch.int8)
    w[1::2] = -127
    x = torch.ones(2, 64)
    x[1] = -1
    y = ops.int8_mm(x, w, torch.ones(8), True)
    expected = torch.tensor([[127.0 * 64, -127.0 * 64] * 4, [-127.0 * 64, 127.0 * 64] * 4])
    assert torch.equal(y, expected)


@needs_kernels
def test_int8_mm_rejects_bad_shapes():
    w, scale = _weights(32, 40)  # 40: not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.int8_mm(torch.randn(2, 40), w, scale, False)
    w, scale = _weights(32, 48)
    with pytest.raises(RuntimeError, match="multiple of 32"):  # int8 activations need whole blocks
        ops.int8_mm(torch.randn(2, 48), w, scale, True)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.int8_mm(torch.randn(2, 32), w, scale, False)


@needs_kernels
def test_quantized_int8_layer_uses_the_kernel_and_falls_back_where_it_cannot():
    dense = torch.randn(64, 96) * 0.05
    qw = quantize_int8(dense, torch.float32)
    assert qw.kernel is not None and qw.int8_act  # 96: whole blocks of 32
    x = torch.randn(3, 96)
    expected = torch.ops.aten._weight_int8pack_mm(round_activations_int8(x), qw.packed, qw.scales)
    torch.testing.assert_close(qw.mm(x), expected, rtol=1e-5, atol=1e-5)
    # Past the crossover the dense GEMM takes x as it is.
    qw.dense_min_rows = 2
    torch.testing.assert_close(qw.mm(x), x @ qw.dense.t(), rtol=1e-5, atol=1e-5)
    qw = quantize_int8(torch.randn(64, 48) * 0.05, torch.float32)
    assert qw.kernel is not None and not qw.int8_act  # 48: float activations
    torch.testing.assert_close(qw.mm(x[:, :48]), torch.ops.aten._weight_int8pack_mm(x[:, :48], qw.packed, qw.scales),
                               rtol=1e-5, atol=1e-5)
    assert quantize_int8(torch.randn(64, 40), torch.float32).kernel is None  # input size 40


@needs_kernels
@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4], ids=["int8_mm", "int4_mm"])
def test_kernels_trace_under_torch_compile(quantize):
    """The compiled decode step calls the kernels through torch.ops.pagedlm (fake impls for tracing)."""
    qw = quantize(torch.randn(48, 64) * 0.05, torch.float32)
    assert qw.kernel is not None
    x = torch.randn(2, 64)
    compiled = torch.compile(lambda t: qw.mm(t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), qw.mm(x) * 2)


def test_library_is_keyed_by_the_cpu(monkeypatch):
    """A cached library built for another CPU (AVX-512 vs AVX2) must never be loaded."""
    first = kernels.library_path()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "fpu sse2 avx2")
    assert kernels.library_path() != first


def test_disabled_kernels_fall_back_to_torch():
    code = ("from pagedlm import kernels; from pagedlm.model.layers.quant import quantize_int4, quantize_int8; import torch;"
            "assert kernels.ops() is None; assert quantize_int8(torch.randn(8, 32), torch.float32).kernel is None;"
            "print('ok')")
    env = {**os.environ, "PAGEDLM_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_failed_build_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("PAGEDLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="pagedlm.kernels"):
        assert kernels.ops() is None
    assert "not available" in caplog.text


def test_torch_int4_kernel_rows_are_independent_too():
    """The other half of decode == verification logits: the int4 layers (torch's kernel)."""
    qw = quantize_int4(torch.randn(256, 576) * 0.05, torch.bfloat16)
    x = torch.randn(9, 576).bfloat16()
    alone = torch.cat([qw.mm(x[i:i + 1]) for i in range(9)])
    for rows in (2, 3, 4, 6, 8, 9):
        assert torch.equal(qw.mm(x[:rows]), alone[:rows]), rows


# ---- decode attention over the paged cache (pagedlm::paged_attention) ------------------------

def _paged_case(lens, heads, kv_heads, d, bs=16, dtype=torch.float32, seed=0):
    """A cache whose blocks are shuffled between rows, NaN in every slot a row must not read (the
    scratch block and each row's last block past its length), and the rows' queries."""
    g = torch.Generator().manual_seed(seed)
    per = [(n + bs - 1) // bs for n in lens]
    nb = sum(per) + 1
    cache = torch.randn(2, nb, bs, kv_heads, d, generator=g).to(dtype)
    cache[:, -1] = float("nan")
    perm = torch.randperm(nb - 1, generator=g)
    tables = torch.full((len(lens), max(per) + 2), nb - 1, dtype=torch.long)
    o = 0
    for i, (n, k) in enumerate(zip(lens, per)):
        tables[i, :k] = perm[o : o + k]
        o += k
        cache[:, tables[i, k - 1], (n - 1) % bs + 1 :] = float("nan")
    q = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    return q, cache, tables, torch.tensor(lens)


def _attention_reference(q, cache, tables, lens, scale, window):
    """Float64, one row at a time, the visible keys gathered by position."""
    _, _, bs, kvh, d = cache.shape
    heads = q.shape[1]
    out = []
    for i, n in enumerate(lens.tolist()):
        lo = max(0, n - window) if window else 0
        slots = torch.tensor([int(tables[i, t // bs]) * bs + t % bs for t in range(lo, n)])
        k = cache[0].reshape(-1, kvh, d)[slots].double()
        v = cache[1].reshape(-1, kvh, d)[slots].double()
        qq = q[i].double().view(kvh, heads // kvh, d)
        p = (torch.einsum("hgd,thd->hgt", qq, k) * scale).softmax(-1)
        out.append(torch.einsum("hgt,thd->hgd", p, v).reshape(heads, d))
    return torch.stack(out)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 100])
@pytest.mark.parametrize("shape", [(9, 3, 64, 16), (8, 8, 32, 16), (16, 2, 128, 32), (4, 1, 80, 16), (40, 2, 64, 16)],
                         ids=["smollm2", "mha", "d128", "mqa-d80", "g20"])
def test_paged_attention_equals_float64_reference(shape, window, dtype):
    """Lengths 1 to 1000 (one key, a partial block, several chunks of 256 merged), GQA groups of
    1 to 20, sliding windows; never reading a slot past a row's length (they hold NaN)."""
    heads, kvh, d, bs = shape
    lens = [1, 17, 256, 257, 300, 1000]
    q, cache, tables, lt = _paged_case(lens, heads, kvh, d, bs, dtype)
    scale = d ** -0.5
    y = ops.paged_attention(q, cache, tables, lt, scale, window)
    assert y.dtype == dtype and y.shape == q.shape and torch.isfinite(y).all()
    ref = _attention_reference(q, cache, tables, lt, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's own rounding
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_rows_are_independent_bit_for_bit(dtype):
    """A row's output is the same alone, in any batch, and on one thread or two: decode steps and
    speculative verification rows then agree exactly."""
    q, cache, tables, lt = _paged_case([5, 700, 64, 1, 513], 9, 3, 64, dtype=dtype, seed=3)
    batch = ops.paged_attention(q, cache, tables, lt, 0.125, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ops.paged_attention(q, cache, tables, lt, 0.125, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, one_thread)
    for i in range(len(lt)):
        alone = ops.paged_attention(q[i : i + 1], cache, tables[i : i + 1], lt[i : i + 1], 0.125, 0)
        assert torch.equal(alone, batch[i : i + 1])
    # the same rows in another order
    order = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(ops.paged_attention(q[order], cache, tables[order], lt[order], 0.125, 0), batch[order])


@pytest.mark.skipif("avx512_bf16" not in kernels._cpu_flags().split(), reason="this CPU has no AVX512-BF16: the "
                    "tests above ran the float path; the vdpbf16ps path is compile-checked below")
@needs_kernels
def test_paged_attention_float_path_where_avx512_bf16_is_missing(tmp_path):
    """On this CPU a bfloat16 query over a bfloat16 cache takes the vdpbf16ps path (the tests
    above); built without AVX512-BF16 (another process: one library per process), the float
    path of the same library agrees with the reference and keeps rows independent."""
    from tests.test_int4_kernel import _compile

    lib = str(tmp_path / "nobf16.so")
    done = _compile(["-march=native", "-mno-avx512bf16"], lib, link=True)
    assert done.returncode == 0, done.stderr[-3000:]
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
torch.ops.load_library({lib!r})
from tests.test_kernels import _paged_case, _attention_reference
pa = torch.ops.pagedlm.paged_attention
for heads, kvh, d, bs in ((9, 3, 64, 16), (16, 2, 128, 32)):
    q, cache, tables, lt = _paged_case([1, 17, 256, 300, 1000], heads, kvh, d, bs, torch.bfloat16, seed=d)
    y = pa(q, cache, tables, lt, d ** -0.5, 0)
    ref = _attention_reference(q, cache, tables, lt, d ** -0.5, 0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    for i in range(len(lt)):
        assert torch.equal(pa(q[i:i + 1], cache, tables[i:i + 1], lt[i:i + 1], d ** -0.5, 0), y[i:i + 1])
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PAGEDLM_KERNELS": "0"}, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_paged_attention_dpbf16_path_compiles(tmp_path):
    """Where the CPU lacks AVX512-BF16 the vdpbf16ps path cannot run here; it must still build."""
    import re
    import shutil

    from tests.test_int4_kernel import _compile

    if shutil.which("g++") is None or shutil.which("objdump") is None:
        pytest.skip("needs g++ and objdump")
    obj = str(tmp_path / "k.o")
    done = _compile(["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"], obj,
                    link=False)
    assert done.returncode == 0, done.stderr[-3000:]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
    assert re.search(r"\bvdpbf16ps\b", asm)


@needs_kernels
def test_paged_attention_rejects_bad_input():
    q, cache, tables, lt = _paged_case([20, 3], 9, 3, 64)
    with pytest.raises(RuntimeError, match="length"):
        ops.paged_attention(q, cache, tables, torch.tensor([0, 3]), 0.125, 0)
    with pytest.raises(RuntimeError, match="length"):
        ops.paged_attention(q, cache, tables[:, :1], torch.tensor([20, 3]), 0.125, 0)
    with pytest.raises(RuntimeError, match="head size"):
        ops.paged_attention(q[..., :60], cache[..., :60].contiguous(), tables, lt, 0.125, 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.paged_attention(q, cache.half(), tables, lt, 0.125, 0)


@needs_kernels
def test_both_attention_backends_use_the_kernel_and_agree_with_sdpa(monkeypatch):
    """With the kernels loaded, the eager backend's decode rows and the compiled step's backend
    both call the kernel (same rows, same bits); with them unloaded, the eager backend's SDPA
    path gives the same attention up to float32 rounding."""
    from pagedlm.model.layers import attention as A

    lens = [40, 1, 333]
    q, cache, tables, lt = _paged_case(lens, 9, 3, 64)
    k = torch.randn(3, 3, 64)
    v = torch.randn(3, 3, 64)
    slots = torch.tensor([int(tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16 for i, n in enumerate(lens)])
    calls = []
    real = ops.paged_attention

    def counting(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    def run(backend_meta):
        c = cache.clone()
        return backend_meta.backend.forward(q, k, v, c, backend_meta, 0.125, None)

    eager_meta = A.AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                                     decode_context_lens=lt, decode_max_context=max(lens), block_size=16)
    paged_meta = A.PagedDecodeMetadata(slots, tables, lt, 16)
    monkeypatch.setattr(kernels, "loaded", lambda: type("Ops", (), {"paged_attention": staticmethod(counting)}))
    eager, paged = run(eager_meta), run(paged_meta)
    assert calls == [3, 3] and torch.equal(eager, paged)
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    sdpa = run(A.AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                                   decode_context_lens=lt, decode_max_context=max(lens), block_size=16))
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("live", [1, 5, 9, 40])
def test_a_row_limit_skips_padding_rows_and_keeps_live_ones_bit_for_bit(live):
    """``kernels.row_limit(n)`` (a compiled step's live rows in its bucket): the three kernels compute
    the first n rows exactly as without it and write zeros past them; outside it, every row again."""
    from tests.test_int4_kernel import _int4, _random_int4

    rows = 48
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, 96, generator=g)
    w, scale = _weights(70, 96)
    codes, s4, m4, _ = _random_int4(70, 96, seed=2)
    lens = [1 + (7 * i) % 300 for i in range(rows)]
    lens[-1] = 0  # a padding row's length: never looked at past the limit
    q, cache, tables, lt = _paged_case([max(n, 1) for n in lens], 9, 3, 64, seed=4)
    lt[-1] = 0
    full = {
        "int8": lambda: ops.int8_mm(x, w, scale, True),
        "int8-float": lambda: ops.int8_mm(x, w, scale, False),
        "int4": lambda: _int4(x, codes, s4, m4, True),
        "int4-float": lambda: _int4(x, codes, s4, m4, False),
        "attention": lambda: ops.paged_attention(q, cache, tables, lt, 0.125, 0),
    }
    with kernels.row_limit(rows - 1):  # the padding row's length 0 would be refused
        want = {k: f() for k, f in full.items()}
    with kernels.row_limit(live):
        got = {k: f() for k, f in full.items()}
    for k in full:
        assert torch.equal(got[k][:live], want[k][:live]), k
        assert not got[k][live:].any(), k
    y = ops.int8_mm(x, w, scale, True)  # the limit is gone again: every row
    assert torch.equal(y[:-1], want["int8"][:-1]) and y[-1].any()
    with pytest.raises(RuntimeError, match="length"):
        full["attention"]()


def _ulps(y: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """Largest error of y against a float64 reference, in units of y's dtype's epsilon relative to
    the reference (``floor`` keeps values near zero from dividing by nothing)."""
    eps = torch.finfo(y.dtype).eps
    return ((y.double() - ref).abs() / (ref.abs() + floor) / eps).max().item()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [576, 64, 70, 7])
@pytest.mark.parametrize("offset", [0.0, 1.0])  # 1: Gemma's (1 + w)
def test_fused_rms_norm_rounds_once(d, dtype, offset):
    """Eager prefill's one-pass RMSNorm: float32 inside, one rounding to x's dtype, so within an
    ulp of the float64 norm (torch's composite rounds twice), rows split over threads alike."""
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(100, d, generator=g) * torch.logspace(-2, 2, 100)[:, None]).to(dtype)
    w = (torch.randn(d, generator=g) * 0.5).to(dtype)
    y = ops.rms_norm(x, w, 1e-6, offset)
    assert y.dtype == dtype and y.shape == x.shape
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() + offset)
    assert _ulps(y, ref, 1e-3) <= (8 if dtype == torch.float32 else 1)
    assert torch.equal(ops.rms_norm(x[7:8], w, 1e-6, offset), y[7:8])  # a row alone: the same bits
    with pytest.raises(RuntimeError, match="rms_norm"):
        ops.rms_norm(x, w[:-1], 1e-6, offset)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 80), (2, 1, 128), (3, 1, 6)])
def test_fused_rope_on_strided_q_and_k(heads, kv_heads, d, dtype):
    """Rope on q and k read in place from the QKV projection's output (row stride: q + 2 kv),
    against the float64 rotation."""
    from pagedlm.model.layers.basic import RotaryEmbedding

    t = 50
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
    cos, sin = RotaryEmbedding(d, 10000.0, None)(torch.arange(t) * 7, dtype)
    qo, ko = ops.rope_qk(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous() and qo.dtype == dtype
    for x, y in ((q, qo), (k, ko)):
        x1, x2 = x.double().chunk(2, dim=-1)
        c, s = cos.double()[:, None], sin.double()[:, None]
        ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        size = torch.cat((x1.abs() * c.abs() + x2.abs() * s.abs(),) * 2, dim=-1)  # what cancels
        bound = torch.finfo(dtype).eps * ref.abs() + 4 * torch.finfo(torch.float32).eps * size
        assert ((y.double() - ref).abs() <= bound).all()


@needs_kernels
def test_dense_gemm_multiplies_bf16_x_as_it_is():
    """Past the crossover an int4 layer in bfloat16 multiplies x as it is: its products match the
    exact products of x and the dequantised weights to the output's rounding, well inside the
    kernel's error (x rounded to int8 per block) and that of the dense GEMM over x rounded to the
    int8 grid (the eighth session's path, which then needed two bfloat16 halves)."""
    torch.manual_seed(0)
    qw = quantize_int4((torch.randn(512, 576) * 0.05).bfloat16(), torch.bfloat16)
    assert qw.int8_act and qw.kernel is not None
    x = torch.randn(300, 576).bfloat16()
    exact = x.double() @ qw.dense.double().t()
    dense = qw.dense_mm(x)
    assert dense.dtype == torch.bfloat16 and dense.shape == (300, 512)
    dense_err = (dense.double() - exact).norm()
    kernel_err = (qw.kernel_mm(x).double() - exact).norm()
    on_grid = torch.nn.functional.linear(round_activations_int8(x.float()), qw.dense.float()).double()
    # The output's own rounding: bfloat16's half ulp, ~2^-9 of each value.
    assert dense_err <= 2.0 ** -8 * exact.norm(), (dense_err, exact.norm())
    assert dense_err < 0.5 * kernel_err, (dense_err, kernel_err)
    assert dense_err < 0.5 * (on_grid - exact).norm()
