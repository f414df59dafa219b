"""Loaded, quantized models cached per machine: a warm process maps the finished model in
~0.1 s instead of re-reading, dequantizing, repacking and measuring it (~10 s for SmolLM2 Q4_1).

An entry (``prepared/<model>-<key>.pt``) is the model object exactly as ``load_model`` left it:
dense weights, packed int4 / int8 weights and their scales, the measured dense crossover,
pickled by ``torch.save`` and loaded with ``torch.load(mmap=True)`` (the tensors are the file's
pages, copied only when written). pagedlm's kernel functions are pickled by name and looked
up again on load.

**Key**: the checkpoint file's identity (path, size, mtime), the config, dtype, device,
quantization, the dense crossover asked for, whether pagedlm's kernels multiply (built, not
built yet, or off), pagedlm's source, torch, Python and the CPU's flags. Nothing else changes
what ``load_model`` computes.

**Who writes it**: the compiled step's builder process (``engine/aot.py``), which loads the
same model at idle priority anyway: the engine never pays the ~2 s write. An entry that does
not load is deleted, with one warning, and the model is loaded from the checkpoint.

It holds a pickle: the cache folder is trusted as the user's own files (as torch's own
inductor cache is).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

KIND = "prepared"


def _kernel_op(name: str):
    """Unpickle one of pagedlm's kernel functions (``torch.ops.pagedlm.<name>``)."""
    from pagedlm import kernels

    ops = kernels.ops()
    if ops is None:
        raise RuntimeError(f"the cached model multiplies with pagedlm's kernel {name!r}, which is not available")
    return getattr(ops, name)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch._ops.OpOverloadPacket) and obj._qualified_op_name.startswith("pagedlm::"):
            return _kernel_op, (obj._qualified_op_name.split("::", 1)[1],)
        return NotImplemented


class _PickleModule:
    """What ``torch.save(pickle_module=...)`` needs: a Pickler that names pagedlm's ops."""

    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    dump = staticmethod(pickle.dump)
    load = staticmethod(pickle.load)


def _kernel_state() -> str:
    """How quantized weights multiply in a model loaded now (part of the key): which kernels, and
    whether they round activations to int8 (module switches a benchmark may flip)."""
    from pagedlm import kernels
    from pagedlm.model.layers import quant
    from pagedlm.model.layers.quant import _BACKGROUND_KERNELS, kernels_coming

    # Also starts the kernels' background build now, at the start of the load, when it is needed.
    if kernels.ops(wait=not _BACKGROUND_KERNELS) is not None:
        return f"kernels int8-act int4:{quant.INT4_INT8_ACTIVATIONS} int8:{quant.INT8_INT8_ACTIVATIONS}"
    return "pending" if _BACKGROUND_KERNELS and kernels_coming() else "torch"


def _weights_identity(weights_path: str) -> list:
    from pagedlm import cache

    if os.path.isdir(weights_path):
        return sorted([f, cache.file_key(os.path.join(weights_path, f))] for f in os.listdir(weights_path)
                      if os.path.isfile(os.path.join(weights_path, f)))
    return [cache.file_key(weights_path)]


def entry(weights_path: str, cfg, dtype: torch.dtype, device, quantization: str, dense_min_rows) -> Path | None:
    """The cache entry for this load, or None where it is not cached (a non-CPU device, no usable
    cache folder, ``PAGEDLM_PREPARED_CACHE=0``). The kernels are part of the key only where the
    load quantizes (int8, int4, or auto on a GGUF file)."""
    if torch.device(device).type != "cpu" or os.environ.get("PAGEDLM_PREPARED_CACHE", "1") == "0":
        return None
    from pagedlm import cache
    from pagedlm.engine.aot import config_key, cpu_flags, source_digest

    quantizes = quantization in ("int8", "int4") or (quantization == "auto" and weights_path.endswith(".gguf"))
    try:
        k = cache.key(_weights_identity(weights_path), config_key(cfg), str(dtype), str(device), quantization,
                      dense_min_rows, _kernel_state() if quantizes else None, source_digest(), torch.__version__, sys.version, cpu_flags())
        return cache.cache_dir(KIND) / cache.entry_name(Path(weights_path).name, k + ".pt")
    except OSError as e:
        log.debug("no prepared-model cache: %s", e)
        return None


def load(path: Path | None) -> nn.Module | None:
    """The cached model at ``path``, or None (absent; or unloadable: deleted with one warning)."""
    if path is None or not path.exists():
        return None
    try:
        model = torch.load(path, mmap=True, weights_only=False)
        if not isinstance(model, nn.Module):
            raise TypeError(f"it holds a {type(model).__name__}, not a model")
    except Exception as e:  # noqa: BLE001 - a bad entry is rebuilt, never trusted
        log.warning("the cached model %s does not load (%s: %s); loading the checkpoint instead", path.name,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        try:
            path.unlink()
        except OSError:
            pass
        return None
    log.info("model loaded from the cache (%s)", path.name)
    model.prepared_from = path.name
    return model


def save(model: nn.Module, path: Path | None) -> None:
    """Write the freshly loaded ``model`` as the entry ``path`` (whole or not at all; a failure
    logs one warning)."""
    if path is None:
        return
    from pagedlm import cache

    try:
        with cache.locked(path):
            if path.exists():
                return
            with cache.atomic_path(path) as tmp:
                torch.save(model, tmp, pickle_module=_PickleModule)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation
        log.warning("could not cache the loaded model as %s (%s: %s)", path, type(e).__name__, e)
