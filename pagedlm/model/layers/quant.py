"""Weight-only quantized linear layers behind one seam: a ``LinearMethod`` per layer.

Every linear layer (dense projections, MoE experts, the LM head) multiplies through its
``quant_method``:

    UnquantizedLinearMethod   the layer's dense weight (the dtype policy of ``matmul.py``)
    Int8LinearMethod          int8 per output channel: ``w = q * scale``
    Int4LinearMethod          int4 in groups of 32 along the input: ``w = (q - 8) * scale + zero``

Weights load dense, as always (``layer.weight``; the strict loader walk is unchanged). After
loading, ``process_weights_after_loading`` quantizes them once: from the dense values, or,
for GGUF Q4_0 / Q4_1 / Q4_K blocks, from the file's own 4-bit codes, repacked exactly (a
GGUF block of 32 is one group; see ``pagedlm.loader.gguf_quant``). The dense weight is then
replaced by the exact dequantization of the quantized weight, so both kernels multiply the
*same* weights:

* few rows (decode): weight-only kernels that stream 4 or 8 bits per weight instead of 16 or
  32: pagedlm's own ``int4_mm`` and ``int8_mm`` (``pagedlm/kernels``: each weight row read once
  for all rows, every row computed identically whatever their number; int4 with x rounded to
  int8 per block of 32, as llama.cpp), else torch's ``_weight_int4pack_mm_for_cpu`` /
  ``_weight_int8pack_mm``;
* many rows (prefill, large decode batches): pagedlm's int4 kernel with int8 activations where
  it is faster than the dense GEMM (AVX2: at every size), else the dense GEMM over x as it is
  (in bfloat16 more exact than the kernel's int8-rounded x; ``QuantizedWeight.dense_mm``).

The row count where the dense GEMM starts to win is measured on this machine at start-up over
the model's own layers (``measure_crossover``), not taken from a constant.

What it costs: the dense copy stays in memory (bf16 or fp32) next to the packed weights, so
quantization here buys decode speed, not memory. Layers the kernels cannot take (input size not
a multiple of 32, int4 output size not a multiple of 16) stay unquantized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from pagedlm import kernels

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4")
GROUP = 32  # int4 group size along the input dimension (one GGUF Q4_0 / Q4_1 block)
KERNEL_ROWS = 8  # rows pagedlm's kernels multiply per pass over the weights (kMaxRows in the C++)


def validate_quantization(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    return name.lower()


# ---- quantized weights -----------------------------------------------------------------------

@dataclass
class QuantizedWeight:
    """One (out, in) matrix in a weight-only format, and its exact dequantization (``dense``)."""

    kind: str  # "int8" | "int4"
    packed: torch.Tensor  # int8 (out, in) | int4 pack for this CPU
    scales: torch.Tensor  # int8: (out,) | int4: (in / 32, out, 2) scale and zero; compute dtype
    dense: torch.Tensor  # (out, in) in the layer's weight dtype
    dense_min_rows: int = 1 << 30  # rows from which ``mm`` uses the dense GEMM
    # int8, one row, compiled: multiply as a broadcast-sum (see ``mm``). Set for the output head,
    # whose input the compiled decode step computes into memory first.
    one_row_gemv: bool = False
    # pagedlm's few-rows kernel (``pagedlm.kernels``) and the float32 scales it takes; None where
    # the kernels could not be built (torch's kernel then multiplies). int8: scales (out,); int4:
    # ``packed`` is then the kernel's tiled layout (``pack_int4``) and kernel_scales (2, out / 8, in / 32 * 8)
    # holds scale and min (w = q * scale + min), float32, or float16 where that is exact.
    kernel: object = None
    kernel_scales: torch.Tensor | None = None
    int8_act: bool = False  # kernel with activations rounded to int8 per block (see pagedlm/kernels)
    # Built while the kernels were still compiling (``kernels.ops(wait=False)``): what
    # ``use_kernels`` switches to once they load (int4: the kernel's packed codes and scales; int8:
    # True). None: nothing to switch.
    pending_kernel: object = None

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """What ``mm`` runs from ``dense_min_rows`` rows: the dense GEMM over x as it is, in x's
        dtype. Not x rounded to the kernel's int8 grid (the seventh and eighth sessions' choice,
        so that a prompt's logits would not depend on which side of the crossover its rows fell:
        int8 rounding costs that batch invariance anyway, docs/architecture.md). Rounding x cost
        a pass, and in bfloat16 a value of the int8 grid needs two (``split`` then: twice the GEMM
        and an add). SmolLM2's perplexity with every int4 layer dense from 256 rows
        (benchmarks/perplexity_int4_act.py): x as it is 17.2706, the int8 grid in two bfloat16
        halves 17.3023, rounded to the grid and then to bfloat16 17.3933; on the kernel 17.2527."""
        from pagedlm.model.layers.matmul import linear

        return linear(x, self.dense)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in) -> (rows, out), in x's dtype."""
        if x.shape[0] >= self.dense_min_rows:
            return self.dense_mm(x)
        return self.kernel_mm(x)

    def kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        """What ``mm`` runs below ``dense_min_rows`` rows: the weight-only kernel."""
        if self.kind == "int4":
            if self.kernel is not None:
                # Same contract as the int8 kernel: weights read once for all rows, rows identical.
                return self.kernel(x, self.packed, self.kernel_scales[0], self.kernel_scales[1], self.int8_act,
                                   self.dense.shape[0])
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales)
        if self.kernel is not None:
            # Reads each weight row once for all of x's rows, and computes every row the same way
            # whatever their number: 1-row decode and k-row verification logits agree bit for bit.
            return self.kernel(x, self.packed, self.kernel_scales, self.int8_act)
        if self.one_row_gemv and x.shape[0] == 1 and torch.compiler.is_compiling():
            # One row, compiled: a broadcast-multiply-sum that inductor turns into a fused,
            # vectorised GEMV streaming the int8 weights (measured 1.3 ms vs 2.4 ms for
            # _weight_int8pack_mm on SmolLM2's 49152 x 576 head; from 2 rows the kernel wins).
            # Only where x is already in memory: inductor would otherwise inline x's producers
            # (a norm) into the loop and recompute them for every output row.
            y = (self.packed.float() * x.float()).sum(-1) * self.scales.float()
            return y[None].to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)


