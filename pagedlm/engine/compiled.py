"""The compiled decode step: no Python per layer in the hot loop of token generation.

A decode step is the same graph every time except for its sizes, so it is compiled once per
**batch bucket** (1, 2, 4, 8, ... up to ``max_num_seqs``, like CUDA-graph capture sizes) with
``torch.compile`` (inductor: C++ on CPU, Triton on CUDA), and the batch is padded up to its
bucket. Per bucket, the inputs live in persistent buffers filled in place each step: token ids,
positions, slot mapping, context lengths and the block table. The block table's width (blocks
of the longest context in the batch) is the one dynamic size: it is marked dynamic, so a growing
context does not recompile. Attention is ``PagedAttentionBackend``: it reads K/V where they lie
in the cache, through the block table, inside the compiled reductions.

Padding rows decode token 0 at position 0 into a scratch block (one block past those the block
manager owns) and their logits are dropped. The graph ends with the LM head: it returns float32
logits for every row of the bucket.

**Where a bucket's graph comes from.** On CPU (the default, ``compile_mode="background"``), from
an AOTInductor package in the cache (``engine/aot.py``): at start-up every bucket already in the
cache is loaded (milliseconds, no tracing); a bucket that is not runs eagerly while a builder
process, at lower priority, makes its package, and the engine swaps it in at a step boundary
(``poll``, between steps). No request waits for a compiler, and a machine builds each step once.
With ``compile_mode="inline"`` (and on CUDA, and for LoRA graphs) a bucket compiles in this
process with ``torch.compile`` the first time a batch of its size decodes (one log line with the
time it took). If compilation or a compiled call fails, the step runs eagerly, one warning is
logged, and the engine stays eager from then on: a compile problem never fails a request.

**Trust, per bucket.** A compiled bucket is trusted only once it agrees with the eager step on
this machine: the first time a bucket runs real rows in this process, the same inputs also run
eagerly (the torch attention backend, no compiler) and the two are compared (``SelfCheck``: every
row finite, logits within tolerance, each compiled greedy token the eager one or an exact-enough
tie). A bucket that disagrees runs eagerly from then on, with one warning naming the bucket and
the difference, and that step returns the eager logits. Every later compiled step checks its
rows' logits are finite (one sum); a non-finite step sends its bucket back to eager and the whole
step is recomputed eagerly, so no row of it keeps the bad values (the eager run rewrites the same
K/V slots). Other buckets keep their graphs.

**LoRA.** A step with a LoRA adapter in it runs a second graph of its bucket, the LoRA graph,
so the base graph stays exactly what steps without adapters need. The LoRA layers trace in graph
mode (``layers/lora.py``): every slot of every wrapped layer takes part, and each row's adapter
slot comes in as a one-hot ``(bucket, max_loras)`` in the bucket's persistent buffers (padding
and base rows all zero: no delta). Adapters are written into their slots in place, so the graph
serves whichever adapters hold the slots. A LoRA graph is traced over the layers wrapped at the
time; when a new adapter wraps more layers, that bucket's LoRA graph is traced again. If a LoRA
graph fails, steps with adapters run eagerly from then on (one warning); base steps keep theirs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import subprocess
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedlm import kernels
from pagedlm.engine.scheduler import SchedulerOutput
from pagedlm.model.layers.attention import AttentionMetadata, PagedDecodeMetadata

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in BUCKETS if b < max_num_seqs]
    return sizes + [next((b for b in BUCKETS if b >= max_num_seqs), max_num_seqs)]


@dataclass(frozen=True)
class SelfCheck:
    """How close a compiled step must come to the eager step on the same inputs to be trusted.

    ``rtol``: the largest logit difference allowed, relative to the row's largest eager logit
    (at least 1). ``tie``: how far below the eager maximum the compiled greedy token's eager logit
    may be (a near-tie that rounding may order either way). Measured on this project's models:
    float32 differences are ~1e-5 of the logit scale; bf16 ones up to ~2e-2 (activations rounded
    to bf16 in a different order), while a broken kernel gives NaN or differences of order 1."""

    rtol: float
    tie: float

    @staticmethod
    def for_dtype(dtype: torch.dtype) -> SelfCheck:
        if dtype == torch.float32:
            return SelfCheck(rtol=1e-3, tie=1e-3)
        return SelfCheck(rtol=0.1, tie=0.15)

    def compare(self, compiled: torch.Tensor, eager: torch.Tensor) -> str | None:
        """None when ``compiled`` (rows x vocab, float32) agrees with ``eager``, else what differs."""
        finite = torch.isfinite(compiled).all(dim=-1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            return f"non-finite logits in rows {bad[:8]}{' ...' if len(bad) > 8 else ''}"
        if not bool(torch.isfinite(eager).all()):
            return None  # the eager step itself is not finite here: nothing to hold the graph to
        scale = eager.abs().amax(dim=-1).clamp_min(1.0)
        diff = ((compiled - eager).abs().amax(dim=-1) / scale)
        worst = int(diff.argmax())
        if float(diff[worst]) > self.rtol:
            return f"logits differ by {float(diff[worst]):.3g} of their scale in row {worst} (allowed {self.rtol})"
        pick = compiled.argmax(dim=-1)
        gap = (eager.amax(dim=-1) - eager.gather(1, pick[:, None])[:, 0]) / scale
        worst = int(gap.argmax())
        if float(gap[worst]) > self.tie:
            return (f"greedy token of row {worst} differs: compiled {int(pick[worst])}, eager "
                    f"{int(eager[worst].argmax())} ({float(gap[worst]):.3g} of the logit scale apart)")
        return None


@dataclass
class DecodeBatch:
    """What the compiled step needs from ``prepare`` in ``execute``."""

    sched: SchedulerOutput
    bucket: int
    width: int  # block-table width of this step
    rows: torch.Tensor | None  # rows whose logits are returned (None: all real rows)
    num_rows: int
    lora: bool = False  # the bucket's LoRA graph runs it (an adapter is in the step)


class _Buffers:
    def __init__(self, bucket: int, max_width: int, device: torch.device, lora=None):
        z = lambda n: torch.zeros(n, dtype=torch.long, device=device)  # noqa: E731
        self.ids, self.pos, self.slots, self.lens = z(bucket), z(bucket), z(bucket), z(bucket)
        self.tables = z(bucket * max_width)  # viewed as (bucket, width) contiguous each step
        # The LoRA graph's input: 1.0 at (row, its adapter's slot); base and padding rows all zero.
        self.onehot = None if lora is None else torch.zeros(bucket, lora.max_loras, dtype=lora.dtype, device=device)


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_num_seqs: int, lora=None,
                 dtype: torch.dtype = torch.float32, aot=None, max_model_len: int | None = None):
        self.model = model
        # Background mode: the StepSpec its packages are built for (engine/aot.py); None: inline.
        self.aot = aot
        self.packages: dict[int, object] = {}  # bucket -> loaded PackagedStep
        self.pending: dict[int, Path] = {}  # bucket -> the cache entry a builder is making
        self.queued: list[int] = []  # buckets wanted once the running builder exits
        self.aot_failed: dict[int, str] = {}  # bucket -> why it has no package (it runs eagerly)
        # pagedlm's kernels are still building (ModelRunner._poll_kernels): nothing is built yet.
        self.kernels_pending = False
        self._after_kernels_started = False
        self.builder: subprocess.Popen | None = None
        self.after_builder: subprocess.Popen | None = None  # waits for the kernels, then builds
        self._next_poll = 0.0
        self._entries: dict[int, Path] = {}  # bucket -> its cache entry (StepSpec.path), per KV layout
        self._loaders: dict[Path, object] = {}  # entry -> its loaded library (shared by a dynamic group)
        self.static_buckets: set[int] = set()  # their dynamic group's package failed: one each
        self.max_model_len = max_model_len or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.device = device
        self.sizes = bucket_sizes(max_num_seqs)
        self.buffers: dict[int, _Buffers] = {}
        self.compiled_buckets: set[int] = set()
        self.failed = False
        # (bucket, LoRA graph?) -> why that graph runs eagerly now (it disagreed with the eager
        # step, or computed non-finite logits); ``checked``: graphs trusted on real rows.
        self.eager_graphs: dict[tuple[int, bool], str] = {}
        self.checked: set[tuple[int, bool]] = set()
        self.check = SelfCheck.for_dtype(dtype)  # the lower precision of the weights and activations
        self.lora = lora  # LoRAManager (pagedlm/lora.py) when LoRA is enabled
        self.lora_buckets: set[int] = set()  # buckets whose LoRA graph has run
        self.lora_failed = False  # a LoRA graph failed: steps with adapters run eagerly
        self.lora_layers: dict[int, int] = {}  # bucket -> LoRA layers its LoRA graph was traced over
        self.scratch_block = 0
        self.block_size = 16
        self.max_width = 2
        # (bucket, LoRA graph?) -> the compiled function / (compiled graph, its arguments, ...)
        self.fns: dict[tuple[int, bool], object] = {}
        self.direct: dict[tuple[int, bool], tuple] = {}
        # bucket -> moving average of the wall time of its compiled step (not the compiling call):
        # what a row costs on this machine, for speculative decoding's AdaptivePolicy.
        self.step_seconds: dict[int, float] = {}
        self.governor = None  # the runner's ThreadGovernor (engine/threads.py), fed each step's time
        self.num_steps = 0  # timed (not compiling) calls so far, and the time of the latest
        self.last_step_seconds = 0.0

    def add_sizes(self, extra: list[int]) -> None:
        """More buckets below the largest (speculative decoding's verification rows: 3 rows need
        not pay for 4)."""
        self.sizes = sorted(set(self.sizes) | {b for b in extra if 0 < b < self.sizes[-1]})

    def _compiled(self, key: tuple[int, bool]):
        """One compiled function per bucket (and one more per bucket for steps with LoRA
        adapters): its inputs' sizes are fixed but for the table width, which is symbolic. Dynamo
        (and its guards, ~1.5 ms a call over every parameter) runs only until ``_capture`` has
        recorded the graph; later steps call it directly."""
        fn = self.fns.get(key)
        if fn is None:
            bucket, lora = key
            name = f"decode_bucket_{bucket}"
            if lora:  # traced over the LoRA layers there are now (a new code object when they change)
                self.lora_layers[bucket] = len(self.lora.layers)
                name += f"_lora_{len(self.lora.layers)}"
            # Dynamo caches graphs per code object: each graph gets its own copy of _forward's
            # code, so that each one's cache holds exactly its own graph.
            f = type(self)._forward
            code = f.__code__.replace(co_name=name)
            forward = types.MethodType(types.FunctionType(code, f.__globals__, code.co_name), self)
            options = {
                # A C++ wrapper saves ~0.7 ms of Python per call: worth its longer compile only
                # where a step is a few ms (small batches).
                "cpp_wrapper": bucket <= 8 and self.device.type == "cpu",
                # Round to bf16 where eager rounds, so compiled and eager steps agree token for
                # token in bf16 too.
                "emulate_precision_casts": True,
            }

            def backend(gm: torch.fx.GraphModule, example_inputs):
                from torch._inductor.compile_fx import compile_fx

                compiled = compile_fx(gm, example_inputs, config_patches=options)
                try:
                    self._capture(key, gm, compiled)
                except Exception as e:  # Dynamo's internals moved: keep its (slower) call path
                    log.debug("%s: no direct call (%s)", name, e)
                return compiled

            fn = self.fns[key] = torch.compile(forward, backend=backend, fullgraph=True, dynamic=False)
        return fn

    def _capture(self, key: tuple[int, bool], gm: torch.fx.GraphModule, compiled) -> None:
        """Record how to call a bucket's compiled graph directly. Dynamo's prologue fetches every
        parameter through the module tree on each call (~0.4 ms for SmolLM2's ~300 tensors); here
        every graph input but the block table and its width is the same object at every step
        (parameters, the KV caches, the bucket's persistent buffers), so the argument list is
        built once (a LoRA graph's too: the LoRA weights are written in place, and its one-hot is
        the bucket's buffer). Any input of another kind leaves the bucket on Dynamo's path."""
        args, table_at, width_at = [], None, None
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            arg = node.meta.get("grapharg")
            if arg is None:
                return
            name = arg.source.name if isinstance(arg.source.name, str) else arg.source.name()
            value = arg.example
            if isinstance(value, torch.Tensor) and name == "L['tables']":
                table_at = i
            elif not isinstance(value, torch.Tensor):
                if "L['tables']" in name and "size()[1]" in name.replace(" ", ""):
                    width_at = i
                else:
                    return
            args.append(value)
        if table_at is None:
            return
        self.direct[key] = (compiled, args, table_at, width_at)

    def _buffers(self, bucket: int) -> _Buffers:
        buf = self.buffers.get(bucket)
        if buf is None:
            buf = self.buffers[bucket] = _Buffers(bucket, self.max_width, self.device, self.lora)
        return buf

    def set_cache(self, num_blocks: int, block_size: int, caches: list[torch.Tensor] | None = None) -> None:
        """The engine's blocks are [0, num_blocks); block ``num_blocks`` is the scratch block."""
        self.caches = caches or []
        if self.aot is not None:
            self.aot = dataclasses.replace(self.aot, block_size=block_size)
        self.scratch_block = num_blocks
        self.block_size = block_size
        # A row's table is at most a full-length sequence's (+ speculative tokens) wide, however
        # large the pool: the 512 bucket's buffer stays small with a large KV cache.
        width = num_blocks
        if self.max_model_len:
            width = min(width, -(-(self.max_model_len + 16) // block_size))
        self.max_width = max(2, width)
        # Compiled graphs hold the caches and buffers they were compiled with: start over.
        self.buffers.clear()
        self.fns.clear()
        self.direct.clear()
        self.compiled_buckets.clear()
        self.lora_buckets.clear()
        self.lora_layers.clear()
        self.step_seconds.clear()
        self.eager_graphs.clear()
        self.checked.clear()
        self.packages.clear()
        self._entries.clear()  # keyed by the block size set here
        if self.aot is not None:
            self._load_cached()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        meta = PagedDecodeMetadata(slots, tables, lens, self.block_size)
        hidden = self.model(ids, pos, meta)
        # hidden is returned too so that it is computed once into memory: otherwise inductor may
        # inline the final norm into the head's GEMV and recompute it for every vocabulary row.
        return self.model.compute_logits(hidden).float(), hidden

    # ---- per step ----------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, token_slots: list[int] | None = None):
        """StepInputs for a decode-only step that fits a bucket, else None (run it eagerly).
        ``token_slots``: each row's LoRA slot (-1: base) when an adapter is in the step
        (``LoRAManager.set_batch``): the bucket's LoRA graph runs it."""
        from pagedlm.engine.model_runner import StepInputs

        lora = token_slots is not None
        if self.failed or (lora and (self.lora_failed or self.lora is None)):
            return None
        sched = out.scheduled
        n = out.num_tokens
        if n == 0 or n > self.sizes[-1]:
            return None
        for seq, k in sched:
            if k != 1 + len(seq.spec_tokens) or (
                    seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens):
                return None
        bucket = next(b for b in self.sizes if b >= n)
        if (bucket, lora) in self.eager_graphs:
            return None
        if self.aot is not None and not lora:
            self.poll()
            if bucket not in self.packages:
                self.request([bucket])  # eager until its package is built (no-op once asked)
                return None
        bs = self.block_size
        ids, pos, slots, lens, tables = [], [], [], [], []
        samples, rows = [], []
        width = 2
        for seq, k in sched:
            # A speculating sequence's k tokens are k decode rows over one block table, each seeing
            # the keys up to its own position: every row's K/V is written before any row attends,
            # so this is causal attention over the proposals (the verification forward).
            p0 = seq.num_computed_tokens
            t = seq.block_table
            if p0 + k >= seq.num_tokens:
                samples.append((seq, len(rows)))
                rows.extend(range(len(ids), len(ids) + k))
            for j, tok in enumerate(seq.step_token_ids(p0, k)):
                p = p0 + j
                ids.append(tok)
                pos.append(p)
                slots.append(t[p // bs] * bs + p % bs)
                lens.append(p + 1)
                tables.append(t)
            width = max(width, (p0 + k - 1) // bs + 1)
        scratch = self.scratch_block
        pad = bucket - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [scratch * bs] * pad
        lens += [1] * pad
        flat: list[int] = []
        for t in tables:
            flat += t[:width]
            if len(t) < width:
                flat += [scratch] * (width - len(t))
        flat += [scratch] * (width * pad)
        buf = self._buffers(bucket)
        for dst, values in ((buf.ids, ids), (buf.pos, pos), (buf.slots, slots), (buf.lens, lens),
                            (buf.tables[: bucket * width], flat)):
            _fill(dst, values)
        if lora:
            self._use_lora_graph(bucket, token_slots + [-1] * pad)
        sel = None if len(rows) == n else torch.tensor(rows, dtype=torch.long)
        batch = DecodeBatch(out, bucket, width, sel, n, lora)
        return StepInputs(buf.ids, buf.pos, None, rows, samples, [], compiled=batch)

    def _use_lora_graph(self, bucket: int, token_slots: list[int]) -> None:
        """Fill the bucket's one-hot in place and put the LoRA layers in graph mode over it."""
        buf = self.buffers[bucket]
        slots = torch.tensor(token_slots, device=self.device)
        buf.onehot.copy_(slots[:, None] == torch.arange(self.lora.max_loras, device=self.device))
        self._drop_stale_lora_graph(bucket)
        self.lora.batch.use_graph(buf.onehot)

    def _drop_stale_lora_graph(self, bucket: int) -> None:
        """A new adapter wrapped layers the bucket's LoRA graph lacks: trace it again."""
        if self.lora_layers.get(bucket, len(self.lora.layers)) != len(self.lora.layers):
            log.info("LoRA adapters now reach more layers: the LoRA decode step of bucket %d compiles again",
                     bucket)
            for d in (self.fns, self.direct):
                d.pop((bucket, True), None)
            self.lora_buckets.discard(bucket)
            del self.lora_layers[bucket]

    def warmup(self, buckets: list[int] | None = None, lora: bool = False) -> None:
        """Compile buckets now (default: all) on a batch of padding rows, which touch only the
        scratch block, instead of at their first real step. ``lora``: their LoRA graphs (only
        once an adapter is loaded: the graph covers the layers adapters wrap)."""
        if lora and (self.lora is None or not self.lora.layers):
            return
        if self.aot is not None and not lora:  # build (or load) the packages, and wait for them
            wanted = list(self.sizes) if buckets is None else list(buckets)
            self.request(wanted)
            self.wait(wanted)
        done = self.lora_buckets if lora else self.compiled_buckets
        for bucket in self.sizes if buckets is None else buckets:
            if lora:
                self._drop_stale_lora_graph(bucket)
            if self.failed or (lora and self.lora_failed) or bucket in done or (bucket, lora) in self.eager_graphs:
                continue
            if bucket not in self.sizes:
                raise ValueError(f"no decode bucket {bucket}; buckets: {self.sizes}")
            if self.aot is not None and not lora and bucket not in self.packages:
                continue  # no package (its builder failed): eager
            buf = self._buffers(bucket)
            buf.ids.zero_()
            buf.pos.zero_()
            buf.slots.fill_(self.scratch_block * self.block_size)
            buf.lens.fill_(1)
            buf.tables[: bucket * 2].fill_(self.scratch_block)
            if lora:
                self._use_lora_graph(bucket, [-1] * bucket)
            elif self.lora is not None:  # the base graph is traced with the LoRA layers off
                self.lora.batch.clear()
            if self.aot is None or lora:
                log.info("compiling the %s for batch bucket %d ...", _what(lora), bucket)
            with torch.no_grad():
                for _ in range(4):  # compile, then time it a few times (step_seconds)
                    self.execute(DecodeBatch(None, bucket, 2, None, 0, lora))
        if self.lora is not None:
            self.lora.batch.clear()

    # ---- background mode: packages built by a builder process (engine/aot.py) ----------------
    def entry(self, bucket: int) -> Path:
        """The bucket's cache entry (its key walks every tensor of the model: computed once)."""
        path = self._entries.get(bucket)
        if path is None:
            path = self._entries[bucket] = self.aot.path(self.model, bucket, bucket not in self.static_buckets)
        return path

    def states(self) -> dict[int, str]:
        """Each bucket's state: compiled (a graph runs it), compiling (a builder is making it),
        eager (not built, or sent back to eager: see ``eager_graphs`` / ``aot_failed``)."""
        out = {}
        for b in self.sizes:
            if (b, False) in self.eager_graphs or self.failed:
                out[b] = "eager"
            elif self.aot is None:
                out[b] = "compiled" if b in self.compiled_buckets else "eager"
            elif b in self.packages:
                out[b] = "compiled"
            elif b in self.pending or b in self.queued:
                out[b] = "compiling"
            else:
                out[b] = "eager"
        return out

    def _load_cached(self) -> None:
        """Load every bucket whose package is in the cache (start-up: milliseconds each). Without
        a usable cache folder, steps compile in this process instead (inline), with one warning."""
        if self.kernels_pending:
            return  # the packages this model will use call the kernels it waits for
        try:
            paths = {b: self.entry(b) for b in self.sizes}
        except OSError as e:
            from pagedlm import cache

            log.warning("the compiled-step cache under %s is not usable (%s); decode steps compile in this "
                        "process instead", cache.cache_root(), e)
            self.aot = None
            return
        for b, path in paths.items():
            if path.exists():
                self._load(b, path)

    def _load(self, bucket: int, path: Path) -> None:
        from pagedlm.engine.aot import PackagedStep, step_tensors

        _, tensors, _ = step_tensors(self.model)
        try:
            step = PackagedStep(path, tensors, self.caches, self._buffers(bucket), self._loaders.get(path))
            self.packages[bucket] = step
            self._loaders[path] = step.loader
        except Exception as e:  # noqa: BLE001 - a bad entry: rebuilt, this bucket eager meanwhile
            log.warning("the cached decode step of bucket %d (%s) does not load (%s: %s); rebuilding it",
                        bucket, path.name, type(e).__name__, e)
            try:
                path.unlink()
            except OSError:
                pass
            self.request([bucket])
            return
        self.compiled_buckets.discard(bucket)  # its first run here is checked against eager
        log.info("decode step of batch bucket %d: compiled package loaded from the cache (%s)", bucket, path.name)

    def request(self, buckets: list[int]) -> None:
        """Have these buckets built in the background (those not loaded, pending or failed)."""
        want = [b for b in buckets if b in self.sizes and b not in self.packages and b not in self.pending
                and b not in self.aot_failed and b not in self.queued]
        if self.kernels_pending:  # looked up and built once the kernels are in (ModelRunner._poll_kernels)
            self.queued.extend(want)
            self._start_builder_after_kernels()
            return
        for b in want:
            path = self.entry(b)
            if path.exists():
                self._load(b, path)
            else:
                self.queued.append(b)
        self._start_builder()

    def _start_builder(self) -> None:
        if not self.queued or (self.builder is not None and self.builder.poll() is None):
            return
        if self.kernels_pending:  # a package is keyed with the kernels its step calls: wait for them
            self._start_builder_after_kernels()
            return
        from pagedlm import cache
        from pagedlm.engine.aot import builder_command

        buckets = sorted(self.queued)
        self.queued = []
        expected = {b: str(self.entry(b)) for b in buckets}
        self.pending.update({b: Path(p) for b, p in expected.items()})
        # No core is yielded to the builder: it is stopped while a step runs (``builders_paused``).
        # A bucket another process's builder is making already: wait for its entry instead.
        expected = {b: p for b, p in expected.items() if not cache.claimed(p)}
        if not expected:
            return
        buckets = sorted(expected)
        logf = open(cache.cache_dir("compiled") / "builder.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            # Its own session: it finishes the buckets it was given even if this process exits
            # first (the next process then loads them), and never receives our signals.
            self.builder = subprocess.Popen(builder_command(self.aot, buckets, expected), stdin=subprocess.DEVNULL,
                                            stdout=logf, stderr=logf, start_new_session=True,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            logf.close()
        log.info("building the compiled decode step of batch buckets %s in the background (they run eagerly "
                 "until then; log: %s)", buckets, cache.cache_dir("compiled") / "builder.log")

    def _start_builder_after_kernels(self) -> None:
        """While this process's weights wait for pagedlm's kernels (a machine's first process,
        which may exit before they are built): a builder that waits for them too, then builds the
        buckets asked for so far under the key they will have, for the processes after this one
        (this one looks them up, or builds what is missing, once its own weights switch)."""
        if self._after_kernels_started or self.aot is None:
            return
        self._after_kernels_started = True
        from pagedlm import cache
        from pagedlm.engine.aot import builder_command

        # With the kernels: the builder measures its own crossover (this process's was measured
        # against torch's kernels).
        spec = dataclasses.replace(self.aot, kernels=True, dense_min_rows=None, crossover_measured=True)
        try:
            logf = open(cache.cache_dir("compiled") / "builder.log", "ab")  # noqa: SIM115 - the child keeps it
        except OSError:
            return
        try:
            self.after_builder = subprocess.Popen(
                builder_command(spec, sorted(self.queued), {}, after_kernels=True), stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            logf.close()
        log.info("the compiled decode step of batch buckets %s will be built in the background once "
                 "pagedlm's kernels are", sorted(self.queued))

    def poll(self, force: bool = False) -> None:
        """Between steps: swap in the packages the builder has finished (at most every 0.2 s)."""
        if not self.pending and not self.queued:
            return
        now = time.monotonic()
        if not force and now < self._next_poll:
            return
        self._next_poll = now + 0.2
        from pagedlm import cache
        from pagedlm.engine.aot import FAILED_SUFFIX

        exited = self.builder is None or self.builder.poll() is not None
        for path in dict.fromkeys(self.pending.values()):  # the buckets of a dynamic group share one
            buckets = [b for b, p in self.pending.items() if p == path]
            failed = Path(str(path) + FAILED_SUFFIX)
            # Read before the entry is looked for: a builder publishes its entry, then exits.
            building = not exited or cache.claimed(path)
            if path.exists():
                for b in buckets:
                    del self.pending[b]
                    self._load(b, path)
            elif failed.exists():
                try:
                    reason = failed.read_text(errors="replace")
                    failed.unlink()
                except OSError as e:
                    reason = str(e)
                self._failed(buckets, path, reason)
            elif not building:  # nobody makes it (any more)
                who = ("another process's builder" if self.builder is None
                       else f"the builder (exit code {self.builder.returncode})")
                self._failed(buckets, path, f"{who} exited without building it")
        if exited:
            self._start_builder()

    def _failed(self, buckets: list[int], path: Path, reason: str) -> None:
        """The package at ``path`` was not built: a dynamic group's buckets each build their own
        instead (one warning); a bucket's own runs eagerly (one warning)."""
        for b in buckets:
            del self.pending[b]
        shared = [b for b in self.sizes if self._entries.get(b) == path]
        if len(shared) > 1:
            log.warning("the compiled decode step shared by batch buckets %s could not be built (%s); each builds "
                        "its own", shared, reason)
            self.static_buckets.update(shared)
            for b in shared:
                self._entries.pop(b, None)
            self.request(buckets)
            return
        for b in buckets:
            self.aot_failed[b] = reason
            log.warning("the compiled decode step of batch bucket %d could not be built (%s); it runs eagerly", b, reason)

    @contextlib.contextmanager
    def builders_paused(self):
        """Around a step: the builders this engine started (and the compilers they run, their
        process group) stop until the step ends; they run between steps and while the engine waits
        for work. Measured on a 2-core VM: a builder at idle priority made eager 32-row steps
        1.6-2.9x slower (its compilers' memory use stalls the shared cores in ways scheduling
        priorities do not see; busy loops at idle priority cost 7-10%), and the core yielded to it
        cost as much again. A builder whose engine dies mid-step is sent SIGCONT by the kernel
        (``cache.IDLE_LAUNCH``: PR_SET_PDEATHSIG) and passes it on to its compilers."""
        live = [p for p in (self.builder, self.after_builder) if p is not None and p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGSTOP)
        try:
            yield
        finally:
            for p in live:
                _signal_group(p, signal.SIGCONT)

    def wait(self, buckets: list[int], timeout_s: float = 3600.0) -> None:
        """Block until these buckets are loaded or have failed (warm-up, `pagedlm cache warm`)."""
        deadline = time.monotonic() + timeout_s
        while any(b in self.pending or b in self.queued for b in buckets):
            if time.monotonic() > deadline:
                raise TimeoutError(f"decode buckets {buckets} were not built within {timeout_s:.0f} s")
            time.sleep(0.2)
            self.poll(force=True)

    def _eager_logits(self, batch: DecodeBatch, tables: torch.Tensor) -> torch.Tensor:
        """float32 logits of every row of the bucket, computed eagerly from the bucket's inputs
        through the reference attention backend (which writes the same K/V slots again)."""
        buf = self.buffers[batch.bucket]
        meta = AttentionMetadata(slot_mapping=buf.slots, num_decodes=batch.bucket, decode_block_tables=tables,
                                 decode_context_lens=buf.lens, decode_max_context=int(buf.lens.max()),
                                 block_size=self.block_size)
        with torch.inference_mode():
            return self.model.compute_logits(self.model(buf.ids, buf.pos, meta)).float()

    def _to_eager(self, key: tuple[int, bool], why: str) -> None:
        bucket, lora = key
        self.eager_graphs[key] = why
        self.checked.discard(key)
        log.warning("the compiled %s for batch bucket %d runs eagerly from now on: %s", _what(lora), bucket, why)

    def execute(self, batch: DecodeBatch) -> torch.Tensor | None:
        """Logits of the sampled rows, or None when the compiled step failed (run it eagerly)."""
        key = (batch.bucket, batch.lora)
        if key in self.eager_graphs:
            return None
        buf = self.buffers[batch.bucket]
        tables = buf.tables[: batch.bucket * batch.width].view(batch.bucket, batch.width)
        if batch.bucket not in self.packages or batch.lora:  # Dynamo's graphs only (a package never imports it)
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        done = self.lora_buckets if batch.lora else self.compiled_buckets
        first = batch.bucket not in done
        if first and batch.sched is not None and batch.bucket not in self.packages:
            log.info("compiling the %s for batch bucket %d (the first time ~1 min on 2 cores; "
                     "inductor caches it on disk) ...", _what(batch.lora), batch.bucket)
        t0 = time.perf_counter()
        # A scheduled step's rows past num_rows are padding: pagedlm's kernels skip them (warm-up's
        # steps compute every row, and the self-check compares them too).
        # A full bucket has no padding: no limit to set (two custom-op calls, ~20 us of a ~5 ms
        # batch-1 step).
        live = batch.num_rows if batch.sched is not None and 0 < batch.num_rows < batch.bucket else None
        try:
            with kernels.row_limit(live):
                package = self.packages.get(batch.bucket) if not batch.lora else None
                direct = self.direct.get(key)
                if package is not None:
                    logits = package(tables)
                elif direct is not None:
                    compiled, args, table_at, width_at = direct
                    args = list(args)
                    args[table_at] = tables
                    if width_at is not None:
                        args[width_at] = batch.width
                    logits = compiled(*args)[0]
                else:
                    logits = self._compiled(key)(buf.ids, buf.pos, buf.slots, tables, buf.lens)[0]
        except Exception as e:  # compile or run failure: never fail the request
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if batch.lora:  # base steps keep their graphs
                self.lora_failed = True
                log.warning("compiled LoRA decode step failed (%s); steps with LoRA adapters run eagerly "
                            "from now on", reason)
            else:
                self.failed = True
                log.warning("compiled decode step failed (%s); running eagerly from now on", reason)
            return None
        elapsed = time.perf_counter() - t0
        if first:
            done.add(batch.bucket)
            if batch.bucket not in self.packages or batch.lora:
                log.info("compiled the %s for batch bucket %d in %.1f s", _what(batch.lora), batch.bucket, elapsed)
        n = max(batch.num_rows, 1) if batch.sched is not None else batch.bucket
        if key not in self.checked and (batch.sched is not None or first):
            # Trust a graph only once it agrees with the eager step on real rows (warm-up's
            # padding rows are checked too, and a failure there already sends the bucket eager).
            eager = self._eager_logits(batch, tables)
            problem = self.check.compare(logits[:n].float(), eager[:n])
            if problem is not None:
                self._to_eager(key, f"it disagrees with the eager step: {problem}")
                logits = eager
            elif batch.sched is not None:
                self.checked.add(key)
        elif not math.isfinite((logits if n == logits.shape[0] else logits[:n]).sum().item()):
            # One sum per step: NaN or inf in any real row makes it non-finite. (As few ops as
            # possible: the first ones after a step run on cold caches, ~50 us each here.)
            self._to_eager(key, "it computed non-finite logits")
            return None  # the runner recomputes the whole step eagerly (same K/V slots)
        if not first:
            if not batch.lora:  # what a base row costs (speculative decoding's policy)
                prev = self.step_seconds.get(batch.bucket)
                self.step_seconds[batch.bucket] = elapsed if prev is None else prev + 0.1 * (elapsed - prev)
                if batch.sched is not None and self.governor is not None:
                    self.governor.record(f"compiled batch-{batch.bucket}", elapsed)
            self.num_steps += 1
            self.last_step_seconds = elapsed
        if batch.num_rows != logits.shape[0]:
            logits = logits[: batch.num_rows]
        return logits if batch.rows is None else logits[batch.rows]


def _fill(dst: torch.Tensor, values: list[int]) -> None:
    """dst[:] = values. On CPU through numpy's view of dst (~1 us where torch.tensor then copy_
    take ~6; a step fills five buffers)."""
    if dst.device.type == "cpu":
        dst.numpy()[:] = values
    else:
        dst.copy_(torch.tensor(values))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a builder's process group (its own session: the group's id is its pid)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _what(lora: bool) -> str:
    return "LoRA decode step" if lora else "decode step"
