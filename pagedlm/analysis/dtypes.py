"""Bytes per element of the dtypes ``pagedlm inspect`` understands."""

from __future__ import annotations

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "float32": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1,
    "int8": 1,
    "int4": 0.5, "fp4": 0.5,
}
# The dtypes shown side by side in the weights table.
WEIGHT_TABLE_DTYPES = ("fp32", "bf16", "fp8", "int4")


def dtype_bytes(name: str) -> float:
    """Bytes per element of ``name`` (``bf16``, ``float16``, ``fp8``, ``int4``, ...)."""
    key = name.lower().replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "float8_e4m3fn": "fp8", "fp4": "int4"}


def canonical(name: str) -> str:
    """The short name of a dtype (``bfloat16`` -> ``bf16``); raises ValueError if unknown."""
    dtype_bytes(name)
    key = name.lower().replace("torch.", "")
    return _ALIASES.get(key, key)
