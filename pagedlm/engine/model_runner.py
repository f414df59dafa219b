"""Packs a scheduled batch flat (no padding), runs the model once, returns the logits needed.

Per step: ``input_ids``, ``positions``, ``slot_mapping`` (where each new K/V goes), decode block
tables and context lengths, and one prefill segment per prefilling sequence. Logits are computed
only at rows that are sampled (the last token of each sequence whose prompt is complete) and,
for ``prompt_logprobs``, at every prompt row.

Steps made only of decodes go to the compiled decode step (``engine/compiled.py``) when it is
on: fixed batch buckets, inputs in persistent buffers, attention reading the cache in place.
Everything else (prefill chunks, mixed steps, prompt logprobs, steps with a LoRA adapter) runs
eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedlm.config import ModelConfig
from pagedlm.engine.scheduler import SchedulerOutput
from pagedlm.engine.sequence import Sequence
from pagedlm.model.layers.attention import AttentionMetadata, PrefillSegment
from pagedlm.model.registry import load_model

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: list[int]  # rows of the flat batch whose logits are needed
    samples: list[tuple[Sequence, int]]  # (seq, index into logit_rows) for sequences that sample
    prompt_rows: list[tuple[Sequence, int, int, int]]  # (seq, first logit index, count, first position)
    compiled: object = None  # the compiled decode step's batch bucket, when it runs this step


class ModelRunner:
    compiled = None  # CompiledDecode when the decode step is compiled
    lora = None  # LoRAManager (pagedlm/lora.py) when LoRA adapters are enabled
    quant_counts: dict[str, int] = {}

    def __init__(self, model_path: str, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                 quantization: str = "none", enforce_eager: bool = True, dense_min_rows: int | None = None,
                 max_num_seqs: int = 64, max_loras: int = 0, max_lora_rank: int = 16, **stage):
        from pagedlm.model.layers.matmul import split_dtype

        self.cfg = cfg
        self.weight_dtype, self.dtype = split_dtype(dtype, device)  # self.dtype: activations and KV cache
        self.device = torch.device(device)
        self.model = load_model(model_path, cfg, dtype, device, quantization, dense_min_rows, **stage)
        self.quant_counts: dict[str, int] = getattr(self.model, "quant_counts", {})
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0
        self.compiled = None
        if max_loras:
            from pagedlm.lora import LoRAManager

            self.lora = LoRAManager(self.model, max_loras, max_lora_rank, self.dtype, self.device)
        if not enforce_eager:
            from pagedlm.engine.compiled import CompiledDecode

            self.compiled = CompiledDecode(self.model, self.device, max_num_seqs)

    # ---- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * a.num_kv_heads * a.head_dim * elem for a in self.model.attention_layers())

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv_caches = []
        # The compiled decode step pads batches with rows that write to one scratch block, past
        # the blocks the block manager hands out.
        extra = 1 if self.compiled is not None else 0
        for a in self.model.attention_layers():
            # (K|V, blocks, block_size, kv_heads, head_dim)
            cache = torch.zeros(2, num_blocks + extra, block_size, a.num_kv_heads, a.head_dim,
                                dtype=self.dtype, device=self.device)
            a.kv_cache = cache
            self.kv_caches.append(cache)
        if self.compiled is not None:
            self.compiled.set_cache(num_blocks, block_size)

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> StepInputs:
        # A step with a LoRA adapter runs eagerly: the compiled graph is the base model's.
        with_lora = self.lora is not None and self.lora.set_batch(out.scheduled)
        if self.compiled is not None and not with_lora:
            step = self.compiled.prepare(out)
            if step is not None:
                return step
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, list[int]]] = []
        logit_rows: list[int] = []
        samples: list[tuple[Sequence, int]] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            q_start = len(ids)
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefill_specs.append((q_start, n, start + n, table))
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                # logits at position p score token p + 1: rows for p in [start, min(end, prompt) - 1)
                last = min(start + n, seq.num_prompt_tokens) - 1
                if last > start:
                    prompt_rows.append((seq, len(logit_rows), last - start, start))
                    logit_rows.extend(range(q_start, q_start + last - start))
            if start + n == seq.num_tokens:
                samples.append((seq, len(logit_rows)))
                logit_rows.append(q_start + n - 1)
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
            PrefillSegment(q, n, ctx, torch.tensor(t[: (ctx + bs - 1) // bs], dtype=torch.long, device=dev))
            for q, n, ctx, t in prefill_specs
        ]
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev), meta, logit_rows, samples, prompt_rows)

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the model; return float32 logits for ``inputs.logit_rows`` (None if none needed)."""
        if inputs.compiled is not None:
            with torch.no_grad():  # not inference_mode: compiled graphs take no inference tensors
                logits = self.compiled.execute(inputs.compiled)
            if logits is not None:
                return logits
            inputs = self.prepare(inputs.compiled.sched)  # compiled step failed: now eager, same rows
        with torch.inference_mode():
            return self._execute_eager(inputs)

    def _execute_eager(self, inputs: StepInputs) -> torch.Tensor | None:
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        if not inputs.logit_rows:
            return None
        rows = torch.tensor(inputs.logit_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden[rows]).float()
