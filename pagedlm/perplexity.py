"""Perplexity of a model on a text, with a sliding window (``pagedlm perplexity``).

The text is tokenized once (a BOS token first where the tokenizer adds one). Windows of ``ctx``
tokens start every ``stride`` tokens; each window is one request with ``prompt_logprobs``, and
only its tokens not scored by an earlier window count (the first window scores all but its first
token; later ones their last ``stride``). So every token past the first is scored exactly once,
with at least ``ctx - stride`` tokens of context once the first window is past (as llama.cpp's
``llama-perplexity`` does with its half-window, and HF's strided recipe). PPL = exp(mean NLL).

The logits come from the engine's ordinary prefill path: a quantized model is measured with the
weights it decodes with (the dense GEMM there multiplies their exact dequantization).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats per token)
    num_tokens: int  # tokens scored
    seconds: float
    top1: list[int] = field(default_factory=list)  # the model's likeliest token at each scored position

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else math.nan


def perplexity(engine, token_ids: list[int], ctx: int = 512, stride: int | None = None) -> PerplexityResult:
    from pagedlm.sampling_params import SamplingParams

    stride = ctx // 2 if stride is None else stride
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
    if not isinstance(stride, int) or not 1 <= stride <= ctx - 1:
        raise ValueError(f"stride must be an integer in [1, ctx - 1], got {stride!r}")
    if ctx >= engine.max_model_len:
        raise ValueError(f"ctx {ctx} does not fit the engine's max_model_len {engine.max_model_len}")
    if len(token_ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, detokenize=False)
    total, count, top1 = 0.0, 0, []
    scored_to = 1  # tokens [0, scored_to) are done (token 0 has no prediction)
    t0 = time.perf_counter()
    start = 0
    while scored_to < len(token_ids):
        window = token_ids[start:start + ctx]
        rid = f"ppl-{start}"
        engine.add_request(rid, None, params, prompt_token_ids=window)
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    out = o
        # prompt_logprobs[i] scores window[i] given window[:i]; entry 0 is None.
        for i in range(max(1, scored_to - start), len(window)):
            entry = out.prompt_logprobs[i]
            tok = window[i]
            total -= entry[tok].logprob
            top1.append(next((t for t, lp in entry.items() if lp.rank == 1), tok))
            count += 1
        scored_to = start + len(window)
        start += stride
        if start + ctx > len(token_ids):  # last window: align its end with the text's end
            start = max(0, len(token_ids) - ctx)
    seconds = time.perf_counter() - t0
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, seconds, top1)
