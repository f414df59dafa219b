"""The offline API, in vLLM's shapes: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from typing import Any

from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.lora import LoRARequest
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.tokenizer import apply_chat_template

PromptType = str | dict[str, Any]


class LLM:
    """Load a model (HF directory, .gguf file, or None for the default SmolLM2) and generate.

    Keyword arguments are ``EngineConfig`` fields: dtype, block_size, kv_cache_memory,
    max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, seed, enable_lora,
    max_loras, max_lora_rank, lora_modules, ...
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """``lora_request``: one adapter for every prompt, or one (or None: the base model) per
        prompt; the engine needs ``enable_lora=True`` (or ``lora_modules``)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        loras = self._per_prompt_lora(lora_request, len(prompts))
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"gen-{next(self._ids)}"
                if isinstance(prompt, dict):
                    if "prompt_token_ids" in prompt:
                        self.engine.add_request(rid, prompt.get("prompt"), p, prompt_token_ids=prompt["prompt_token_ids"],
                                                lora_request=lora)
                    elif "prompt" in prompt:
                        self.engine.add_request(rid, prompt["prompt"], p, lora_request=lora)
                    else:
                        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
                else:
                    self.engine.add_request(rid, prompt, p, lora_request=lora)
                ids.append(rid)
        except Exception:
            for rid in ids:  # do not leave half a batch queued
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    @staticmethod
    def _per_prompt_lora(lora_request, n: int) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        if isinstance(lora_request, (str, bytes)) or not isinstance(lora_request, Seq):
            raise TypeError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")
        if len(lora_request) != n:
            raise ValueError(f"got {len(lora_request)} lora_requests for {n} prompts")
        return list(lora_request)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | None = None) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text = apply_chat_template(tok, conv, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        eng = self.engine
        t0 = time.perf_counter()
        p0, d0 = eng.stats["prefill_tokens"], eng.stats["decode_tokens"]
        wanted = set(ids)
        try:
            while len(done) < len(ids) and eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if eng.dead is not None:  # a model rank died: its requests ended with an error
                    raise eng.dead
                if bar is not None:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"prefill {(eng.stats['prefill_tokens'] - p0) / dt:.0f} tok/s, "
                                        f"decode {(eng.stats['decode_tokens'] - d0) / dt:.0f} tok/s", refresh=False)
        except BaseException:
            for rid in ids:
                if rid not in done and rid in eng.requests:
                    eng.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]
