"""Decode steps compiled ahead of time: one AOTInductor package per batch bucket, built in a
background process and kept in the cache, so that no request waits for a compiler and a machine
compiles each step once.

**What a package is.** The decode step as a pure function of its inputs,
``(ids, pos, slots, tables, lens, weights, caches) -> logits``, exported with ``torch.export``
and compiled by AOTInductor into a shared library (``torch._inductor.aoti_compile_and_package``).
Weights and KV caches are *inputs*, never constants baked into the library: a package is a few
MB, serves any KV pool size (the caches' block dimension is dynamic, as is the block-table
width), and the caches are written in place. Loading one (``aoti_load_package``) takes
milliseconds: no Dynamo, no AOTAutograd, no tracing.

**Its key** (``StepSpec.key``) is everything that changes the compiled code and nothing measured
at run time: pagedlm's source, torch's version, the CPU's flags, Python's version, the model's
normalised config, dtype, block size, bucket, device, whether pagedlm's kernels are built, and
every tensor the step reads (name, shape, dtype) with the non-tensor settings of each quantized
weight (which kernel, whether this bucket takes the dense GEMM). Two processes with the same
key load the same package; a change to any of these builds a new one.

**Who builds it.** The builder runs in a child process of its own session, under ``SCHED_IDLE``
with one thread (the engine's steps use one thread fewer meanwhile), so the engine's steps keep
the cores: it loads the model as the engine did, builds the buckets it is asked for in order,
checks each package by loading it and running it once in its own process (a library that crashes
on load takes down the builder, not the engine), and only then publishes it into the cache under
the entry's lock. The engine looks for finished entries between steps and swaps a bucket in at a
step boundary (``engine/compiled.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagedlm.model.layers.attention import PagedDecodeMetadata

log = logging.getLogger(__name__)

KIND = "compiled"  # the cache folder (pagedlm/cache.py)
MAX_DIM = 1 << 20  # upper bound of the dynamic block and width dimensions


# ---- what a step reads ------------------------------------------------------------------------

def _owned_objects(value, depth: int = 0):
    """Plain objects (dataclass instances, method objects) a module holds, recursively: they may
    hold tensors the forward reads (a quantized layer's packed weight and scales)."""
    if depth > 3 or isinstance(value, (nn.Module, torch.Tensor, str, bytes, int, float, bool, type(None))):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _owned_objects(v, depth + 1)
        return
    if hasattr(value, "__dict__") and not callable(value) or dataclasses.is_dataclass(value):
        yield value
        for v in vars(value).values():
            yield from _owned_objects(v, depth + 1)


def step_tensors(model: nn.Module) -> tuple[list[str], list[torch.Tensor], list[list[tuple[object, str]]]]:
    """Every tensor the model holds, in a fixed order: (names, tensors, the places holding each:
    ``(owner, attribute)``). Parameters and buffers, and tensors of plain objects its modules own.
    A tensor held in several places (tied embeddings) appears once."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    places: list[list[tuple[object, str]]] = []
    index: dict[int, int] = {}

    def add(name: str, owner: object, attr: str, t: torch.Tensor) -> None:
        i = index.get(id(t))
        if i is None:
            index[id(t)] = len(tensors)
            names.append(name)
            tensors.append(t)
            places.append([(owner, attr)])
        else:
            places[i].append((owner, attr))

    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is not None:
                add(f"{mname}.{pname}", mod, pname, p)
        for aname, value in vars(mod).items():
            if aname.startswith("_") or aname == "kv_cache":
                continue
            for obj in _owned_objects(value):
                for k, v in vars(obj).items():
                    if isinstance(v, torch.Tensor):
                        add(f"{mname}.{aname}.{type(obj).__name__}.{k}", obj, k, v)
    return names, tensors, places


def quantized_weights(model: nn.Module) -> list:
    """Every quantized weight the modules hold (a linear's ``quant_method.qweight``, a tied head's
    ``head_method.qweight``, ...): the owned objects with a kind and a dense crossover."""
    out, seen = [], set()
    for mod in model.modules():
        for aname, value in vars(mod).items():
            if aname.startswith("_") or aname == "kv_cache":
                continue
            for obj in _owned_objects(value):
                if hasattr(obj, "dense_min_rows") and hasattr(obj, "kind") and id(obj) not in seen:
                    seen.add(id(obj))
                    out.append(obj)
    return out


def _settings(model: nn.Module, bucket: int) -> list:
    """The non-tensor values of the objects the modules own that choose the step's code (a
    quantized weight's kind, kernel, GEMV path); a measured crossover enters only as whether this
    bucket is past it."""
    out = []
    for mname, mod in model.named_modules():
        for aname, value in vars(mod).items():
            if aname.startswith("_") or aname == "kv_cache":
                continue
            for obj in _owned_objects(value):
                for k, v in sorted(vars(obj).items()):
                    if k == "dense_min_rows":
                        out.append((mname, k, bucket >= v))
                    elif isinstance(v, (bool, int, float, str)) or v is None:
                        out.append((mname, k, v))
                    elif callable(v) and not isinstance(v, torch.Tensor):
                        out.append((mname, k, getattr(v, "__name__", type(v).__name__)))
    return out


# Batch buckets that share one package with a dynamic batch dimension, where every setting of the
# step agrees across them (a measured crossover inside a group splits it). The small, hot buckets
# keep packages of their own. A group meets the product-path switch of layers/matmul.py
# (SMALL_BATCH_ROWS, 2..127 rows) at neither side. Measured (docs/benchmarks.md, sixth session):
# one package for 16-64 compiles in about half the time of three and steps as fast (bit for bit
# in float32; bfloat16 may round a fused reduction differently once the batch is symbolic).
DYNAMIC_GROUPS = ((16, 32, 64), (128, 256, 512))


def package_rows(model: nn.Module, bucket: int, dynamic: bool = True) -> tuple[int, int]:
    """The batch sizes ``(lo, hi)`` the package running ``bucket`` serves: the run of buckets of
    its group around it with its settings, or ``(bucket, bucket)`` for a bucket of its own."""
    group = next((g for g in DYNAMIC_GROUPS if bucket in g), None) if dynamic else None
    if group is None:
        return bucket, bucket
    mine = _settings(model, bucket)
    lo = hi = group.index(bucket)
    while lo > 0 and _settings(model, group[lo - 1]) == mine:
        lo -= 1
    while hi < len(group) - 1 and _settings(model, group[hi + 1]) == mine:
        hi += 1
    return group[lo], group[hi]


_SOURCE_DIGEST: str | None = None


# Packages no traced step or loaded model is made of: changing them keeps the caches.
_UNTRACED = ("server", "train")


def source_digest() -> str:
    """A hash of pagedlm's Python and C++ source (what the traced step is made of), less the HTTP
    server and the training code."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.relative_to(root).parts[0] in _UNTRACED:
                continue
            if p.suffix in (".py", ".cpp") and p.is_file():
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()[:16]
    return _SOURCE_DIGEST


def cpu_flags() -> str:
    from pagedlm import kernels

    return kernels._cpu_flags()


@dataclass(frozen=True)
class StepSpec:
    """What a bucket's package is built for (sent to the builder; ``key`` names the entry)."""

    model_path: str
    model_key: list  # ModelConfig as plain values
    dtype: str  # torch dtype name the engine asked for (weights and compute dtypes follow from it)
    cache_dtype: str  # the KV cache's (compute) dtype name
    quantization: str
    dense_min_rows: dict[str, int] | int | None  # the engine's measured crossover per weight kind
    device: str
    block_size: int
    kernels: bool = True  # pagedlm's CPU kernels were available to the engine (the builder matches it)
    crossover_measured: bool = True  # the engine measured dense_min_rows (was not given it)

    def key(self, model: nn.Module, rows: tuple[int, int]) -> str:
        from pagedlm import cache

        names, tensors, _ = step_tensors(model)
        return cache.key(
            "decode-step-v2", source_digest(), torch.__version__, cpu_flags(), sys.version, self.model_key,
            self.dtype, self.cache_dtype, self.block_size, list(rows), self.device, self.kernels,
            [(n, list(t.shape), str(t.dtype)) for n, t in zip(names, tensors)], _settings(model, rows[0]))

    def path(self, model: nn.Module, bucket: int, dynamic: bool = True) -> Path:
        """The cache entry of the package running ``bucket`` (shared by the buckets of a dynamic
        group, ``decode_b16-64-...``; ``dynamic=False``: the bucket's own)."""
        from pagedlm import cache

        lo, hi = package_rows(model, bucket, dynamic)
        name = f"decode_b{lo}" if lo == hi else f"decode_b{lo}-{hi}"
        return cache.cache_dir(KIND) / (cache.entry_name(name, self.key(model, (lo, hi))) + ".pt2")

    def rows_of(self, model: nn.Module, bucket: int, entry: Path) -> tuple[int, int]:
        """The batch sizes of the package at ``entry`` (the engine's choice for ``bucket``:
        shared, or the bucket's own after a shared one failed to build)."""
        for dynamic in (True, False):
            if self.path(model, bucket, dynamic) == entry:
                return package_rows(model, bucket, dynamic)
        raise RuntimeError(f"the builder's model keys differently (not {entry.name})")


def config_key(cfg) -> list:
    """A ModelConfig as plain values (its dataclass fields, recursively)."""
    from pagedlm.cache import _canon

    return _canon(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg))


