"""POST /tokenize and /detokenize: ``OpenAIServingTokenization`` (vLLM's extension routes).

The tokenizer runs on the engine thread, like every other use of it in the server.
"""

from __future__ import annotations

from pagedlm.server import protocol as P
from pagedlm.server.errors import APIError
from pagedlm.server.serving import OpenAIServing
from pagedlm.server.serving_chat import render_chat


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        self.models.check(req.model)
        self.need_tokenizer()
        tok = self.tokenizer
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = await self.async_engine.call(lambda: render_chat(tok, msgs, req.add_generation_prompt)[1])
        else:
            ids = await self.async_engine.call(
                lambda: list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]))
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.models.max_model_len)

    async def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        self.models.check(req.model)
        self.need_tokenizer()
        bad = [t for t in req.tokens if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param="tokens", code="invalid_value")
        text = await self.async_engine.call(lambda: self.tokenizer.decode(req.tokens))
        return P.DetokenizeResponse(prompt=text)