def int4_codes_from_dense(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per group of 32: (codes uint8 0..15, scale, zero), each
    group as ``w = (q - 8) * scale + zero``."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out, inp), scale, lo + 8 * scale


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out, inp = codes.shape
    q = codes.float().reshape(out, inp // GROUP, GROUP) - 8
    return (q * scale[..., None] + zero[..., None]).reshape(out, inp)


# The int4 kernel's activations: int8 per block of 32 (vpmaddubsw / vpdpbusd dot products, as
# llama.cpp's Q4 x Q8 path) or float32 (codes converted to float, FMA). Chosen by measurement on
# AVX2 (docs/benchmarks.md, "Kernels"): int8 is faster and perplexity moves by < 0.1%.
INT4_INT8_ACTIVATIONS = True
# The same for pagedlm's int8 kernel (the output head in ``auto``): measured in docs/benchmarks.md.
INT8_INT8_ACTIVATIONS = True


def int8_activations(q: torch.Tensor) -> bool:
    """Whether pagedlm's int8 kernel multiplies this int8 weight (out, in) with x rounded to int8
    per block of 32 (integer dot products, as llama.cpp's Q8_0 x Q8_0: ~3x fewer instructions than
    converting the weights to float, so SmolLM2's 28 MB head streams at memory speed). Needs whole
    blocks; the float path takes inputs that are a multiple of 16 only."""
    return INT8_INT8_ACTIVATIONS and q.shape[1] % GROUP == 0


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels' int8 activations, per block of 32 along the last dimension, to
    multiples of absmax / 127: the float32 operations of ``pagedlm::int4_mm`` as torch ops (the
    tests' reference: the kernels' products are exactly those of this x)."""
    k = x.shape[-1]
    nb = -(-k // GROUP)
    xb = torch.nn.functional.pad(x.float(), (0, nb * GROUP - k)).reshape(*x.shape[:-1], nb, GROUP)
    amax = xb.abs().amax(-1, keepdim=True)
    # Tensor by tensor: eager torch divides by a Python scalar as a multiply by its reciprocal,
    # which is off by an ulp now and then (a tie then rounds the other way: ~4 in 10^4 values).
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv) * (amax / c127)
    return q.reshape(*x.shape[:-1], nb * GROUP)[..., :k].to(x.dtype)


INT4_TILE = 8  # output rows per tile of the int4 kernel's layout (kTile in the C++)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) 0..15 -> the int4 kernel's layout (ceil(out / 8), ceil(in / 32) * 128)
    uint8: output rows in tiles of 8; per tile and block of 32 inputs, 4 chunks of 32 bytes, where
    byte 4 r + i of chunk h holds row r's input 4 h + i (low nibble) and input 16 + 4 h + i (high
    nibble). Padding (inputs to a whole block, rows to a whole tile) gets code 0; the kernel pads x
    with zeros and does not write the padded rows."""
    out, inp = codes.shape
    nb, tiles = -(-inp // GROUP), -(-out // INT4_TILE)
    c = codes.to(torch.uint8).contiguous()
    if (tiles * INT4_TILE, nb * GROUP) != (out, inp):
        c = torch.nn.functional.pad(c, (0, nb * GROUP - inp, 0, tiles * INT4_TILE - out))
    # Four codes at a time as one int32 (a cold start packs ~100M codes): per block, words 0-3
    # hold inputs 0-15 and words 4-7 inputs 16-31; a word of the first half ORed with its partner
    # shifted by 4 is 4 bytes of the layout (codes < 16: no carry between bytes).
    w = c.view(torch.int32).view(tiles, INT4_TILE, nb, 2, 4)  # tile, row, block, half, chunk h
    byte4 = w[:, :, :, 0] | (w[:, :, :, 1] << 4)  # tile, row, block, chunk
    return byte4.permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(tiles, nb * 128)


def tile_int4_scales(v: torch.Tensor) -> torch.Tensor:
    """Per-block values (out, nb) -> the int4 kernel's (ceil(out / 8), nb * 8): per tile and block,
    its 8 rows' values together (zeros for a last tile's padded rows)."""
    out, nb = v.shape
    tiles = -(-out // INT4_TILE)
    v = torch.nn.functional.pad(v, (0, 0, 0, tiles * INT4_TILE - out))
    return v.reshape(tiles, INT4_TILE, nb).transpose(1, 2).reshape(tiles, nb * INT4_TILE).contiguous()


def untile_int4_scales(v: torch.Tensor, out: int) -> torch.Tensor:
    """The inverse of ``tile_int4_scales``: (ceil(out / 8), nb * 8) -> (out, nb)."""
    tiles, w = v.shape
    return v.reshape(tiles, w // INT4_TILE, INT4_TILE).transpose(1, 2).reshape(tiles * INT4_TILE, -1)[:out]


def quantize_int4(dense: torch.Tensor, compute_dtype: torch.dtype,
                  exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    codes, scale, zero = exact if exact is not None else int4_codes_from_dense(dense)
    if exact is not None and compute_dtype == torch.float32 and dense.dtype == torch.float32:
        # The loaded weight is the file's own dequantisation of these codes: for GGUF Q4_0 / Q4_1
        # bit for bit what the line below computes (checked over SmolLM2's 120 layers), for Q4_K
        # within an ulp. A cold start then dequantises ~100M weights once, not twice.
        deq = dense
    else:
        # The dense copy is what pagedlm's kernel computes with: the codes with the scales as
        # loaded, not rounded to a bfloat16 compute dtype (a GGUF's float16 scales stay exact).
        deq = int4_dequantize(codes, scale.float(), zero.float()).to(dense.dtype)
    ops = _kernel_ops() if codes.device.type == "cpu" else None
    if ops is not None:
        qw = QuantizedWeight("int4", *_int4_kernel_form(codes, scale.float(), zero.float()), deq)
        qw.kernel, qw.kernel_scales, qw.int8_act = ops.int4_mm, qw.scales, INT4_INT8_ACTIVATIONS
        return qw
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    # torch's kernel takes its scales in x's dtype.
    sz = torch.stack([scale.to(compute_dtype), zero.to(compute_dtype)], -1).transpose(0, 1).contiguous()
    qw = QuantizedWeight("int4", packed, sz, deq)  # (in / 32, out, 2) scales and zeros
    if codes.device.type == "cpu" and kernels_coming():
        qw.pending_kernel = _int4_kernel_form(codes, scale.float(), zero.float())
    return qw


def _int4_kernel_form(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """(packed codes, scales) in the layout of pagedlm's int4 kernel."""
    # (q - 8) * scale + zero == q * scale + (zero - 8 * scale): the min folds the offset.
    sm = torch.stack([tile_int4_scales(scale.float()), tile_int4_scales(zero.float() - 8 * scale.float())])
    if torch.equal(sm.half().float(), sm):
        # GGUF Q4_0 / Q4_1 scales and mins are float16 in the file: stored so they stay exact
        # and a block reads 20 bytes instead of 24 (decode streams the weights from memory).
        sm = sm.half()
    return pack_int4(codes), sm


# Set while a model loads with its kernels built off the request path (``kernels_in_background``).
_BACKGROUND_KERNELS = False


@contextlib.contextmanager
def kernels_in_background(enabled: bool = True):
    """While this is active, a quantization that finds pagedlm's kernels not built yet starts their
    build in the background and takes torch's kernels, remembering what to switch to
    (``QuantizedWeight.pending_kernel``, ``use_kernels``) instead of waiting for the compiler."""
    global _BACKGROUND_KERNELS
    old, _BACKGROUND_KERNELS = _BACKGROUND_KERNELS, enabled
    try:
        yield
    finally:
        _BACKGROUND_KERNELS = old


def _kernel_ops():
    return kernels.ops(wait=not _BACKGROUND_KERNELS)


def kernels_coming() -> bool:
    """Whether this model's weights should be ready to switch to the kernels once they build."""
    return _BACKGROUND_KERNELS and os.environ.get("PAGEDLM_KERNELS", "1") != "0" and kernels.build_failed() is None


def use_kernels(weights: list[QuantizedWeight], compute_dtype: torch.dtype | None = None) -> int:
    """Switch the weights quantized while the kernels were building to pagedlm's kernels (between
    steps: the next step multiplies with them). They then equal weights quantized with the kernels
    from the start, crossover included: the one set while they waited was torch's kernels'
    against the dense GEMM (``provisional_crossover``), so with ``compute_dtype`` it is measured,
    per kind, with the kernels (~1 s, once; without it, every row count up to the largest a
    kernel's caller may verify stays on the kernels and the rest keeps the old crossover).
    Returns how many switched; 0 when the kernels do not load."""
    waiting = [w for w in weights if w.pending_kernel is not None]
    ops = kernels.ops() if waiting else None
    if ops is None:
        return 0
    for w in waiting:
        if w.kind == "int4":
            w.packed, w.scales = w.pending_kernel
            w.kernel, w.kernel_scales, w.int8_act = ops.int4_mm, w.scales, INT4_INT8_ACTIVATIONS
        else:
            w.kernel, w.kernel_scales, w.int8_act = ops.int8_mm, w.scales.float(), int8_activations(w.packed)
        # As ``finalize_quantization`` sets it for kernels: verification rows stay on them.
        w.dense_min_rows = max(w.dense_min_rows, KERNEL_ROWS + 1)
        w.pending_kernel = None
    if compute_dtype is not None:
        # Measured, a fresh server's 32-row steps took 305 ms on the dense GEMM over float32
        # weights that the int4 kernel runs in ~60 ms.
        for kind in {w.kind for w in waiting}:
            _measure_and_set_crossover(kind, [w for w in waiting if w.kind == kind], compute_dtype)
    return len(waiting)


def quantize_int8(dense: torch.Tensor, compute_dtype: torch.dtype) -> QuantizedWeight:
    w = dense.float()
    scale = (w.abs().amax(1) / 127).to(compute_dtype).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    deq = (q.float() * scale[:, None]).to(dense.dtype)
    qw = QuantizedWeight("int8", q, scale.to(compute_dtype), deq)
    ops = _kernel_ops() if q.device.type == "cpu" and q.shape[1] % 16 == 0 else None
    if ops is not None:
        qw.kernel, qw.kernel_scales, qw.int8_act = ops.int8_mm, qw.scales.float(), int8_activations(q)
    elif q.device.type == "cpu" and q.shape[1] % 16 == 0 and kernels_coming():
        qw.pending_kernel = True
    return qw


def int4_supported(out_features: int, in_features: int) -> bool:
    return in_features % GROUP == 0 and out_features % 16 == 0


# ---- methods ---------------------------------------------------------------------------------

class LinearMethod:
    """How one layer stores and multiplies its weight. The layer owns ``weight`` (dense, loaded
    by the loader walk); the method may replace it after loading and adds its own state."""

    name = "none"

    def process_weights_after_loading(self, layer, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        pass

    def apply(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from pagedlm.model.layers.matmul import linear

        return linear(x, weight, bias)


class UnquantizedLinearMethod(LinearMethod):
    name = "none"


class _WeightOnlyMethod(LinearMethod):
    def __init__(self):
        self.exact: dict | None = None  # int4: GGUF codes by row offset, recorded while loading
        self.qweight: QuantizedWeight | None = None

    def quantize(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> QuantizedWeight:
        raise NotImplementedError

    def process_weights_after_loading(self, layer, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        self.qweight = self.quantize(weight.detach(), compute_dtype)
        self.exact = None

    def apply(self, layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self.qweight
        if q is None:
            raise RuntimeError("quantized layer used before process_weights_after_loading")
        y = q.mm(x) if x.dim() == 2 else q.mm(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias


class Int8LinearMethod(_WeightOnlyMethod):
    name = "int8"

    def quantize(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> QuantizedWeight:
        return quantize_int8(weight, compute_dtype)


class Int4LinearMethod(_WeightOnlyMethod):
    name = "int4"

    def quantize(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> QuantizedWeight:
        return quantize_int4(weight, compute_dtype, self._exact_codes(weight.shape))

    def record_exact(self, row_offset: int, codes) -> None:
        """GGUF codes of rows [row_offset, row_offset + n) of this layer (a fused layer gets one
        call per shard); ``codes`` is None when a shard had no exact int4 form."""
        if self.exact is None:
            self.exact = {}
        self.exact[row_offset] = codes

    def _exact_codes(self, shape) -> tuple | None:
        if not self.exact or any(c is None for c in self.exact.values()):
            return None
        parts = [self.exact[k] for k in sorted(self.exact)]
        codes = torch.cat([p[0] for p in parts])
        if tuple(codes.shape) != tuple(shape):
            return None
        return codes, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


METHODS = {"none": UnquantizedLinearMethod, "int8": Int8LinearMethod, "int4": Int4LinearMethod}


# ---- per-model configuration -----------------------------------------------------------------

# GGUF tensor types and the precision class ``auto`` keeps for them.
GGUF_INT4 = {"Q4_0", "Q4_1", "Q4_K"}
GGUF_INT8 = {"Q8_0", "Q8_1", "Q8_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
GGUF_DENSE = {"F32", "F16", "BF16", "F64"}
_RANK = {"none": 2, "int8": 1, "int4": 0}


def most_precise(kinds) -> str:
    """The most precise of several methods' names (a fused layer takes its most precise part's)."""
    return max(kinds, key=_RANK.__getitem__)


@dataclass
class QuantConfig:
    """Chooses each layer's method. ``requested``: auto | none | int8 | int4. For ``auto`` on a
    GGUF file, ``gguf_types`` maps HF parameter names to the file's tensor types (the loader's
    ``ModelSource.tensor_types``: this module imports nothing from the loader)."""

    requested: str = "none"
    gguf_types: dict[str, str] = field(default_factory=dict)
    dense_min_rows: int | dict[str, int] | None = None  # None: measured on this machine; tests force a value

    def class_for(self, param_names: list[str], out_features: int, in_features: int, device: torch.device) -> str:
        """The method for a layer loading ``param_names`` into an (out, in) weight."""
        if self.requested == "none" or device.type != "cpu":
            return "none"
        if self.requested in ("int8", "int4"):
            kind = self.requested
        else:  # auto: keep the file's precision class
            kinds = []
            for n in param_names:
                t = self.gguf_types.get(n)
                if t is None or t in GGUF_DENSE:
                    kinds.append("none")
                elif t in GGUF_INT4:
                    kinds.append("int4")
                else:
                    kinds.append("int8")  # Q8_0, Q5_x, Q6_K and other k-quants
            kind = most_precise(kinds) if kinds else "none"
        if kind != "none" and in_features % GROUP:
            return "none"
        if kind == "int4" and not int4_supported(out_features, in_features):
            return "int8"
        return kind

    def method(self, kind: str) -> LinearMethod:
        return METHODS[kind]()


# ---- the build context and the post-load pass -----------------------------------------------

_weight_dtype: list[torch.dtype] = []


@contextlib.contextmanager
def weight_dtype_scope(dtype: torch.dtype):
    """While a model is built, linear and embedding weights are created in ``dtype`` (the other
    parameters in the default dtype, the compute dtype)."""
    _weight_dtype.append(dtype)
    try:
        yield
    finally:
        _weight_dtype.pop()


def current_weight_dtype() -> torch.dtype:
    return _weight_dtype[-1] if _weight_dtype else torch.get_default_dtype()


def measure_crossover(weights: list[QuantizedWeight], compute_dtype: torch.dtype,
                      candidates=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                      budget_s: float = 2.0) -> int:
    """Smallest row count at which the dense GEMM over these weights is at least as fast as the
    weight-only kernel (measured here, over the model's own layers so weights stream from memory
    as in a real step); never (``1 << 30``) if the kernel still wins at the largest candidate.
    From 1 row: torch's AVX2 int4 kernel (what multiplies while pagedlm's kernels build) loses to
    the dense GEMV at one row (~550 vs ~30 ms a SmolLM2 step, measured). pagedlm's int4 kernel
    with int8 activations beats float32 GEMM at every size on AVX2 (SmolLM2, 512 rows: 336 vs
    493 ms over 90 layers), so there the kernel multiplies prefill chunks too; a bfloat16 GEMM on
    AMX wins from some row count (SmolLM2 on a 2-core Sapphire Rapids, the int4 kernel on the tile
    unit against the GEMM over x as it is: ~128; with torch's kernels while pagedlm's build: int4
    16, int8 8), which this finds."""
    if not weights:
        return 1 << 30
    t_end = time.thread_time() + budget_s  # CPU time of this thread, as the runs (below)

    def run(rows: int, dense: bool) -> float:
        # Many rows are compute-bound: fewer layers measure them as well, within the budget. A
        # run of consecutive weights in model order: every shape of a layer in its proportion (the
        # kernel and the GEMM do not cross over at the same size for each shape; SmolLM2 on an AMX
        # Xeon: its 576 x 1536 down projections alone never, the model's mix from 256 rows).
        layers = weights[:max(8, len(weights) * 16 // rows)]
        return _timed_pass(layers, _inputs(layers, rows, compute_dtype), dense)

    # On one thread, timed by its CPU time: a start-up measures while other work may run (the
    # compiled steps' builder, a kernel build, other processes), and its answer is kept with the
    # prepared model. Wall time over two threads, with another process busy on one core, gave
    # SmolLM2's int8 head anything from 4 rows to never (dense wins from 9 when quiet); preemption
    # does not count in a thread's CPU time, and both paths split over threads alike.
    with _on_one_thread():
        # Every weight touched both ways first: a prepared model is mapped from its file, and
        # whichever path reads a page first pays its fault (on an AMX Xeon a start-up measured
        # "dense from 16 rows" where the kernel is 2x faster, against 64-128 warm).
        for w in weights:
            x1 = torch.randn(1, w.dense.shape[1], dtype=compute_dtype)
            w.dense_mm(x1)
            w.kernel_mm(x1)

        def dense_wins(rows: int) -> bool:
            dense = kernel = float("inf")
            for _ in range(3):  # best of 3 each, alternating
                dense, kernel = min(dense, run(rows, True)), min(kernel, run(rows, False))
            return dense <= kernel

        # The first candidate where the dense GEMM wins, and at the next size too (one hiccup of
        # the machine during the kernel's runs would otherwise slow every later step), found by
        # bisection: the dense GEMM gains on the kernel as rows grow. Out of time, the smallest
        # size known to qualify, or never: the kernel is the safe side (at most ~1.5x slower
        # at 512 rows, where a wrong "dense" costs up to 2x at 16-32).
        lo, hi = 0, len(candidates)  # the answer's index lies in [lo, hi]; hi: none qualifies
        while lo < hi and time.thread_time() < t_end:
            mid = (lo + hi) // 2
            if dense_wins(candidates[mid]) and (mid + 1 == len(candidates) or dense_wins(candidates[mid + 1])):
                hi = mid
            else:
                lo = mid + 1
        return candidates[hi] if hi < len(candidates) else 1 << 30


def provisional_crossover(weights: list[QuantizedWeight], compute_dtype: torch.dtype) -> int:
    """The dense crossover while torch's kernels stand in for pagedlm's (a minute, while those
    build): one row through every layer both ways, timed on the second pass (the first faults the
    pages in); torch's kernel up to ``KERNEL_ROWS`` rows where it wins at one row, else the dense
    GEMM from 1 row. ~0.1 s where ``measure_crossover`` took ~2 s of a first process's ~9
    (SmolLM2, 2-core Xeon); what it finds there: 1 row on AVX2, where torch's int4 kernel is ~20x
    slower than the dense GEMV, and 8-16 on an AMX Xeon, where the dense GEMV over bfloat16
    weights made a first process decode at 18 tok/s against 45 with torch's kernel."""
    xs = _inputs(weights, 1, compute_dtype)
    with _on_one_thread():  # CPU time of this thread, as measure_crossover (see there)
        for _ in range(2):
            dense, kernel = _timed_pass(weights, xs, True), _timed_pass(weights, xs, False)
    return KERNEL_ROWS + 1 if kernel < dense else 1


@contextlib.contextmanager
def _on_one_thread():
    """Torch on one thread, in inference mode, for a crossover measurement."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def _inputs(weights, rows: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Random x of ``rows`` rows for each input size among the weights."""
    return {k: torch.randn(rows, k, dtype=dtype) for k in {w.dense.shape[1] for w in weights}}


def _timed_pass(weights, xs: dict[int, torch.Tensor], dense: bool) -> float:
    """This thread's CPU time for one pass of x through the weights: dense GEMM or kernel."""
    t = time.thread_time()
    for w in weights:
        x = xs[w.dense.shape[1]]
        w.dense_mm(x) if dense else w.kernel_mm(x)
    return time.thread_time() - t


def finalize_quantization(model: torch.nn.Module, compute_dtype: torch.dtype, qcfg: QuantConfig) -> dict[str, int]:
    """After loading: quantize every layer whose method asks for it, point the dense weights at the
    exact dequantization, set the dense crossover. Returns layer counts per method."""
    counts: dict[str, int] = {}
    by_kind: dict[str, list[QuantizedWeight]] = {}
    with torch.no_grad():
        # Children before parents: a parent that derives weights from a child's (MLA's absorbed
        # up-projections from kv_b_proj) sees the child's final, quantized-then-dequantized weight.
        for mod in reversed(list(model.modules())):
            fn = getattr(mod, "process_weights_after_loading", None)
            if fn is None:
                continue
            for kind, qw in fn(compute_dtype):
                counts[kind] = counts.get(kind, 0) + 1
                if qw is not None:
                    by_kind.setdefault(kind, []).append(qw)
    for kind, ws in by_kind.items():
        # An int for every kind, or {kind: rows}: the values another process measured (the
        # compiled step's builder reproduces the engine's model exactly).
        rows = qcfg.dense_min_rows.get(kind) if isinstance(qcfg.dense_min_rows, dict) else qcfg.dense_min_rows
        if rows is None and all(w.pending_kernel is not None for w in ws):
            # pagedlm's kernels are building: torch's kernels stand in for a minute, and the
            # crossover is measured once the kernels load (``use_kernels``).
            rows = provisional_crossover(ws, compute_dtype)
            log.info("%s weights: dense GEMM from %d rows until pagedlm's kernels load", kind, rows)
        if rows is None:
            _measure_and_set_crossover(kind, ws, compute_dtype)
        else:
            for w in ws:
                w.dense_min_rows = rows
    return counts


def _measure_and_set_crossover(kind: str, ws: list[QuantizedWeight], compute_dtype: torch.dtype) -> None:
    """Measure the dense crossover of these weights (one kind) on this machine and set it."""
    rows = measure_crossover(ws, compute_dtype)
    if all(w.kernel is not None for w in ws):
        # pagedlm's kernels read the weights once for up to KERNEL_ROWS rows, and a row's
        # result is the same bit for bit at any row count: decode (1 row) and speculative
        # verification (1 + k <= 8 rows) then give identical logits. A crossover below
        # that, measured on a busy machine, would send verification to the dense GEMM.
        rows = max(rows, KERNEL_ROWS + 1)
    log.info("%s weights: dense GEMM from %d rows on this machine (measured)", kind, rows)
    for w in ws:
        w.dense_min_rows = rows