# ---- the step as a function of its inputs -------------------------------------------------

def _set(owner: object, attr: str, value: torch.Tensor) -> None:
    """Point one place at ``value``: a module's parameter or buffer slot (no Parameter check),
    or a plain object's attribute."""
    if isinstance(owner, nn.Module) and attr in owner._parameters:
        owner._parameters[attr] = value
    elif isinstance(owner, nn.Module) and attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        object.__setattr__(owner, attr, value)


class StepFunction(nn.Module):
    """The decode step with every tensor it reads as an argument. It owns no parameters (the
    model is held outside the module tree), so export lifts nothing into constants: while it
    runs, each weight slot and each layer's cache is pointed at the argument, then restored."""

    def __init__(self, model: nn.Module, block_size: int):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.block_size = block_size
        self.names, self.tensors, self.places = step_tensors(model)
        self.attn = list(model.attention_layers())

    @contextlib.contextmanager
    def _bound(self, weights, caches):
        saved = [(owner, attr, getattr(owner, attr)) for places in self.places for owner, attr in places]
        saved_caches = [a.kv_cache for a in self.attn]
        try:
            for places, w in zip(self.places, weights):
                for owner, attr in places:
                    _set(owner, attr, w)
            for a, c in zip(self.attn, caches):
                a.kv_cache = c
            yield
        finally:
            for owner, attr, value in saved:
                _set(owner, attr, value)
            for a, c in zip(self.attn, saved_caches):
                a.kv_cache = c

    def forward(self, ids, pos, slots, tables, lens, weights: list[torch.Tensor], caches: list[torch.Tensor]):
        with self._bound(weights, caches):
            meta = PagedDecodeMetadata(slots, tables, lens, self.block_size)
            hidden = self.model(ids, pos, meta)
            return self.model.compute_logits(hidden).float()


