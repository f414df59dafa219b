"""POST /v1/chat/completions: ``OpenAIServingChat``.

The messages go through the model's chat template (with the tools, ``server/tools.py``) on the
engine thread and are tokenized without extra special tokens, as ``LLM.chat`` does. Tool calls
are read back from the reply (``tools.reply_calls``) or, streamed, from its deltas
(``tools.ToolStream``); a choice that ended normally with calls finishes with "tool_calls".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.server import protocol as P
from pagedlm.server import tools as T
from pagedlm.server.errors import APIError
from pagedlm.server.serving import ChoiceState, OpenAIServing, StreamContext, Usage


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool,
                plan: T.ToolPlan | None = None) -> tuple[str, list[int]]:
    """Chat text and its ids, as ``LLM.chat`` does: the template already holds the special tokens."""
    text = T.render_chat(tokenizer, messages, plan or T.ToolPlan("none"), add_generation_prompt)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_finish(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a choice that ended normally called tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason


@dataclass
class _ChatStream(StreamContext):
    plan: T.ToolPlan = field(default_factory=lambda: T.ToolPlan("none"))
    replies: list[T.ToolStream] = field(default_factory=list)  # per choice: its content and tool calls

    def __post_init__(self) -> None:
        super().__post_init__()
        self.replies = [T.ToolStream(self.plan, self.req.parallel_tool_calls) for _ in range(self.params.n)]


class OpenAIServingChat(OpenAIServing):
    chunk_type = P.ChatCompletionChunk
    prompt_param = "messages"

    async def create(self, req: P.ChatCompletionRequest, request: Request) -> Response:
        lora = self.check_request(req)
        try:
            plan = T.plan_tools(req)
        except T.ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from e
        constraint = self.structured(req)
        if plan.structured is not None:
            if constraint is not None:
                raise APIError(400, f"tool_choice {plan.mode!r} constrains the output to a tool call; "
                                    "do not also set response_format or a guided field", param="tool_choice",
                               code="invalid_value")
            constraint = plan.structured
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.make_params(req, max_tokens, logprobs, constraint)
        prompt = await self._render(req, plan)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.start([prompt], params, rid, lora)
        if req.stream:
            return self.streaming_response(_ChatStream(req, params, rid, 1, plan=plan), streams)
        finals = await self.collect(request, streams)
        return self.json_response(None if finals is None else self._response(req, rid, plan, finals[0]))

    async def _render(self, req: P.ChatCompletionRequest, plan: T.ToolPlan) -> tuple[str, list[int]]:
        self.need_tokenizer()
        msgs = T.template_messages(req)
        tok = self.tokenizer
        try:
            return await self.async_engine.call(lambda: render_chat(tok, msgs, req.add_generation_prompt, plan))
        except (ValueError, TypeError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", param="messages", code="invalid_value") from e
        except Exception as e:  # jinja2 errors raised by the model's template (e.g. role order)
            if type(e).__module__.startswith("jinja2"):
                raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                               code="invalid_value") from e
            raise

    def _response(self, req: P.ChatCompletionRequest, rid: str, plan: T.ToolPlan,
                  out: RequestOutput) -> P.ChatCompletionResponse:
        choices = []
        for c in out.outputs:
            content, calls = T.reply_calls(plan, c.text, req.parallel_tool_calls)
            tool_calls = [P.ToolCallOut(id=T.new_call_id(), function=P.FunctionCallOut(name=n, arguments=a))
                          for n, a in calls] or None
            choices.append(P.ChatChoice(
                index=c.index, message=P.ChatMessageOut(content=content, tool_calls=tool_calls),
                finish_reason=_chat_finish(c.finish_reason, bool(calls)), stop_reason=c.stop_reason,
                logprobs=self._logprobs(c, 0, len(c.token_ids), req.top_logprobs or 0) if req.logprobs else None))
        usage = Usage([out])
        return P.ChatCompletionResponse(id=rid, model=self.models.response_name(req.model), choices=choices,
                                        usage=usage.usage(), timings=usage.timings())

    def _logprobs(self, c: CompletionOutput, start: int, end: int, k: int) -> P.ChatLogprobs:
        """Tokens ``start:end`` of ``c``, each with its ``k`` most likely alternatives."""
        content = []
        token_str = self.token_str
        for pos in range(start, end):
            if c.logprobs is None or pos >= len(c.logprobs):
                break
            tok = c.token_ids[pos]
            entry = c.logprobs[pos]
            s = token_str(tok)
            # The k most likely: the engine's entry holds the sampled token and the top k.
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]
            content.append(P.TokenLogprob(
                token=s, logprob=entry[tok].logprob if tok in entry else float("nan"), bytes=list(s.encode()),
                top_logprobs=[P.TopLogprob(token=token_str(t), logprob=v.logprob, bytes=list(token_str(t).encode()))
                              for t, v in top]))
        return P.ChatLogprobs(content=content)

    # ---- streaming hooks ------------------------------------------------------------------------
    def head_choices(self, ctx: _ChatStream) -> list[P.ChatChunkChoice]:
        return [P.ChatChunkChoice(index=ch.index, delta=P.DeltaMessage(role="assistant", content=""))
                for ch in ctx.choices.values()]

    def stream_choice(self, ctx: _ChatStream, ch: ChoiceState, c: CompletionOutput) -> P.ChatChunkChoice | None:
        start, end = ch.take(c)
        reply = ctx.replies[c.index]
        text, calls = reply.update(c.text_delta, c.finish_reason is not None)
        logprobs = self._logprobs(c, start, end, ctx.params.logprobs) if ctx.req.logprobs and end > start else None
        if not (text or calls or logprobs or c.finish_reason):
            return None
        return P.ChatChunkChoice(index=ch.index, delta=P.DeltaMessage(content=text or None, tool_calls=calls or None),
                                 logprobs=logprobs, finish_reason=_chat_finish(c.finish_reason, reply.has_calls),
                                 stop_reason=c.stop_reason)

    def abort_choice(self, index: int) -> P.ChatChunkChoice:
        return P.ChatChunkChoice(index=index, delta=P.DeltaMessage(), finish_reason="abort")
