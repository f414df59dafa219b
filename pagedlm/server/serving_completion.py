"""POST /v1/completions: ``OpenAIServingCompletion``.

Prompts are a string, a list of strings, token ids or a list of token-id lists: one engine
request per prompt, and choice index = prompt index × n + sample index. ``best_of`` samples
more and returns the n with the highest cumulative logprob (not streamable); ``echo`` puts the
prompt in front of the text (streamed: in a first chunk of its own).

``echo`` with ``logprobs`` scores the prompt, as vLLM and OpenAI's legacy API do (evaluation
harnesses rank choices this way): the engine is asked for ``prompt_logprobs``, and each
choice's logprobs cover the prompt's tokens, the first one's null, then the completion's.
Streamed, the prompt's chunk goes first, once its logprobs are known (after the prefill).
``max_tokens: 0`` is allowed with ``echo`` only: the engine generates one token, which is
dropped (the reply is the prompt alone, ``completion_tokens`` 0).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.server import protocol as P
from pagedlm.server.errors import APIError
from pagedlm.server.serving import ChoiceState, OpenAIServing, StreamContext, Usage

Prompt = tuple[str | None, list[int]]  # (text if the request sent text, token ids)
Entry = tuple[int, dict | None]  # a token id and its logprobs entry (None: the first prompt token's)


@dataclass
class _CompletionStream(StreamContext):
    echoes: list[str] | None = None  # each prompt's text, sent first (echo)
    echo_logprobs: bool = False  # echo with logprobs: each prompt is sent once its logprobs are known
    echoed: set[int] = field(default_factory=set)  # the prompts sent so far (echo_logprobs)


class OpenAIServingCompletion(OpenAIServing):
    chunk_type = P.CompletionResponse
    prompt_param = "prompt"

    async def create(self, req: P.CompletionRequest, request: Request) -> Response:
        lora = self.check_request(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix", code="unsupported")
        echo_only = req.echo and req.max_tokens == 0  # the prompt (and its logprobs), no completion
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is accepted with echo only: the prompt alone, "
                                "with its logprobs if asked)", param="max_tokens", code="invalid_value")
        if echo_only and req.min_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must be 0 when max_tokens is 0", param="min_tokens",
                           code="invalid_value")
        best_of = req.best_of if req.best_of is not None else req.n
        if best_of < req.n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({req.n})", param="best_of", code="invalid_value")
        if best_of > req.n and req.stream:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of", code="unsupported")
        if best_of > self.max_num_seqs:
            raise APIError(400, f"best_of={best_of} exceeds the server's --max-num-seqs {self.max_num_seqs}",
                           param="best_of", code="invalid_value")
        # best_of ranks samples by cumulative logprob, so logprobs are computed for it (and shown only if asked).
        logprobs = req.logprobs if best_of == req.n or req.logprobs is not None else 0
        echo_logprobs = req.echo and req.logprobs is not None
        params = self.make_params(req, 1 if echo_only else req.max_tokens, logprobs, n=best_of,
                                  prompt_logprobs=req.logprobs if echo_logprobs else None)
        prompts = await self._prompts(req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.start(prompts, params, rid, lora)
        if req.stream:
            echoes = [await self._prompt_text(p) for p in prompts] if req.echo else None
            ctx = _CompletionStream(req, params, rid, len(prompts), completion=not echo_only, echoes=echoes,
                                    echo_logprobs=echo_logprobs)
            return self.streaming_response(ctx, streams)
        finals = await self.collect(request, streams)
        return self.json_response(None if finals is None else await self._response(req, rid, prompts, finals))

    async def _response(self, req: P.CompletionRequest, rid: str, prompts: list[Prompt],
                        finals: list[RequestOutput]) -> P.CompletionResponse:
        choices = []
        echo_only = req.echo and req.max_tokens == 0
        for i, out in enumerate(finals):
            best = out.outputs
            if len(best) > req.n:  # best_of
                best = sorted(best, key=lambda c: -(c.cumulative_logprob or 0.0))[:req.n]
            echo = (await self._prompt_text(prompts[i])) if req.echo else ""
            for j, c in enumerate(best):
                ch = ChoiceState(i * req.n + j)
                logprobs = None
                if req.logprobs is not None:
                    entries = self._prompt_entries(out) if req.echo else []
                    if not echo_only:
                        entries += self._sample_entries(c, 0, len(c.token_ids))
                    logprobs = self._logprobs(ch, entries)
                choices.append(P.CompletionChoice(
                    index=ch.index, text=echo + ("" if echo_only else c.text), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, logprobs=logprobs))
        usage = Usage(finals, completion=not echo_only)
        return P.CompletionResponse(id=rid, model=self.models.response_name(req.model), choices=choices,
                                    usage=usage.usage(), timings=usage.timings())

    async def _prompt_text(self, prompt: Prompt) -> str:
        text, ids = prompt
        if text is not None:
            return text
        self.need_tokenizer()
        return await self.async_engine.call(lambda: self.tokenizer.decode(ids))

    async def _prompts(self, prompt) -> list[Prompt]:
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt[0], str):
            texts = list(prompt)
        elif isinstance(prompt[0], int):
            return [(None, list(prompt))]
        else:
            return [(None, list(p)) for p in prompt]
        self.need_tokenizer()
        tok = self.tokenizer
        ids = await self.async_engine.call(lambda: [list(tok(t)["input_ids"]) for t in texts])
        return list(zip(texts, ids, strict=True))

    @staticmethod
    def _sample_entries(c: CompletionOutput, start: int, end: int) -> list[Entry]:
        """Tokens ``start:end`` of ``c`` with their logprobs entries."""
        if c.logprobs is None:
            return []
        return [(c.token_ids[pos], c.logprobs[pos]) for pos in range(start, min(end, len(c.logprobs)))]

    @staticmethod
    def _prompt_entries(out: RequestOutput) -> list[Entry]:
        """The prompt's tokens with their logprobs entries (the first token's None: nothing
        precedes it). Copied: the engine may still be appending to a list it has not finished."""
        lps = list(out.prompt_logprobs or [])
        return [(t, lps[k] if k < len(lps) else None) for k, t in enumerate(out.prompt_token_ids)]

    def _logprobs(self, ch: ChoiceState, entries: Iterable[Entry]) -> P.CompletionLogprobs:
        """Tokens in the legacy completions format (advances ``ch.text_offset``): each token's
        text, logprob and top alternatives; null for a token without an entry."""
        lp = P.CompletionLogprobs()
        for tok, entry in entries:
            s = self.token_str(tok)
            lp.tokens.append(s)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                lp.token_logprobs.append(entry[tok].logprob if tok in entry else None)
                top: dict[str, float] = {}
                for t, v in entry.items():  # the chosen token first; ids that decode alike keep the first
                    top.setdefault(self.token_str(t), v.logprob)
                lp.top_logprobs.append(top)
            lp.text_offset.append(ch.text_offset)
            ch.text_offset += len(s)
        return lp

    # ---- streaming hooks ------------------------------------------------------------------------
    def head_choices(self, ctx: _CompletionStream) -> list[P.CompletionChoice]:
        if not ctx.echoes or ctx.echo_logprobs:
            return []
        return [P.CompletionChoice(index=ch.index, text=ctx.echoes[i]) for (i, _), ch in ctx.choices.items()]

    def prompt_choices(self, ctx: _CompletionStream, i: int, out: RequestOutput) -> list[P.CompletionChoice]:
        """Echo with logprobs: prompt ``i`` with its logprobs, once its prefill has scored every
        token (before its first sampled token, which comes in the same output at the earliest)."""
        if not ctx.echo_logprobs or i in ctx.echoed:
            return []
        if not out.finished and len(out.prompt_logprobs or ()) < len(out.prompt_token_ids):
            return []  # a prefill chunk of a long prompt: more to come
        ctx.echoed.add(i)
        entries = self._prompt_entries(out)
        return [P.CompletionChoice(index=ch.index, text=ctx.echoes[i], logprobs=self._logprobs(ch, entries))
                for (k, _), ch in ctx.choices.items() if k == i]

    def stream_choice(self, ctx: _CompletionStream, ch: ChoiceState, c: CompletionOutput) -> P.CompletionChoice | None:
        start, end = ch.take(c)
        if not ctx.completion:  # echo with max_tokens 0: the generated token is dropped
            return P.CompletionChoice(index=ch.index, text="", finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason) if c.finish_reason else None
        logprobs = (self._logprobs(ch, self._sample_entries(c, start, end))
                    if ctx.params.logprobs is not None and end > start else None)
        if not (c.text_delta or logprobs or c.finish_reason):
            return None
        return P.CompletionChoice(index=ch.index, text=c.text_delta, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def abort_choice(self, index: int) -> P.CompletionChoice:
        return P.CompletionChoice(index=index, text="", finish_reason="abort")
