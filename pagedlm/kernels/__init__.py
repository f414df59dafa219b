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

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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
    """``PAGEDLM_KERNEL_CACHE``, else ``kernels/`` under pagedlm's cache root (``pagedlm.cache``)."""
    if os.environ.get("PAGEDLM_KERNEL_CACHE"):
        return Path(os.environ["PAGEDLM_KERNEL_CACHE"])
    from pagedlm import cache

    return cache.cache_root() / "kernels"


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


def ops(wait: bool = True):
    """``torch.ops.pagedlm`` with the CPU kernels loaded, or None when they are not available.

    ``wait=False``: when the library is not built yet, start building it in a background process
    (``build_in_background``) and return None at once; a later call loads it once ``ready()``."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if os.environ.get("PAGEDLM_KERNELS", "1") == "0":
            _state["ops"] = None
            return None
        try:
            path = library_path()
            if not path.exists() and not wait:
                _start_background_build(path)
                return None
        except Exception as e:  # noqa: BLE001 - no cache folder, no compiler: wait=True reports it
            log.debug("cannot build the kernels in the background: %s", e)
        _state["ops"] = None
        try:
            path = library_path()
            if not path.exists():
                from pagedlm import cache

                with cache.locked(path):  # another process building it: wait for its library
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


def ready() -> bool:
    """Whether ``ops()`` would now load the kernels without building them (or has loaded them)."""
    if _state.get("ops") is not None:
        return True
    try:
        return library_path().exists()
    except Exception:  # noqa: BLE001
        return False


def build_state() -> str:
    """"ready", "building" (this process's background build, or another process's, runs) or
    "failed: <why>"."""
    if ready():
        return "ready"
    reason = build_failed()
    if reason is not None:
        return f"failed: {reason}"
    from pagedlm import cache

    builder = _state.get("builder")
    if (builder is not None and builder.poll() is None) or cache.claimed(library_path()):
        return "building"
    if ready():  # it finished between the two looks
        return "ready"
    return "failed: the build process exited without building the library"


def build_failed() -> str | None:
    """Why the background build (``ops(wait=False)``) of this machine's library failed, or None."""
    try:
        marker = Path(str(library_path()) + FAILED_SUFFIX)
        return marker.read_text(errors="replace") if marker.exists() else None
    except OSError:
        return None


FAILED_SUFFIX = ".failed"


def _start_background_build(path: Path) -> None:
    """Build the library in a process of its own (once per process; not when another process
    already builds it). It runs at idle priority and outlives this process if need be."""
    from pagedlm import cache

    if "builder" in _state or cache.claimed(path) or Path(str(path) + FAILED_SUFFIX).exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("building pagedlm's CPU kernels in the background (once per machine); torch's kernels "
             "multiply until then")
    with open(path.parent / "build.log", "ab") as logf:
        _state["builder"] = subprocess.Popen([sys.executable, "-c", cache.IDLE_LAUNCH, "pagedlm.kernels"],
                                             stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=logf, start_new_session=True)


def build_main() -> int:
    """``python -m pagedlm.kernels``: build this machine's library into the cache (at idle
    priority), or write ``<library>.failed`` with the reason."""
    from pagedlm import cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s pagedlm kernels %(process)d: %(message)s")
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    path = library_path()
    fd = cache.claim(path)
    if fd is None:
        return 0  # another process builds it
    try:
        with cache.locked(path):
            if not path.exists():
                t0 = time.perf_counter()
                _build(path)
                log.info("built %s in %.1f s", path.name, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - recorded for the engines waiting on it
        log.error("the kernels did not build: %s", e)
        cache.atomic_write(Path(str(path) + FAILED_SUFFIX), str(e).splitlines()[0].encode() if str(e) else b"failed")
        return 1
    finally:
        os.close(fd)
    return 0


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (no data)."""

    @torch.library.register_fake("pagedlm::int8_mm")
    def _(x, w, scale, int8_act):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("pagedlm::int4_mm")
    def _(x, codes, scale, mins, int8_act, n):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("pagedlm::paged_attention")
    def _(q, kv_cache, block_tables, context_lens, scale, window):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


@contextlib.contextmanager
def row_limit(n: int | None):
    """Within this block, on this thread, pagedlm's kernels compute the first ``n`` rows of their
    inputs only and write zeros to the rest: a compiled decode step runs its bucket's row count,
    and rows past the live ones are padding (compiled.py). Rows are independent, so live rows come
    out bit for bit the same. A no-op when the kernels are not loaded or ``n`` is None."""
    ops = _state.get("ops")
    if ops is None or n is None:
        yield
        return
    old = ops.set_row_limit(n)
    try:
        yield
    finally:
        ops.set_row_limit(old)


def loaded():
    """``torch.ops.pagedlm`` if this process has loaded the kernels already, else None (never
    builds or loads them: callers that may use them, such as attention, follow the weights)."""
    return _state.get("ops")
