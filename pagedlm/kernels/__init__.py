"""pagedlm's own CPU kernels (``cpu_kernels.cpp``), built on first use for the machine at hand.

The source is compiled with the system's C++ compiler (``-O3 -march=native``: AVX-512 or AVX2 as
the CPU has) against the installed torch, into a cache directory keyed by the source, the torch
version and the CPU's flags, so a cached library is never loaded on a CPU it was not built for.
Building takes ~20 s once per machine; later processes load the cached library.

``ops()`` returns ``torch.ops.pagedlm`` when the kernels are available and None otherwise (no
compiler, a failed build, not a CPU build of torch, or ``PAGEDLM_KERNELS=0``): callers then use
torch's own kernels, which compute the same products. A build failure is logged once, never raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else sys.platform


def cache_dir() -> Path:
    root = os.environ.get("PAGEDLM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagedlm", "kernels")
    return Path(root)


def library_path() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode(), sys.version.encode()):
        key.update(part)
    return cache_dir() / f"pagedlm_cpu_kernels_{key.hexdigest()[:16]}.so"


def build_command(out: str, march: str | None = "native") -> list[str]:
    """The compiler command building the kernels into ``out``. ``march=None`` leaves the target
    ISA to flags the caller adds (the tests compile the AVX-512 and portable paths this way)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    return [cxx, "-O3", *([f"-march={march}"] if march else []), "-std=c++17", "-shared", "-fPIC", "-fopenmp",
            str(SOURCE), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            *(f"-I{p}" for p in include_paths()),
            *(f"-L{p}" for p in library_paths()), *(f"-Wl,-rpath,{p}" for p in library_paths()),
            "-lc10", "-ltorch_cpu", "-ltorch", "-o", out]


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary file and rename: a concurrent process never loads a half-written one.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = build_command(tmp)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ops():
    """``torch.ops.pagedlm`` with the CPU kernels loaded, or None when they are not available."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        _state["ops"] = None
        if os.environ.get("PAGEDLM_KERNELS", "1") == "0":
            return None
        try:
            path = library_path()
            if not path.exists():
                log.info("building pagedlm's CPU kernels (once per machine) into %s ...", path.parent)
                _build(path)
            torch.ops.load_library(str(path))
            _register_fakes()
            _state["ops"] = torch.ops.pagedlm
        except Exception as e:  # noqa: BLE001 - any failure means: use torch's kernels
            log.warning("pagedlm's CPU kernels are not available (%s); using torch's kernels",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _state["ops"]


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (no data)."""

    @torch.library.register_fake("pagedlm::int8_mm")
    def _(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("pagedlm::int4_mm")
    def _(x, codes, scale, mins, int8_act):
        return x.new_empty((x.shape[0], codes.shape[0]))
