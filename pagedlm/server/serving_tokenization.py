"""POST /tokenize, /detokenize and GET /tokenizer_info: ``OpenAIServingTokenization`` (vLLM's
extension routes).

The tokenizer runs on the engine thread, like every other use of it in the server.
"""

from __future__ import annotations

from typing import Any

from pagedlm.server import protocol as P
from pagedlm.server.errors import APIError
from pagedlm.server.serving import OpenAIServing
from pagedlm.server.serving_chat import render_chat

# Paths on the server's disk, not configuration (vLLM drops the first two as well).
_PATH_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "special_tokens_map_file")
# transformers' model_max_length when the tokenizer's files do not give one: "unknown", not a limit.
_UNKNOWN_MAX_LENGTH = int(1e30)
_DROP = object()


def _jsonable(value: Any) -> Any:
    """``value`` as JSON: an ``AddedToken`` as its text (as vLLM gives it), dict keys as strings;
    ``_DROP`` for what has no JSON form (left out rather than invented)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(getattr(value, "content", None), str):  # tokenizers.AddedToken
        return value.content
    if isinstance(value, dict):
        out = {str(k): _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_jsonable, value) if v is not _DROP]
    return _DROP


def tokenizer_config(tokenizer) -> dict[str, Any]:
    """What ``GET /tokenizer_info`` returns: the configuration the tokenizer was loaded with
    (``init_kwargs``: its ``tokenizer_config.json``) without file paths, its chat template and
    its class name, as vLLM's endpoint does. A ``model_max_length`` that is transformers'
    "unknown" placeholder is left out."""
    config = {k: v for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items() if k not in _PATH_KEYS}
    live = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(live, dict):  # the tokenizer's own, also when built from GGUF metadata (its init_kwargs: {})
        config["added_tokens_decoder"] = live
    config = _jsonable(config)
    if isinstance(config.get("model_max_length"), (int, float)) and config["model_max_length"] >= _UNKNOWN_MAX_LENGTH:
        del config["model_max_length"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:  # the template chat requests are rendered with
        config["chat_template"] = template
    config["tokenizer_class"] = type(tokenizer).__name__
    return config


class OpenAIServingTokenization(OpenAIServing):
    _info: P.TokenizerInfoResponse | None = None

    async def tokenizer_info(self) -> P.TokenizerInfoResponse:
        if self.tokenizer is None:
            raise APIError(404, "this model has no tokenizer (it takes token-id prompts only)",
                           type="not_found_error", code="no_tokenizer")
        if self._info is None:  # the configuration never changes: read it once
            tok = self.tokenizer
            self._info = P.TokenizerInfoResponse(**await self.async_engine.call(lambda: tokenizer_config(tok)))
        return self._info

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
