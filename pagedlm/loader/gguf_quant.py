"""GGUF 4-bit blocks -> int4 codes with a scale and zero per group of 32, exactly.

torch's int4 kernels compute ``w = (q - 8) * scale + zero`` per group of 32 inputs. The GGUF
block formats map onto that without re-quantizing (ggml's ``ggml-common.h`` layouts):

    Q4_0  18 bytes / 32 weights: d (f16), 16 bytes of nibbles      w = d * (q - 8)
    Q4_1  20 bytes / 32 weights: d, m (f16), 16 bytes of nibbles   w = d * q + m
    Q4_K  144 bytes / 256 weights: d, dmin (f16), 12 bytes of 6-bit sub-block scales and mins,
          128 bytes of nibbles; sub-block j of 32:                  w = d * sc_j * q - dmin * m_j

so scale = d, zero = 0 (Q4_0); scale = d, zero = m + 8d (Q4_1); scale = d * sc_j,
zero = 8 * d * sc_j - dmin * m_j (Q4_K). In Q4_0 / Q4_1 the low nibbles of a block are its
weights 0-15 and the high nibbles 16-31; in Q4_K each 32 bytes hold two sub-blocks (low nibbles
the first, high nibbles the second).
"""

from __future__ import annotations

import numpy as np
import torch

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed bytes -> (n, 8) 6-bit scales and mins (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_01(raw: np.ndarray, type_name: str, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q4_0 / Q4_1 rows -> (codes uint8 (rows, cols), d (rows, cols / 32), m or None), float32."""
    rows = raw.shape[0]
    size = 18 if type_name == "Q4_0" else 20
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // 32, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = None
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = _nibbles(blocks[..., size - 16:size]).reshape(rows, cols)
    return codes, d, m


def int4_codes(raw: np.ndarray, type_name: str, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw: (rows, bytes per row) uint8 of a GGUF tensor -> (codes uint8 (rows, cols),
    scale and zero float32 (rows, cols / 32))."""
    rows = raw.shape[0]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if type_name in ("Q4_0", "Q4_1"):
        codes, d, m = _q4_01(raw, type_name, cols)
        zero = np.zeros_like(d) if m is None else m + np.float32(8) * d
        scale = d
    elif type_name == "Q4_K":
        blocks = raw.reshape(rows, cols // 256, 144)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        sc, mn = _q4k_scale_min(blocks[..., 4:16])
        scale = d[..., None] * sc.astype(np.float32)  # (rows, superblocks, 8)
        zero = np.float32(8) * scale - dmin[..., None] * mn.astype(np.float32)
        qs = blocks[..., 16:144].reshape(rows, cols // 256, 4, 32)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, sb, 4, 64): sub-blocks 2j, 2j+1
        codes = codes.reshape(rows, cols)
        scale, zero = scale.reshape(rows, cols // 32), zero.reshape(rows, cols // 32)
    else:
        raise ValueError(f"GGUF type {type_name} has no exact int4 form; int4 types: {', '.join(INT4_TYPES)}")
    return (torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)),
            torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)))


# ---- dequantization -----------------------------------------------------------------------------
# gguf's ``dequantize`` works through rows 16 at a time and unpacks nibbles again for the codes
# above; these types (SmolLM2's) are done here in one pass per tensor, with gguf's own
# arithmetic in the same order, so the results are bit for bit gguf's (a test checks every
# tensor of the shipped files).
FAST_DEQUANT = ("Q4_0", "Q4_1", "Q8_0")


def dequantize(raw: np.ndarray, type_name: str, cols: int,
               with_codes: bool = False) -> tuple[np.ndarray, tuple[torch.Tensor, ...] | None]:
    """raw: (rows, bytes per row) uint8 of a 2-D GGUF tensor in a ``FAST_DEQUANT`` type ->
    (float32 (rows, cols), and for Q4_0 / Q4_1 with ``with_codes`` the ``int4_codes`` triple)."""
    rows = raw.shape[0]
    if cols % 32:
        raise ValueError(f"a {type_name} row of {cols} weights is not whole blocks of 32")
    if type_name == "Q8_0":
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // 32, 34)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
        x = blocks[..., 2:34].view(np.int8).astype(np.float32)
        return (x * d).reshape(rows, cols), None
    if type_name not in ("Q4_0", "Q4_1"):
        raise ValueError(f"no fast dequantization for GGUF type {type_name}; fast types: {', '.join(FAST_DEQUANT)}")
    codes, d, m = _q4_01(raw, type_name, cols)
    q = codes.reshape(rows, cols // 32, 32).astype(np.float32)
    if m is None:
        dense = d[..., None] * (q - np.float32(8))  # gguf: d * (q - 8), q - 8 exact
    else:
        dense = d[..., None] * q + m[..., None]  # gguf: (d * q) + m, two roundings as there
    exact = None
    if with_codes:
        zero = np.zeros_like(d) if m is None else m + np.float32(8) * d
        exact = (torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)),
                 torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)),
                 torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)))
    return dense.reshape(rows, cols), exact