def _example_inputs(bucket: int, caches: list[torch.Tensor], device) -> tuple:
    scratch = caches[0].shape[1] - 1
    bs = caches[0].shape[2]
    z = lambda: torch.zeros(bucket, dtype=torch.long, device=device)  # noqa: E731
    ids, pos = z(), z()
    slots = torch.full((bucket,), scratch * bs, dtype=torch.long, device=device)
    lens = torch.ones(bucket, dtype=torch.long, device=device)
    tables = torch.full((bucket, 2), scratch, dtype=torch.long, device=device)
    return ids, pos, slots, tables, lens


def build_package(model: nn.Module, rows: tuple[int, int], block_size: int, caches: list[torch.Tensor],
                  target: Path) -> None:
    """Export and compile the step for batches of ``rows[0]`` to ``rows[1]`` rows (one size: a
    static batch dimension) into the file ``target``."""
    lo, hi = rows
    step = StepFunction(model, block_size)
    args = _example_inputs(hi, caches, caches[0].device)
    width = torch.export.Dim("width", min=2, max=MAX_DIM)
    blocks = torch.export.Dim("blocks", min=2, max=MAX_DIM)
    b = None if lo == hi else {0: torch.export.Dim("batch", min=lo, max=hi)}
    tables = {1: width} if b is None else {0: b[0], 1: width}
    shapes = (b, b, b, tables, b, [None] * len(step.tensors), [{1: blocks}] * len(caches))
    with torch.no_grad():
        ep = torch.export.export(step, (*args, list(step.tensors), list(caches)), dynamic_shapes=shapes, strict=False)
    baked = sum(t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))
    if baked > 1 << 20:
        raise RuntimeError(f"the exported step bakes {baked} bytes of tensors into the package (weights must be inputs)")
    torch._inductor.aoti_compile_and_package(
        ep, package_path=str(target),
        # Round to bf16 where eager rounds (as the in-process graphs do).
        inductor_configs={"emulate_precision_casts": True})


