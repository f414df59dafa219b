"""POST /v1/completions: ``OpenAIServingCompletion``.

Prompts are a string, a list of strings, token ids or a list of token-id lists: one engine
request per prompt, and choice index = prompt index × n + sample index. ``best_of`` samples
more and returns the n with the highest cumulative logprob (not streamable); ``echo`` puts the
prompt in front of the text (streamed: in a first chunk of its own).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.server import protocol as P
from pagedlm.server.errors import APIError
from pagedlm.server.serving import ChoiceState, OpenAIServing, StreamContext, Usage

Prompt = tuple[str | None, list[int]]  # (text if the request sent text, token ids)


@dataclass
class _CompletionStream(StreamContext):
    echoes: list[str] | None = None  # each prompt's text, sent first (echo)


class OpenAIServingCompletion(OpenAIServing):
    chunk_type = P.CompletionResponse
    prompt_param = "prompt"

    async def create(self, req: P.CompletionRequest, request: Request) -> Response:
        lora = self.check_request(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix", code="unsupported")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not returned here)",
                           param="echo", code="unsupported")
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
        params = self.make_params(req, req.max_tokens, logprobs, n=best_of)
        prompts = await self._prompts(req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.start(prompts, params, rid, lora)
        if req.stream:
            echoes = [await self._prompt_text(p) for p in prompts] if req.echo else None
            ctx = _CompletionStream(req, params, rid, len(prompts), echoes=echoes)
            return self.streaming_response(ctx, streams)
        finals = await self.collect(request, streams)
        return self.json_response(None if finals is None else await self._response(req, rid, prompts, finals))

    async def _response(self, req: P.CompletionRequest, rid: str, prompts: list[Prompt],
                        finals: list[RequestOutput]) -> P.CompletionResponse:
        choices = []
        for i, out in enumerate(finals):
            best = out.outputs
            if len(best) > req.n:  # best_of
                best = sorted(best, key=lambda c: -(c.cumulative_logprob or 0.0))[:req.n]
            echo = (await self._prompt_text(prompts[i])) if req.echo else ""
            for j, c in enumerate(best):
                ch = ChoiceState(i * req.n + j)
                choices.append(P.CompletionChoice(
                    index=ch.index, text=echo + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=self._logprobs(c, ch, 0, len(c.token_ids)) if req.logprobs is not None else None))
        usage = Usage(finals)
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

    def _logprobs(self, c: CompletionOutput, ch: ChoiceState, start: int, end: int) -> P.CompletionLogprobs:
        """Tokens ``start:end`` of ``c`` in the legacy completions format (advances ``ch.text_offset``)."""
        lp = P.CompletionLogprobs()
        for pos in range(start, end):
            if c.logprobs is None or pos >= len(c.logprobs):
                break
            tok = c.token_ids[pos]
            entry = c.logprobs[pos]
            s = self.token_str(tok)
            lp.tokens.append(s)
            lp.token_logprobs.append(entry[tok].logprob if tok in entry else None)
            top: dict[str, float] = {}
            for t, v in entry.items():  # the sampled token first; ids that decode alike keep the first
                top.setdefault(self.token_str(t), v.logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(ch.text_offset)
            ch.text_offset += len(s)
        return lp

    # ---- streaming hooks ------------------------------------------------------------------------
    def head_choices(self, ctx: _CompletionStream) -> list[P.CompletionChoice]:
        if not ctx.echoes:
            return []
        return [P.CompletionChoice(index=ch.index, text=ctx.echoes[i]) for (i, _), ch in ctx.choices.items()]

    def stream_choice(self, ctx: _CompletionStream, ch: ChoiceState, c: CompletionOutput) -> P.CompletionChoice | None:
        start, end = ch.take(c)
        logprobs = self._logprobs(c, ch, start, end) if ctx.params.logprobs is not None and end > start else None
        if not (c.text_delta or logprobs or c.finish_reason):
            return None
        return P.CompletionChoice(index=ch.index, text=c.text_delta, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def abort_choice(self, index: int) -> P.CompletionChoice:
        return P.CompletionChoice(index=index, text="", finish_reason="abort")
