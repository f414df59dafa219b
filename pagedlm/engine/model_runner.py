"""Packs a scheduled batch flat (no padding), runs the model once, returns the logits needed.

Per step: ``input_ids``, ``positions``, ``slot_mapping`` (where each new K/V goes), decode block
tables and context lengths, and one prefill segment per prefilling sequence. Logits are computed
only at rows that are sampled (the last token of each sequence whose prompt is complete) and,
for ``prompt_logprobs``, at every prompt row.

Steps made only of decodes go to the compiled decode step (``engine/compiled.py``) when it is
on: fixed batch buckets, inputs in persistent buffers, attention reading the cache in place
(steps with a LoRA adapter in them run each bucket's LoRA graph). Everything else (prefill
chunks, mixed steps, prompt logprobs) runs eagerly.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from pagedlm import kernels
from pagedlm.config import ModelConfig
from pagedlm.engine.aot import quantized_weights
from pagedlm.engine.compiled import SelfCheck
from pagedlm.engine.scheduler import SchedulerOutput
from pagedlm.engine.sequence import Sequence
from pagedlm.engine.threads import ThreadGovernor, reclaim_core, yield_core
from pagedlm.model.layers.attention import AttentionMetadata, PrefillSegment
from pagedlm.model.layers.quant import kernels_in_background, use_kernels
from pagedlm.model.registry import load_model

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: list[int]  # rows of the flat batch whose logits are needed
    # (seq, index into logit_rows) for sequences that sample; a speculating sequence's rows for its
    # proposals follow that index
    samples: list[tuple[Sequence, int]]
    prompt_rows: list[tuple[Sequence, int, int, int]]  # (seq, first logit index, count, first position)
    compiled: object = None  # the compiled decode step's batch bucket, when it runs this step


def _has_moe(model: torch.nn.Module) -> bool:
    from pagedlm.model.layers.moe import SparseMoeBlock

    return any(isinstance(m, SparseMoeBlock) for m in model.modules())


class ModelRunnerBase(abc.ABC):
    """What the engine needs of a model runner, in this process (``ModelRunner``) or over ranks
    (``DistributedModelRunner``): declared here, so the engine reads attributes, not ``getattr``."""

    weight_dtype: torch.dtype  # linear and embedding weights
    compute_dtype: torch.dtype  # activations and the KV cache
    block_size: int = 0
    supports_prefix_caching: bool = True  # False where cached blocks are not visible to every step
    compiled = None  # CompiledDecode when the decode step is compiled
    lora = None  # LoRAManager (pagedlm/lora.py) when LoRA adapters are enabled
    quant_counts: dict[str, int] = {}  # layers per quantization method

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations and the KV cache)."""
        return self.compute_dtype

    @abc.abstractmethod
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token, all layers (on the busiest rank)."""

    @abc.abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None: ...

    @abc.abstractmethod
    def clear_blocks(self, block_ids: list[int]) -> None:
        """Zero these KV blocks in every layer's cache (blocks of a request that failed on
        non-finite values, before anyone reuses them)."""

    @abc.abstractmethod
    def prepare(self, out: SchedulerOutput) -> StepInputs: ...

    @abc.abstractmethod
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """float32 logits for ``inputs.logit_rows`` (None if none are needed)."""

    def shutdown(self) -> None:  # noqa: B027 (optional to override)
        """Release processes or devices; nothing to do in-process."""


class ModelRunner(ModelRunnerBase):
    # Defaults for runners that do not load a model here (DistributedModelRunner's ranks do).
    _waiting_kernels: list = []  # quantized weights waiting for pagedlm's kernels (``_poll_kernels``)
    governor = None  # ThreadGovernor of the decode steps' threads (CPU, single process)
    compiled = None
    def __init__(self, model_path: str, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                 quantization: str = "none", enforce_eager: bool = True, dense_min_rows: int | None = None,
                 max_num_seqs: int = 64, max_loras: int = 0, max_lora_rank: int = 16, parallel=None,
                 compile_mode: str = "inline", **stage):
        from pagedlm.model.layers.matmul import split_dtype

        self.cfg = cfg
        self.weight_dtype, self.compute_dtype = split_dtype(dtype, device)
        self.device = torch.device(device)
        # Background mode on CPU: a machine's first process does not wait ~15 s for the C++
        # compiler; its weights multiply with torch's kernels until pagedlm's load (``_poll_kernels``).
        background = compile_mode == "background" and self.device.type == "cpu" and parallel is None and not max_loras
        # A machine's first load runs beside the kernels' compiler: one thread fewer for it too (its
        # tensor ops' threads would otherwise wait for a core the compiler holds: measured, the
        # int4 repack's small ops ran ~10x slower on two threads than on one).
        building = background and not kernels.ready()
        if building:
            yield_core("kernels")
        with kernels_in_background(background):
            self.model = load_model(model_path, cfg, dtype, device, quantization, dense_min_rows, parallel, **stage)
        self._spec_args = (model_path, dtype, quantization, dense_min_rows is None)
        self._waiting_kernels = [q for q in quantized_weights(self.model) if q.pending_kernel is not None]
        self._next_kernel_poll = 0.0
        if self._waiting_kernels:
            yield_core("kernels")
        elif building:
            reclaim_core("kernels")
        # One thread or all for the decode steps, by their measured times (CPU only).
        self.governor = ThreadGovernor() if self.device.type == "cpu" and parallel is None else None
        self.quant_counts: dict[str, int] = getattr(self.model, "quant_counts", {})
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0
        self.compiled = None
        if max_loras:
            from pagedlm.lora import LoRAManager

            self.lora = LoRAManager(self.model, max_loras, max_lora_rank, self.dtype, self.device)
        if not enforce_eager and _has_moe(self.model):
            # The expert routing reads its per-expert counts on the host (``layers/moe.py``): no
            # whole-graph capture or export of the step can hold it, and every build would fail.
            log.info("MoE models decode eagerly: the expert routing reads its counts on the host")
            enforce_eager = True
        if not enforce_eager:
            from pagedlm.engine.compiled import CompiledDecode

            aot = None
            if compile_mode == "background" and self.device.type == "cpu" and self.lora is None and parallel is None:
                aot = self._step_spec(*self._spec_args)
            self.compiled = CompiledDecode(self.model, self.device, max_num_seqs, self.lora, self._precision(), aot)
            self.compiled.kernels_pending = bool(self._waiting_kernels)
            self.compiled.governor = self.governor

    def _precision(self) -> torch.dtype:
        """The self-check's tolerance follows the lower of the weights' and activations' precisions;
        activations rounded to int8 (the int4 kernel's default) count as 16-bit: a compiled graph's
        x differs from eager's in the last bits, and a few values round the other way."""
        precision = self.weight_dtype if self.weight_dtype.itemsize < self.compute_dtype.itemsize else self.compute_dtype
        if any(getattr(q, "int8_act", False) for q in quantized_weights(self.model)):
            precision = torch.bfloat16
        return precision

    def wait_for_kernels(self, timeout_s: float = 900.0) -> None:
        """Block until weights waiting for pagedlm's kernels have switched to them (or their build
        failed): ``pagedlm cache warm`` must build the buckets under the key with the kernels,
        and an engine that never steps would otherwise wait for the other key forever."""
        deadline = time.monotonic() + timeout_s
        while self._waiting_kernels and time.monotonic() < deadline:
            self._next_kernel_poll = 0.0
            self._poll_kernels()
            if self._waiting_kernels:
                time.sleep(0.2)

    def _poll_kernels(self) -> None:
        """Between steps (at most every 0.2 s), while pagedlm's kernels build in the background:
        once they are built, the waiting weights switch to them, and the compiled steps (keyed
        with the kernels) are looked up and built from then on."""
        now = time.monotonic()
        if now < self._next_kernel_poll:
            return
        self._next_kernel_poll = now + 0.2
        state = kernels.build_state()
        if state == "building":
            return
        # A crossover given (not measured) stays as given.
        dtype = self.compute_dtype if self._spec_args[3] else None
        switched = use_kernels(self._waiting_kernels, dtype) if state == "ready" else 0
        if switched:
            log.info("pagedlm's CPU kernels are built: %d weights multiply with them from this step on", switched)
        else:
            log.warning("pagedlm's CPU kernels are not available (%s); torch's kernels multiply",
                        state.removeprefix("failed: "))
            for q in self._waiting_kernels:
                q.pending_kernel = None
        self._waiting_kernels = []
        reclaim_core("kernels")
        c = self.compiled
        if c is not None:
            c.kernels_pending = False
            c.check = SelfCheck.for_dtype(self._precision())
            if c.aot is not None:
                c.aot = dataclasses.replace(self._step_spec(*self._spec_args), block_size=c.aot.block_size)
                c._entries.clear()
                c._load_cached()
                queued, c.queued = c.queued, []
                c.request(queued)  # the buckets asked for meanwhile

    def _step_spec(self, model_path, dtype: torch.dtype, quantization: str, measured: bool = True):
        """What a builder process needs to make this model's decode-step packages (engine/aot.py)."""
        from pagedlm.engine.aot import StepSpec, config_key, quantized_weights

        qweights = quantized_weights(self.model)
        # The dense crossover measured per kind of weight (int4, int8): the builder takes these.
        crossover = {q.kind: q.dense_min_rows for q in qweights if hasattr(q, "dense_min_rows")} or None
        # Whether the step calls pagedlm's kernels (the builder must build the same graph).
        uses_kernels = any(getattr(q, "kernel", None) is not None for q in qweights)
        path = getattr(model_path, "weights_path", model_path)
        return StepSpec(model_path=str(path), model_key=config_key(self.cfg), dtype=str(dtype).removeprefix("torch."),
                        cache_dtype=str(self.compute_dtype).removeprefix("torch."), quantization=quantization,
                        dense_min_rows=crossover, device=str(self.device), block_size=0,
                        kernels=uses_kernels, crossover_measured=measured)

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        elem = self.compute_dtype.itemsize
        return sum(a.kv_elems_per_token() * elem for a in self.model.attention_layers())

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv_caches = []
        # The compiled decode step pads batches with rows that write to one scratch block, past
        # the blocks the block manager hands out.
        extra = 1 if self.compiled is not None else 0
        # Not zeroed on CPU: every slot is written before it is attended to, and attention gives a
        # slot past a sequence's length no weight whatever it holds (NaN included: masked by select,
        # model/layers/attention.py). The pool's pages are then touched as blocks fill, not all at
        # start-up (~1 s for the default 1 GiB on 2 cores).
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        for a in self.model.attention_layers():  # each declares its cache (K|V heads, or MLA's latent)
            cache = alloc(a.kv_cache_shape(num_blocks + extra, block_size), dtype=self.compute_dtype, device=self.device)
            a.kv_cache = cache
            self.kv_caches.append(cache)
        if self.compiled is not None:
            self.compiled.set_cache(num_blocks, block_size, self.kv_caches)

    def clear_blocks(self, block_ids: list[int]) -> None:
        if not block_ids or not self.kv_caches:
            return
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for cache in self.kv_caches:  # (K|V or latent, blocks, block_size, heads, dim)
            cache.index_fill_(1, idx, 0)

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> StepInputs:
        # Each token's adapter slot, or None when no adapter is in the step (or LoRA is off).
        token_slots = self.lora.set_batch(out.scheduled) if self.lora is not None else None
        if self._waiting_kernels:
            self._poll_kernels()
        if self.compiled is not None:
            step = self.compiled.prepare(out, token_slots)
            if step is not None:
                return step
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, list[int], bool]] = []
        logit_rows: list[int] = []
        samples: list[tuple[Sequence, int]] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            q_start = len(ids)
            ids.extend(seq.step_token_ids(start, n))
            pos.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:  # a prefill chunk, or a speculating sequence's 1 + k verification rows
                prefill_specs.append((q_start, n, start + n, table, start == seq.num_tokens - 1))
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                # logits at position p score token p + 1: rows for p in [start, min(end, prompt - 1)).
                # A chunk's last row scores the next chunk's first token: it is kept.
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last > start:
                    prompt_rows.append((seq, len(logit_rows), last - start, start))
                    logit_rows.extend(range(q_start, q_start + last - start))
            if start + n >= seq.num_tokens:
                # The last token's row samples; a speculating sequence's rows after it verify its
                # proposals (n - 1 - first of them, see Sequence.spec_tokens).
                first = seq.num_tokens - 1 - start
                samples.append((seq, len(logit_rows)))
                logit_rows.extend(range(q_start + first, q_start + n))
        dev = self.device
        nd = len(decode_tables)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), block_size=bs)
        if nd:
            width = max(len(t) for t in decode_tables)
            meta.num_decodes = nd
            meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                                    dtype=torch.long, device=dev)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            meta.decode_max_context = max(decode_lens)
        meta.prefills = [
            PrefillSegment(q, n, ctx, torch.tensor(t[: (ctx + bs - 1) // bs], dtype=torch.long, device=dev),
                           decode_rows=verifying)
            for q, n, ctx, t, verifying in prefill_specs
        ]
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev), meta, logit_rows, samples, prompt_rows)

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the model; return float32 logits for ``inputs.logit_rows`` (None if none needed).
        Background builders of compiled steps are stopped meanwhile (``builders_paused``)."""
        if self.compiled is None:
            return self._execute(inputs)
        with self.compiled.builders_paused():
            return self._execute(inputs)

    def _execute(self, inputs: StepInputs) -> torch.Tensor | None:
        if inputs.compiled is not None:
            with torch.no_grad():  # not inference_mode: compiled graphs take no inference tensors
                logits = self.compiled.execute(inputs.compiled)
            if logits is not None:
                return logits
            inputs = self.prepare(inputs.compiled.sched)  # compiled step failed: now eager, same rows
        with torch.inference_mode():
            if self.governor is None or inputs.meta.prefills or not inputs.meta.num_decodes:
                return self._execute_eager(inputs)
            t0 = time.perf_counter()
            logits = self._execute_eager(inputs)
            self.governor.record(f"eager {inputs.meta.num_decodes}-row", time.perf_counter() - t0)
            return logits

    def _execute_eager(self, inputs: StepInputs) -> torch.Tensor | None:
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        if not inputs.logit_rows:
            return None
        rows = torch.tensor(inputs.logit_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden[rows]).float()