class PackagedStep:
    """A loaded package, called with a flat argument list built once: every input but the block
    table is the same tensor at every step (weights, caches, the bucket's persistent buffers)."""

    def __init__(self, path: Path, weights: list[torch.Tensor], caches: list[torch.Tensor], buffers,
                 loader=None) -> None:
        self.path = path
        # The C++ loader itself: ``torch._inductor.aoti_load_package`` would first import
        # inductor and Dynamo (~2 s of a warm start), which running a package never needs. The
        # buckets of a dynamic group share one (``loader``).
        self.loader = loader or torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.args = [buffers.ids, buffers.pos, buffers.slots, None, buffers.lens, *weights, *caches]

    def __call__(self, tables: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[3] = tables
        return self.loader.boxed_run(args)[0]


# ---- the builder process ------------------------------------------------------------------

def _load_model(spec: StepSpec):
    from pagedlm.config import ModelConfig
    from pagedlm.model.registry import load_model

    cfg = ModelConfig.from_pretrained(spec.model_path)
    dtype = getattr(torch, spec.dtype)
    return load_model(spec.model_path, cfg, dtype, spec.device, spec.quantization, spec.dense_min_rows, None,
                      save_prepared=True,
                      prepared_rows=None if spec.crossover_measured else spec.dense_min_rows)


def _load_for_building(spec: StepSpec):
    """(model, KV caches) for building packages: small caches, since the block dimension is
    dynamic and a package serves any pool size."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    model = _load_model(spec)
    caches = [torch.zeros(a.kv_cache_shape(4, spec.block_size), dtype=getattr(torch, spec.cache_dtype),
                          device=spec.device) for a in model.attention_layers()]
    return model, caches


def _publish(model: nn.Module, rows: tuple[int, int], block_size: int, caches: list[torch.Tensor],
             path: Path) -> None:
    """Build, smoke-test and publish one package at ``path`` (under its lock, unless another
    process published it meanwhile): whole and checked, or not at all."""
    from pagedlm import cache

    with cache.locked(path):
        if not path.exists():
            tmp = path.with_name(f"{cache.TMP_PREFIX}{os.getpid()}-{path.name}")
            try:
                build_package(model, rows, block_size, caches, tmp)
                for n in sorted(set(rows)):
                    _smoke_test(tmp, model, n, caches)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()


FAILED_SUFFIX = ".failed"  # beside an entry: why the builder could not make it (read once, then removed)


def builder_main(spec: StepSpec, buckets: list[int], expected: dict[int, str], threads: int = 1,
                 after_kernels: bool = False) -> int:
    """Build each bucket's package into the cache (skipping those already there). A bucket that
    cannot be built leaves ``<entry>.failed`` with the reason, for the engine to read.

    ``after_kernels``: started by an engine whose weights wait for pagedlm's kernels (a machine's
    first process, which may well exit before they are built): wait for the kernels, load the
    model with them, and build each bucket under the key the model then has (``expected`` is not
    known to that engine), for the processes that come after."""
    from pagedlm import cache

    if after_kernels:
        return _build_after_kernels(spec, buckets, threads)
    # One entry per package (the buckets of a dynamic group share one), claimed before the (slow)
    # model load: an entry another builder already makes is left to it (engines started one after
    # another then share one builder per entry).
    entries: dict[str, int] = {}
    for b in sorted(buckets):
        entries.setdefault(expected[b], b)
    claims = {b: cache.claim(path) for path, b in entries.items()}
    for b in [b for b, fd in claims.items() if fd is None]:
        log.info("bucket %d: another builder is making it", b)
    buckets = [b for b, fd in claims.items() if fd is not None]
    if not buckets:
        return 0
    _idle_priority(threads)
    if not spec.kernels:  # the engine multiplies with torch's kernels: so must the graph built for it
        os.environ["PAGEDLM_KERNELS"] = "0"
    try:
        model, caches = _load_for_building(spec)
    except BaseException as e:  # noqa: BLE001 - report, then exit
        for b in buckets:
            _fail(Path(expected[b]), f"the builder could not load the model: {type(e).__name__}: {e}")
        return 1
    for bucket in buckets:
        target = Path(expected[bucket])
        t0 = time.perf_counter()
        try:
            rows = spec.rows_of(model, bucket, target)
            _publish(model, rows, spec.block_size, caches, target)
            log.info("bucket %d: %s in %.1f s", bucket, target.name, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - this bucket stays eager
            log.error("bucket %d failed:\n%s", bucket, traceback.format_exc())
            _fail(target, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return 0


def _idle_priority(threads: int) -> None:
    # SCHED_IDLE: the builder (and the C++ compilers it starts, which inherit it) runs only on
    # CPU time the engine leaves idle. A plain nice value is not enough: the engine's OpenMP
    # threads wait for each other at every parallel region, and a builder holding one of two
    # cores for a time slice stalls each region (measured: eager decode 37 -> 0.9 tok/s).
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)
    torch.set_num_threads(threads)


def _build_after_kernels(spec: StepSpec, buckets: list[int], threads: int, wait_s: float = 900.0) -> int:
    from pagedlm import cache, kernels

    _idle_priority(threads)
    t_end = time.monotonic() + wait_s
    while not kernels.ready():
        if kernels.build_failed() is not None or time.monotonic() > t_end:
            log.info("pagedlm's kernels were not built (%s): nothing to build after them",
                     kernels.build_failed() or "timed out")
            return 0
        time.sleep(1.0)
    try:
        model, caches = _load_for_building(spec)
    except BaseException:  # noqa: BLE001 - nobody waits on this builder: the engines build later
        log.error("the builder could not load the model:\n%s", traceback.format_exc())
        return 1
    for bucket in buckets:
        path = spec.path(model, bucket)
        fd = None if path.exists() else cache.claim(path)
        if fd is None:
            log.info("bucket %d: built already, or another builder is making it", bucket)
            continue
        t0 = time.perf_counter()
        try:
            _publish(model, package_rows(model, bucket), spec.block_size, caches, path)
            log.info("bucket %d: %s in %.1f s (after the kernels)", bucket, path.name, time.perf_counter() - t0)
        except BaseException:  # noqa: BLE001 - an engine that wants it builds it (and reports) itself
            log.error("bucket %d failed:\n%s", bucket, traceback.format_exc())
    return 0


def _fail(entry: Path, reason: str) -> None:
    from pagedlm import cache

    with contextlib.suppress(OSError):
        cache.atomic_write(Path(str(entry) + FAILED_SUFFIX), reason.encode())


def builder_command(spec: StepSpec, buckets: list[int], expected: dict[int, str],
                    after_kernels: bool = False) -> list[str]:
    """The command line of a builder process for these buckets."""
    import json

    payload = json.dumps({"spec": dataclasses.asdict(spec), "buckets": buckets,
                          "expected": {str(b): p for b, p in expected.items()}, "after_kernels": after_kernels})
    from pagedlm.cache import IDLE_LAUNCH

    return [sys.executable, "-c", IDLE_LAUNCH, "pagedlm.engine.aot", payload]



def main(argv: list[str] | None = None) -> int:
    import json

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pagedlm builder %(process)d: %(message)s")
    payload = json.loads(args[0])
    spec = StepSpec(**payload["spec"])
    expected = {int(b): p for b, p in payload["expected"].items()}
    return builder_main(spec, payload["buckets"], expected, after_kernels=payload.get("after_kernels", False))


def _smoke_test(path: Path, model: nn.Module, bucket: int, caches: list[torch.Tensor]) -> None:
    """Load the new package and run it once on padding rows in this (the builder's) process: a
    library that fails or crashes here is never published."""
    class _Buf:
        pass

    buf = _Buf()
    buf.ids, buf.pos, buf.slots, tables, buf.lens = _example_inputs(bucket, caches, caches[0].device)
    _, tensors, _ = step_tensors(model)
    out = PackagedStep(path, tensors, caches, buf)(tables)
    if out.shape[0] != bucket or not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"the package's smoke test computed {'non-finite' if out.shape[0] == bucket else 'misshaped'} logits")


if __name__ == "__main__":
    sys.exit(main())
