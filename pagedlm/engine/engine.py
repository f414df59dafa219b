"""LLMEngine: add_request / step / abort over the scheduler, the model runner and the sampler.

The engine core: one ``step()`` = schedule -> pack -> one model call -> sample -> append token
ids (stop token ids, EOS, max_tokens, max_model_len, grammars; KV block accounting). What the
outputs say (detokenizing, stop strings, holdback, deltas, logprobs, building RequestOutputs) is
the ``OutputProcessor``'s (engine/output_processor.py, where the seam between the two is
described); the core calls it per appended token and once per changed request at the end of a step.
In a core process of its own (engine/core_process.py) ``emit_deltas`` puts ``CoreDeltas`` in its
place: steps return per-request deltas of token ids, and the API server detokenizes them and
ends samples on stop strings (``stop_sequence``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedlm.engine import state as engine_state
from pagedlm.engine.block_manager import BlockManager
from pagedlm.engine.faults import FaultInjector, describe, find_failing
from pagedlm.engine.model_runner import ModelRunner
from pagedlm.engine.output_processor import CoreDeltas, OutputProcessor, RequestDelta
from pagedlm.engine.scheduler import Scheduler, SchedulerOutput
from pagedlm.engine.sequence import Finish, Sequence, SequenceStatus
from pagedlm.engine.structured import GrammarManager, advance
from pagedlm.errors import EngineDeadError, ModelLoadError, RequestRejectedError, WorkerError
from pagedlm.loader.source import DEFAULT_MODEL_FILE, ModelSource, default_model_path, resolve_model  # noqa: F401
from pagedlm.lora import LoRARequest
from pagedlm.model.layers.sampler import SamplingRow, sample
from pagedlm.model.registry import resolve_dtype
from pagedlm.outputs import RequestMetrics, RequestOutput
from pagedlm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

NONFINITE = "the model produced NaN or inf logits"
# DEFAULT_MODEL_FILE, default_model_path and resolve_model live in the loader (loader/source.py);
# they are imported above so that older ``from pagedlm.engine.engine import ...`` lines still work.


def _generation_config_eos(model_path: str) -> set[int]:
    """EOS ids from generation_config.json (e.g. Llama 3 Instruct ends turns with <|eot_id|>)."""
    path = os.path.join(model_path, "generation_config.json") if os.path.isdir(model_path) else ""
    if not path or not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path!r}: {e}") from e
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def check_preemption_mode(mode: str, device: str) -> None:
    """Only recompute is implemented. Swap would copy a preempted sequence's KV blocks to host
    memory and back: on CPU the cache already is host memory, so a swap is a copy of what is
    already there (twice the bytes, no capacity gained); on CUDA it is not implemented."""
    if mode == "recompute":
        return
    if mode != "swap":
        raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {mode!r}")
    if not str(device).startswith("cuda"):
        raise ValueError("preemption_mode 'swap' makes no sense on CPU: the KV cache already lives in host "
                         "memory, so swapping a sequence out would copy its blocks to the same memory (no "
                         "capacity gained, twice the bytes); use 'recompute' (the default), which frees the "
                         "blocks and keeps the full ones in the prefix cache")
    raise ValueError("preemption_mode 'swap' (KV blocks to host memory on CUDA) is not implemented; use "
                     "'recompute' (the default)")


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"  # auto: bfloat16 where the hardware has native bf16, else float32
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the KV cache pool
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests: tiny caches)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # Weight-only quantization: auto (a GGUF file's own precision class per tensor; none for HF
    # directories) | none | int8 | int4. See pagedlm/model/layers/quant.py.
    quantization: str = "auto"
    # False: decode-only steps run a compiled graph per batch bucket (engine/compiled.py).
    # PAGEDLM_ENFORCE_EAGER=1 changes the default (the test suite sets it: compiling every
    # tiny engine would dominate its time; the compiled step has tests of its own).
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("PAGEDLM_ENFORCE_EAGER", "") == "1")
    # Where compiled decode steps come from (engine/compiled.py): "background" (CPU default:
    # AOTInductor packages from the cache, built by a builder process while steps run eagerly;
    # no request waits for a compiler) or "inline" (torch.compile in this process at a bucket's
    # first step, as CUDA and LoRA graphs always do). PAGEDLM_COMPILE_MODE changes the default.
    compile_mode: str = field(default_factory=lambda: os.environ.get("PAGEDLM_COMPILE_MODE", "background"))
    # Start every decode bucket compiling when the engine starts (default: each at its first
    # step). In background mode this does not delay readiness; inline, it compiles them now.
    compile_at_startup: bool = False
    # Parallelism: world size = tp x pp x ep ranks, spawned by the engine (pagedlm.distributed).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, so several engines can share a host
    # LoRA adapters (pagedlm/lora.py): enable_lora for LoRARequests; lora_modules ({name: path},
    # or ["name=path", ...]) are loaded at start-up (and enable LoRA). max_loras adapters can be in
    # one batch; max_lora_rank is the largest rank an adapter may have.
    enable_lora: bool = False
    lora_modules: dict[str, str] | list[str] | None = None
    max_loras: int = 1
    max_lora_rank: int = 16
    # Speculative decoding (engine/spec_decode.py): a SpeculativeConfig, its fields as a dict or a
    # JSON string, like vLLM's --speculative-config; num_speculative_tokens overrides its k and
    # alone turns on n-gram prompt lookup. Normalised to a SpeculativeConfig or None.
    speculative_config: Any = None
    num_speculative_tokens: int | None = None
    # spawn: this process starts the ranks on this host. torchrun: this is rank 0 of ranks that
    # torchrun started, maybe across nodes (pagedlm/distributed/torchrun.py; the CLI sets it).
    launcher: str = "spawn"
    # How a preempted sequence gives back its KV blocks: recompute (free them; its full blocks
    # stay in the prefix cache) is the only mode; swap is refused with the reason (docs/server.md).
    preemption_mode: str = "recompute"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        resolve_dtype(self.dtype)
        from pagedlm.model.layers.quant import validate_quantization

        self.quantization = validate_quantization(self.quantization)
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if self.compile_mode not in ("background", "inline"):
            raise ValueError(f"compile_mode must be 'background' or 'inline', got {self.compile_mode!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_preemption_mode(self.preemption_mode, self.device)
        if self.launcher not in ("spawn", "torchrun"):
            raise ValueError(f"launcher must be 'spawn' or 'torchrun', got {self.launcher!r}")
        if not isinstance(self.master_port, int) or not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be a port number (0 for a free one), got {self.master_port!r}")
        self._check_lora()

    def _check_lora(self) -> None:
        from pagedlm.lora import parse_lora_modules

        self.lora_modules = parse_lora_modules(self.lora_modules)
        if not isinstance(self.enable_lora, bool):
            raise TypeError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        self.enable_lora = self.enable_lora or bool(self.lora_modules)
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.enable_lora and self.world_size > 1:
            raise ValueError("LoRA adapters are not supported with tensor, pipeline or expert parallelism yet "
                             f"(world size {self.world_size}); run LoRA on one process")
        from pagedlm.engine.spec_decode import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.build(self.speculative_config, self.num_speculative_tokens)
        if self.speculative_config is not None and self.world_size > 1:
            raise ValueError("speculative decoding runs in a single-process engine (tensor, pipeline and expert "
                             "parallel sizes 1)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.expert_parallel_size


class Request:
    """The engine core's record of a request: its samples, timings and error. Its text and
    logprobs are the output processor's (``OutputProcessor.states``)."""

    __slots__ = ("request_id", "prompt_ids", "params", "seqs", "metrics", "error")

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=arrival, num_prompt_tokens=len(prompt_ids))
        self.error: str | None = None  # set when the request failed inside a step

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any):
        self.config = config = config or EngineConfig(**kwargs)
        # The model file is opened once here; config, tensor types, weights and tokenizer all
        # come from this one source (and data-parallel replicas in this process share it).
        self.source = source = ModelSource.open(config.model)
        self.model_path, self.weights_path, self.model_config = source.path, source.weights_path, source.config
        source.prefetch_tokenizer()  # on a thread, while the weights load below
        dtype = resolve_dtype(config.dtype, config.device)
        self.dtype = dtype
        t0 = time.perf_counter()
        if config.world_size > 1:
            from pagedlm.distributed.layout import ParallelLayout
            from pagedlm.distributed.runner import DistributedModelRunner

            layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size,
                                    config.expert_parallel_size)
            if config.launcher == "torchrun":  # ranks started by torchrun, maybe on other nodes
                from pagedlm.distributed.launch import detect
                from pagedlm.distributed.torchrun import TorchrunModelRunner

                self.runner = TorchrunModelRunner(self.weights_path, self.model_config, dtype, config.device, layout,
                                                  detect(), config.quantization,
                                                  **config.extra.get("distributed", {}))
            else:
                self.runner = DistributedModelRunner(self.weights_path, self.model_config, dtype, config.device,
                                                     layout, config.master_addr, config.master_port,
                                                     **config.extra.get("distributed", {}))
        else:
            self.runner = ModelRunner(source, self.model_config, dtype, config.device,
                                      quantization=config.quantization, enforce_eager=config.enforce_eager,
                                      max_num_seqs=config.max_num_seqs,
                                      dense_min_rows=config.extra.get("dense_min_rows"),
                                      max_loras=config.max_loras if config.enable_lora else 0,
                                      max_lora_rank=config.max_lora_rank, compile_mode=config.compile_mode)
        self.tokenizer = source.tokenizer()
        self.load_time = time.perf_counter() - t0
        per_token = self.runner.kv_bytes_per_token()
        per_block = per_token * config.block_size
        model_max = min(config.max_model_len or self.model_config.max_position_embeddings,
                        self.model_config.max_position_embeddings)
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        else:
            # No more than every sequence at full length could ever use.
            usable = -(-config.max_num_seqs * model_max // config.block_size)
            num_blocks = min(config.kv_cache_memory // per_block, usable)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of "
                             f"{config.block_size} tokens ({per_block} bytes each)")
        self.runner.allocate_kv_cache(num_blocks, config.block_size)
        self.kv_bytes_per_token = per_token
        prefix_caching = config.enable_prefix_caching and self.runner.supports_prefix_caching
        self.block_manager = BlockManager(num_blocks, config.block_size, prefix_caching)
        cache_tokens = num_blocks * config.block_size
        self.max_model_len = min(model_max, cache_tokens)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.max_loras if config.enable_lora else 0)
        # Adapters served by name (--lora-modules), loaded now so that a bad one fails at start-up.
        self.lora_requests: dict[str, LoRARequest] = {}
        for i, (name, path) in enumerate(config.lora_modules.items(), 1):
            self.lora_requests[name] = req = LoRARequest(name, i, path)
            self.runner.lora.add(req)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.grammars: GrammarManager | None = None  # made at the first structured-output request
        self.requests: dict[str, Request] = {}
        self.output = OutputProcessor(self.tokenizer)
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids |= _generation_config_eos(self.model_path)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "prefill_tokens": 0,
                      "decode_tokens": 0, "failed_requests": 0}
        self.spec = None
        if config.speculative_config is not None:
            from pagedlm.engine.spec_decode import SpecDecoder

            self.spec = SpecDecoder(config.speculative_config, self)
        # Test hook (engine/faults.py): called as (stage, seq) per request; raises to fail it.
        self.fault_injector = FaultInjector.from_env()
        self.dead: WorkerError | None = None  # set when a model rank died: no step can run again
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token)", num_blocks,
                 config.block_size, cache_tokens, num_blocks * per_block / 2**20, per_token)
        if config.compile_at_startup:
            compiled = self.runner.compiled
            if compiled is not None and compiled.aot is not None:
                compiled.request(list(compiled.sizes))  # built in the background: ready at once
            else:
                self.warmup()

    def warmup(self, buckets: list[int] | None = None) -> None:
        """Compile the decode step's batch buckets now (default: all up to max_num_seqs) rather
        than at the first step of each size; a no-op with enforce_eager. With LoRA adapters
        loaded, the buckets' LoRA graphs too (steps with an adapter run those). With speculative
        decoding, a list of buckets also gets those a sequence's 1 + j verification rows use,
        j <= k (its policy verifies fewer than k where that pays; a draft model compiles the
        same buckets as the target)."""
        compiled = self.runner.compiled
        if self.spec is not None:
            self.spec.warmup(buckets)
        if compiled is not None:
            if buckets is not None and self.spec is not None:
                rows = 1 + self.spec.k
                top = next((b for b in compiled.sizes if b >= rows), compiled.sizes[-1])
                buckets = sorted(set(buckets) | {b for b in compiled.sizes if b <= top})
            compiled.warmup(buckets)
            compiled.warmup(buckets, lora=True)

    # ---- cache report ----------------------------------------------------------------------
    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def cache_report(self) -> str:
        bm = self.block_manager
        mib = bm.num_blocks * bm.block_size * self.kv_bytes_per_token / 2**20
        r = self.runner
        w, c = (str(d).removeprefix("torch.") for d in (r.weight_dtype, r.compute_dtype))
        dt = f"dtype {c}" if w == c else f"weights {w}, compute {c}"
        quant = {k: v for k, v in r.quant_counts.items() if k != "none"}
        if quant:
            dt += "; quantized layers: " + ", ".join(f"{v} {k}" for k, v in sorted(quant.items()))
        if r.compiled is not None:
            states = r.compiled.states()
            ready = [b for b, st in states.items() if st == "compiled"]
            dt += (f"; compiled decode: buckets {ready or 'none'} ready of {list(states)}"
                   + ("" if r.compiled.aot is None else " (the rest run eagerly until built in the background)"))
        return (f"{dt}; KV cache: {bm.num_blocks} blocks x {bm.block_size} tokens = {bm.num_blocks * bm.block_size} "
                f"tokens ({mib:.1f} MiB, {self.kv_bytes_per_token} bytes/token); max_model_len {self.max_model_len}")

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if self.dead is not None:
            raise EngineDeadError(f"the engine is shut down: {self.dead}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            if prompt == "":
                raise ValueError("prompt is empty")
            prompt_token_ids = self.encode(prompt)
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
            raise TypeError("prompt_token_ids must be a list of integers")
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty (no tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejectedError(
                f"prompt has {len(prompt_token_ids)} tokens, but max_model_len is {self.max_model_len} "
                "(the prompt plus at least one generated token must fit)")
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        grammar = self._grammar_template(params)
        # Last of the checks: a new adapter is read from disk here, on the thread that steps the
        # batch, so a request that is refused anyway must not pay (and make everyone wait) for it.
        lora = self._lora_adapter(lora_request)
        now = time.perf_counter() if arrival_time is None else arrival_time
        req = Request(request_id, list(prompt_token_ids), params, now)
        for i in range(params.n):
            seq = Sequence(request_id, req.prompt_ids, params, index=i, arrival_time=now)
            seq.lora = lora
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.seed + i)
            if grammar is not None:
                seq.grammar = grammar.deep_copy()
            if i > 0:
                seq.wait_for = req.seqs[0]  # share the first sample's prompt blocks via the prefix cache
            req.seqs.append(seq)
        self.output.add_request(req, prompt)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(prompt_token_ids)

    def _lora_adapter(self, lora_request: LoRARequest | None):
        """The loaded adapter of a request (loaded now if new); None for the base model."""
        if lora_request is None:
            return None
        lora = self.runner.lora
        if lora is None:
            raise ValueError(f"LoRA adapter {getattr(lora_request, 'lora_name', lora_request)!r} requested, but "
                             "LoRA is not enabled: start the engine with enable_lora=True or --lora-modules")
        return lora.add(lora_request)
    def _grammar_template(self, params: SamplingParams):
        """The compiled grammar of a structured-output request (None without one); ValueError
        when it cannot constrain this model's vocabulary."""
        if params.structured_outputs is None:
            return None
        return self.structured_outputs().compiled(params.structured_outputs)

    def structured_outputs(self) -> GrammarManager:
        """The grammar manager, built at the first call (~2 s for a 49k vocabulary; the server
        calls this at start-up so no request waits for it). ValueError without a usable tokenizer."""
        if self.grammars is None:
            self.grammars = GrammarManager(self.tokenizer, self.model_config.vocab_size, self.config.max_num_seqs)
        return self.grammars

    def emit_deltas(self) -> None:
        """From now on ``step`` returns a ``RequestDelta`` per changed request (new token ids,
        raw logprobs, endings) instead of ``RequestOutput``s: detokenization and stop strings
        run where the deltas go (the API server of a core process, engine/core_process.py,
        with ``output_processor.DeltaProcessor``), which ends a sample on a stop string with
        ``stop_sequence``."""
        if self.requests:
            raise RuntimeError("emit_deltas() must be called before the first request")
        self.output = CoreDeltas(every_metrics=self.spec is not None)

    def stop_sequence(self, request_id: str, index: int, stop: str, num_output_tokens: int) -> bool:
        """End sample ``index`` of a request on a stop string found after its first
        ``num_output_tokens`` tokens (by whoever detokenizes: ``emit_deltas``), as the in-process
        output processor would have ended it: its blocks are freed and the tokens generated after
        that one (steps that ran before the news came) are dropped and not counted. False when
        the sample had already ended (or its request is gone)."""
        req = self.requests.get(request_id)
        if req is None or not 0 <= index < len(req.seqs) or req.seqs[index].is_finished:
            return False
        seq = req.seqs[index]
        self.scheduler.finish(seq, "stop", stop)
        extra = seq.num_output_tokens - num_output_tokens
        if extra > 0:
            del seq.token_ids[seq.num_prompt_tokens + num_output_tokens:]
            self.stats["generation_tokens"] -= extra
        if req.finished:  # nothing left to report: its last output was made where the stop was found
            req.metrics.finished_time = time.perf_counter()
            del self.requests[request_id]
            self.output.drop(request_id)
        return True

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request id {request_id!r}")
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        req.metrics.finished_time = time.perf_counter()
        del self.requests[request_id]
        self.output.drop(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput] | list[RequestDelta]:
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self)
        sched = self.scheduler.schedule()
        if not sched:
            return []
        now = time.perf_counter()
        for seq, n in sched.scheduled:
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = seq.num_cached_tokens
            if n == 1 + len(seq.spec_tokens) and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += n
        changed: dict[str, Request] = {}
        try:
            inputs, logits = self._forward(sched, changed)
        except WorkerError as e:
            return self._fail_everything(e)
        self.stats["steps"] += 1
        if inputs is None:  # every request of the step failed
            return self._outputs(changed)
        self.scheduler.on_step_done(sched)
        if inputs.prompt_rows:
            self._record_prompt_logprobs(inputs, logits, changed)
        samples = [(seq, i) for seq, i in inputs.samples if not seq.is_finished]
        verified = [(seq, i) for seq, i in samples if seq.spec_tokens]
        if verified:
            samples = [(seq, i) for seq, i in samples if not seq.spec_tokens]
        if samples:
            t = time.perf_counter()
            for seq, (tok, lp, top) in self._sample(logits, samples, changed):
                if seq.is_finished:  # a sibling (n > 1) failed in this step
                    continue
                try:
                    self._append_token(seq, tok, lp, top, t)
                except Exception as e:  # noqa: BLE001 - e.g. a detokenizer error: this request only
                    self._fail_request(seq.request_id, f"while appending a token: {describe(e)}", changed)
                    continue
                changed[seq.request_id] = self.requests[seq.request_id]
        for seq, i in verified:
            if not torch.isfinite(logits[i:i + 1 + len(seq.spec_tokens)].sum()):
                self._fail_request(seq.request_id, NONFINITE, changed, clear_kv=True)
                continue
            try:
                tokens = self.spec.verify(logits[i:i + 1 + len(seq.spec_tokens)], seq, self)
                self._append_verified(seq, tokens, time.perf_counter())
            except Exception as e:  # noqa: BLE001 - this request only
                self._fail_request(seq.request_id, f"while verifying speculative tokens: {describe(e)}", changed)
                continue
            changed[seq.request_id] = self.requests[seq.request_id]
        return self._outputs(changed)

    def _outputs(self, changed: dict[str, Request]) -> list[RequestOutput] | list[RequestDelta]:
        """The step's outputs (one per changed request); finished requests leave the engine."""
        outs = [self.output.make_output(req) for req in changed.values()]
        for out in outs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outs

    def banned_ids(self, seq: Sequence, ahead: int = 0) -> list[int]:
        """Ids min_tokens masks for ``seq``'s next token (``ahead`` tokens later when verifying)."""
        p = seq.params
        if seq.num_output_tokens + ahead < p.min_tokens:
            return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))
        return []

    def generator_of(self, seq: Sequence) -> torch.Generator:
        return self.generator if seq.generator is None else seq.generator

    def _append_verified(self, seq: Sequence, tokens: tuple[list[int], int, list | None], now: float) -> None:
        """Append a verified run (accepted proposals + the target's token) as a plain decode step
        would append each: register the blocks the computed tokens filled, then append and check
        the stops, which may end the run early. Then release blocks holding only rejected tokens."""
        run, accepted, logprobs = tokens
        start = seq.num_computed_tokens
        proposed = len(seq.spec_tokens)
        seq.spec_tokens = []
        self.requests[seq.request_id].metrics.spec_decode.record(proposed, accepted)
        self.spec.stats.record(proposed, accepted)
        self.stats["decode_tokens"] += len(run) - 1
        for j, tok in enumerate(run):
            seq.num_computed_tokens = start + 1 + j  # the last token and the proposals kept before tok
            self.block_manager.cache_full_blocks(seq)
            lp, top = logprobs[j] if logprobs is not None else (None, None)
            self._append_token(seq, tok, lp, top, now)
            if seq.is_finished:
                return
        self.block_manager.trim(seq)

    def _grammar_masks(self, samples, rows: list[SamplingRow], changed: dict[str, Request]):
        """Give each constrained row its bitmask of allowed tokens (all filled in one call); a
        request whose grammar fails ends with an error. Returns the samples and rows left."""
        if self.grammars is None:
            return samples, rows
        constrained = [j for j, (seq, _) in enumerate(samples) if seq.grammar is not None]
        if not constrained:
            return samples, rows
        try:
            masks = self.grammars.fill([samples[j][0].grammar for j in constrained])
        except Exception as e:  # noqa: BLE001 - find the failing grammar, one row at a time
            log.warning("grammar mask fill failed (%s); filling row by row", describe(e))
            masks = []
            for j in constrained:
                seq = samples[j][0]
                try:
                    masks.append(self.grammars.fill([seq.grammar])[0])
                except Exception as e1:  # noqa: BLE001
                    self._fail_request(seq.request_id, f"while applying the grammar: {describe(e1)}", changed)
                    masks.append(None)
        for k, j in enumerate(constrained):
            rows[j].allowed = masks[k]
        ok = [j for j, (seq, _) in enumerate(samples) if not seq.is_finished]
        if len(ok) == len(samples):
            return samples, rows
        return [samples[j] for j in ok], [rows[j] for j in ok]

    # ---- fault isolation (engine/faults.py) --------------------------------------------------
    def _run_model(self, sched: SchedulerOutput):
        """Prepare and run one batch (raises what any part of it raises)."""
        if self.fault_injector is not None:
            for seq, _ in sched.scheduled:
                self.fault_injector("prepare", seq)
        inputs = self.runner.prepare(sched)
        return inputs, self.runner.execute(inputs)

    def _forward(self, sched: SchedulerOutput, changed: dict[str, Request]):
        """(inputs, logits) of the step; requests whose part fails end with an error and leave
        ``sched``. (None, None) when none is left."""
        try:
            return self._run_model(sched)
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("engine step failed (%s); finding the failing requests", describe(e))
            error = e
        trial = lambda items: self._run_model(SchedulerOutput(items))  # noqa: E731
        for (seq, _), err in find_failing(sched.scheduled, trial, error):
            self._fail_request(seq.request_id, describe(err), changed)
        sched.scheduled = [(seq, n) for seq, n in sched.scheduled if not seq.is_finished]
        if not sched.scheduled:
            return None, None
        try:
            return self._run_model(sched)
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001 - fails only together: end them all, keep the engine
            log.exception("engine step failed again without the isolated requests; failing its %d requests",
                          len(sched.scheduled))
            for seq, _ in sched.scheduled:
                self._fail_request(seq.request_id, describe(e), changed)
            sched.scheduled = []
            return None, None

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        if self.fault_injector is not None:
            self.fault_injector("sample", seq)
        return SamplingRow(seq.params, seq.token_ids, seq.num_prompt_tokens, seq.generator, self.banned_ids(seq))

    def _sample(self, logits: torch.Tensor, samples: list[tuple[Sequence, int]], changed: dict[str, Request]):
        """(seq, (token, (logprob, rank) | None, top)) for each sampling row that does not fail."""
        rows, kept = [], []
        for seq, i in samples:
            try:
                rows.append(self._sampling_row(seq))
                kept.append((seq, i))
            except Exception as e:  # noqa: BLE001
                self._fail_request(seq.request_id, f"while sampling: {describe(e)}", changed)
        if not kept:
            return []
        kept, rows = self._grammar_masks(kept, rows, changed)
        if not kept:
            return []
        idx = [i for _, i in kept]
        sel = logits if idx == list(range(logits.shape[0])) else logits[torch.tensor(idx)]
        # One sum per step (~30x cheaper than isfinite().all() over batch x vocab): NaN or inf
        # anywhere makes it non-finite; then, on the fault path only, find the rows.
        if not math.isfinite(sel.sum().item()):
            bad = (~torch.isfinite(sel)).any(dim=-1).tolist()
            for (seq, _), b in zip(kept, bad):
                if b:
                    self._fail_request(seq.request_id, NONFINITE, changed, clear_kv=True)
            ok = [j for j, b in enumerate(bad) if not b]
            kept, rows, sel = [kept[j] for j in ok], [rows[j] for j in ok], sel[ok]
            if not kept:
                return []
        try:
            return list(zip((seq for seq, _ in kept), _per_row(sample(sel, rows, self.generator))))
        except Exception as e:  # noqa: BLE001
            log.warning("batched sampling failed (%s); sampling row by row", describe(e))
        out = []
        for j, (seq, _) in enumerate(kept):
            try:
                out.append((seq, _per_row(sample(sel[j:j + 1], [rows[j]], self.generator))[0]))
            except Exception as e:  # noqa: BLE001
                self._fail_request(seq.request_id, f"while sampling: {describe(e)}", changed)
        return out

    def _fail_request(self, request_id: str, message: str, changed: dict[str, Request],
                      clear_kv: bool = False) -> None:
        """End every sequence of a request with finish_reason "error" (its blocks are freed).
        ``clear_kv``: its K/V may hold non-finite values: the blocks only it holds leave the
        prefix cache and are zeroed before anyone reuses them."""
        req = self.requests.get(request_id)
        if req is None or req.error is not None:
            return
        log.warning("request %s failed: %s", request_id, message)
        req.error = message
        for seq in req.seqs:
            if clear_kv and not seq.is_finished:
                self.runner.clear_blocks(self.block_manager.forget(seq))
            self.scheduler.finish(seq, "error")
        req.metrics.finished_time = time.perf_counter()
        self.stats["failed_requests"] += 1
        changed[request_id] = req

    def _fail_everything(self, e: WorkerError) -> list[RequestOutput]:
        """A model rank died: no step can run again. End every request with an error naming it."""
        log.error("engine is dead: %s", e)
        self.dead = e
        changed: dict[str, Request] = {}
        for rid in list(self.requests):
            self._fail_request(rid, str(e), changed)
        return self._outputs(changed)

    def _record_prompt_logprobs(self, inputs, logits: torch.Tensor, changed: dict[str, Request]) -> None:
        for seq, first, count, start in inputs.prompt_rows:
            if seq.index != 0 or seq.is_finished:
                continue
            try:
                self.output.record_prompt_logprobs(seq, logits, first, count, start)
            except Exception as e:  # noqa: BLE001
                self._fail_request(seq.request_id, f"while computing prompt logprobs: {describe(e)}", changed)

    def _append_token(self, seq: Sequence, tok: int, lp: tuple[float, int] | None, top, now: float) -> None:
        """Append a sampled (or verified) token and end the sequence if it must stop: the core's
        own reasons (``_ending``) or a stop string its text now contains (the output processor's)."""
        req = self.requests[seq.request_id]
        seq.token_ids.append(tok)
        self.stats["generation_tokens"] += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        end = self._ending(seq, tok)
        stop = self.output.add_token(seq, tok, lp, top, end)
        if stop is not None:
            end = Finish("stop", stop)
        if end is not None:
            if end.detail is not None:
                log.warning("request %s: %s", seq.request_id, end.detail)
            self.scheduler.finish(seq, end.reason, end.stop_reason)
            if req.finished:
                req.metrics.finished_time = time.perf_counter()

    def _ending(self, seq: Sequence, tok: int) -> Finish | None:
        """Whether ``seq`` ends after its newest token ``tok``, by token ids alone (advances its
        grammar): a stop token id or EOS, a grammar that completed or broke, max_tokens,
        max_model_len, in that order of precedence."""
        grammar_state = None if seq.grammar is None else advance(seq.grammar, tok)
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if tok in p.stop_token_ids:
                return Finish("stop", tok, by_token=True)
            if not p.ignore_eos and tok in self.eos_ids:
                return Finish("stop", None, by_token=True)
        if grammar_state is not None:
            # The grammar is complete (only EOS may follow: stop now, a step early) or broken.
            if grammar_state == "done":
                return Finish("stop")
            return Finish("abort", detail=f"grammar error, sequence stopped: {grammar_state}")
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return Finish("length")
        if seq.num_tokens >= self.max_model_len:
            return Finish("length")
        return None

    def shutdown(self) -> None:
        """Stop the model ranks of a parallel engine (no-op for a single process)."""
        self.runner.shutdown()

    # ---- metrics ---------------------------------------------------------------------------
    def get_metrics(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else math.nan,
            "num_preemptions": self.scheduler.num_preemptions,
            **{k: v for k, v in self.stats.items()},
            **(self.spec.stats.as_dict() if self.spec is not None else {}),
        }

    def live_sequences(self) -> list[Sequence]:
        return [s for s in self.scheduler.running] + [s for s in self.scheduler.waiting
                                                     if s.status is not SequenceStatus.FINISHED]

    def snapshot_state(self, include_blocks: bool = True) -> dict[str, Any]:
        """Blocks, queues and counters as JSON-ready data (``pagedlm.engine.state``); call it
        on the thread that steps this engine, between steps."""
        return engine_state.snapshot(self, include_blocks)

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A text prompt's token ids, as the engine encodes it (``LLMEngine.encode``)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text")
    return list(tokenizer(prompt)["input_ids"])


def _per_row(result) -> list[tuple[int, tuple[float, int] | None, Any]]:
    """A SamplerOutput as one (token, (logprob, rank) | None, top logprobs) per row."""
    return [(tok, None if result.logprobs is None else (result.logprobs[j], result.ranks[j]), result.top_logprobs[j])
            for j, tok in enumerate(result.token_ids)]
