"""Norms, rotary position embedding and activations, written from their equations.

RMSNorm:   y = x / sqrt(mean(x^2) + eps) * (offset + w)       (offset 1 for Gemma, else 0)
LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b
RoPE:      rotate each (x_i, x_{i+d/2}) pair by angle pos * theta^(-2i/d)  ("rotate half" layout);
           scalings: linear, llama3, YaRN (DeepSeek)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm import kernels
from pagedlm.config import RopeScaling


def fused_ops(x: torch.Tensor):
    """pagedlm's one-pass kernels for RMSNorm and rope (``rms_norm``, ``rope_qk``) where they apply:
    eager inference on CPU with the kernels loaded (a prefill chunk; SmolLM2, 2048 tokens: ~130
    ms went to torch's ~16 separate passes a layer). Else None: compiled graphs (inductor fuses
    these itself), training (no backward here), other devices. They compute in float32 and round
    once, as inductor's fused code does. (silu(gate) * up fused gained ~15 ms a chunk: not kept.)"""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return kernels.loaded()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight_offset = weight_offset
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None and x.dtype == self.weight.dtype and x.shape[-1] == self.dim:
            return ops.rms_norm(x.reshape(-1, self.dim), self.weight, self.eps, self.weight_offset).view(x.shape)
        if self.weight_offset:
            # Gemma: normalise and scale by (1 + w) in float32, as its reference does.
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * (self.weight.float() + self.weight_offset)).to(x.dtype)
        # One fused op (accumulates in float32 for reduced-precision inputs).
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(kind: str, dim: int, eps: float, weight_offset: float = 0.0) -> nn.Module:
    if kind == "layer":
        return LayerNorm(dim, eps)
    return RMSNorm(dim, eps, weight_offset)


def act_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN: high frequencies (many rotations over the original context) extrapolated as is, low
    ones interpolated (divided by ``factor``), a linear ramp between the dims where a frequency
    turns ``beta_fast`` and ``beta_slow`` times over ``original_max_position_embeddings``."""
    def dim_of(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """YaRN's magnitude scale of cos and sin (1 for every other rope)."""
    from pagedlm.config import yarn_mscale

    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for a step's positions once; every layer with the same rope reuses them."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (tokens, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` on q (tokens, heads, hd) and k (tokens, kv_heads, hd) together."""
    ops = fused_ops(q)
    if ops is not None and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.dtype == q.dtype == k.dtype:
        return ops.rope_qk(q, k, cos, sin)
    # one pass over both: (tokens, heads + kv_heads, head_dim)
    return apply_rope(torch.cat((q, k), dim=1), cos, sin).split([q.shape[1], k.shape[1]], dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
