"""Accelerator specs for the roofline: dense peak FLOP/s at 16-bit, memory bandwidth, memory."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s (no sparsity)
    bandwidth: float  # bytes/s
    memory_bytes: float

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOPs per byte) above which a kernel is compute-bound."""
        return self.peak_flops / self.bandwidth


HARDWARE: dict[str, Hardware] = {
    # Data-sheet figures: H100 SXM5 80GB, A100 SXM4 80GB.
    "h100": Hardware("NVIDIA H100 SXM 80GB", 989e12, 3.35e12, 80 * GB),
    "h200": Hardware("NVIDIA H200 SXM 141GB", 989e12, 4.8e12, 141 * GB),
    "a100": Hardware("NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80 * GB),
    # A nominal server CPU socket (AVX-512 / AMX class); use custom: for your own machine.
    "cpu": Hardware("nominal CPU socket", 1e12, 100e9, 64 * GB),
}


def parse_hardware(spec: str, memory_gb: float | None = None) -> Hardware:
    """``h100`` | ``h200`` | ``a100`` | ``cpu`` | ``custom:FLOPS,BANDWIDTH[,MEMORY_GB]`` (FLOP/s, bytes/s)."""
    spec = spec.strip()
    if spec.lower().startswith("custom:"):
        parts = spec[len("custom:"):].split(",")
        if len(parts) not in (2, 3):
            raise ValueError(f"--hardware {spec!r}: expected custom:FLOPS,BANDWIDTH[,MEMORY_GB], "
                             "e.g. custom:989e12,3.35e12,80")
        try:
            values = [float(x) for x in parts]
        except ValueError as e:
            raise ValueError(f"--hardware {spec!r}: not a number ({e})") from None
        if any(v <= 0 for v in values):
            raise ValueError(f"--hardware {spec!r}: values must be positive")
        hw = Hardware("custom", values[0], values[1], values[2] * GB if len(values) == 3 else 80 * GB)
    elif spec.lower() in HARDWARE:
        hw = HARDWARE[spec.lower()]
    else:
        raise ValueError(f"unknown --hardware {spec!r}; choose {', '.join(HARDWARE)} or "
                         "custom:FLOPS,BANDWIDTH[,MEMORY_GB]")
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ValueError(f"--memory must be positive, got {memory_gb}")
        hw = Hardware(hw.name, hw.peak_flops, hw.bandwidth, memory_gb * GB)
    return hw
