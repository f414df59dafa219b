"""Pydantic models of the OpenAI-compatible API: every request body and every response.

Request models validate types and ranges (an error names the field); unknown fields are
ignored, as OpenAI and vLLM do. Fields the engine cannot honour are declared so that a request
that sets them is refused with a clear message instead of being silently served differently.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]], Field(min_length=1)]
StopField = str | Annotated[list[str], Field(max_length=64)] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# OpenAI request fields that pagedlm cannot honour: a request that sets one (to anything but
# its neutral value) is refused with a 400 naming it, never served as if it were absent.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "functions": (None,),
    "function_call": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
    "store": (None, False), "metadata": (None,),
}


def _refuse_unsupported(data: Any) -> Any:
    if isinstance(data, dict):
        for name, neutral in UNSUPPORTED_FIELDS.items():
            if name in data and data[name] not in neutral:
                raise ValueError(f"{name} is not supported by this server")
    return data


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(None, description="true: unsupported keywords are an error; else they are ignored.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="The served model name; optional when one model is served.")
    n: int = Field(1, ge=1, le=128, description="Number of choices per prompt.")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="0 = greedy. Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopField = Field(None, description="Up to 64 strings; generation stops before them.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema (OpenAI; vLLM accepts it on completions too).")
    # vLLM extras.
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="0 or -1 = off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]], Field(max_length=64)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM: {json | json_object | regex | choice | grammar: ...}.")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM (older name): a JSON schema.")
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = Field(None, description="A Lark grammar (llguidance's dialect).")
    guided_whitespace_pattern: None = Field(None, description="Not supported: must be null.")
    guided_decoding_backend: None = Field(None, description="Not supported: must be null (llguidance is used).")


class CompletionRequest(_SamplingFields):
    _unsupported = model_validator(mode="before")(_refuse_unsupported)
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=64)]
             | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]) = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token id lists.")
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX, description="Default 16; null = up to the context length; "
                                   "0 only with echo (the prompt alone, scored).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top logprobs per token (with echo: the "
                                 "prompt's tokens too, the first one's null).")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (and its tokens to logprobs).")
    suffix: str | None = Field(None, description="Not supported: must be null.")
    best_of: int | None = Field(None, ge=1, le=128, description="Generate best_of samples, return the n likeliest "
                                "(by cumulative logprob); not with stream.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(..., description="The arguments as a JSON string.")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call they answer

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(_Request):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: _FunctionName


class ChatCompletionRequest(_SamplingFields):
    _unsupported = model_validator(mode="before")(_refuse_unsupported)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX,
                                              description="Default: up to the context length.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without.")
    parallel_tool_calls: bool = Field(True, description="false: at most one tool call per choice.")
    # vLLM extras.
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = Field(None, description="Text to tokenize (or give messages).")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = Field(True, description="For prompt; chat text never gets extra special tokens.")
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]


# ---- responses -----------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class Timings(BaseModel):
    """Per-request timings in llama.cpp's names (milliseconds), from the engine's RequestMetrics."""

    queue_ms: float | None = None
    prompt_n: int = 0
    cache_n: int = 0
    prompt_ms: float | None = None
    prompt_per_second: float | None = None
    ttft_ms: float | None = None
    predicted_n: int = 0
    predicted_ms: float | None = None
    predicted_per_token_ms: float | None = None
    predicted_per_second: float | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=lambda v: v is None)
    arguments: str | None = Field(None, exclude_if=lambda v: v is None)


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = Field(None, exclude_if=lambda v: v is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda v: v is None)
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class DeltaMessage(BaseModel):
    """Only the fields that change are sent, as OpenAI does (the last delta is ``{}``)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedlm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """vLLM's ``GET /tokenizer_info``: the tokenizer's configuration (its ``tokenizer_config.json``
    as loaded: special tokens, ``added_tokens_decoder``, ``chat_template``, ...) and its class.
    Only what the tokenizer holds; fields it does not know are absent."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class HealthResponse(BaseModel):
    status: str
    # Each decode batch bucket: compiled, compiling (built in the background; eager meanwhile) or
    # eager. None with --enforce-eager.
    decode_buckets: dict[str, str] | None = None
