"""Tool calling for /v1/chat/completions: the prompt, the constraint, and reading the calls back.

* **Prompt.** Tools go to the model's chat template (``apply_chat_template(tools=...)``), in the
  format that template defines. A template that ignores ``tools`` (SmolLM2's, for one) gets
  them in a system message in the Hermes format instead, and earlier tool calls and tool
  results are written into the turns as ``<tool_call>`` / ``<tool_response>`` text.
* **tool_choice.** ``none``: tools are not shown and nothing is parsed. ``auto``: free text,
  parsed afterwards (formats below). A named function: the output is the arguments object,
  grammar-constrained to that function's ``parameters`` schema. ``required``: the output is a
  JSON array (``[{"name": ..., "parameters": {...}}, ...]``, one item when
  ``parallel_tool_calls`` is false) constrained to the tools' names and schemas.
* **Formats parsed for auto**: Hermes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (any number, text around them is content), and a bare JSON reply that is one such
  object or a list of them (``arguments`` or ``parameters``). A call naming an unknown tool, or
  whose JSON does not parse, is left as text content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedlm.sampling_params import StructuredOutputsParams
from pagedlm.server import protocol as P
from pagedlm.tokenizer import apply_chat_template

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)


class ToolError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects, for the template
    named: str | None = None
    structured: StructuredOutputsParams | None = None

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def _params_schema(fn: P.FunctionDef) -> dict[str, Any]:
    return fn.parameters if fn.parameters else {"type": "object", "properties": {}}


def plan_tools(req: P.ChatCompletionRequest) -> ToolPlan:
    """What the request's tools and tool_choice ask for; ToolError (a 400) when inconsistent."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise ToolError("tool_choice", f"tool_choice {choice if isinstance(choice, str) else 'function'!r} "
                                       "needs a non-empty tools list")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ToolError("tools", "tool function names must be unique")
    if choice == "none":
        return ToolPlan("none")
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    by_name = {t.function.name: t.function for t in tools}
    if choice == "auto":
        return ToolPlan("auto", dumped)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": _params_schema(f)},
                  "required": ["name", "parameters"], "additionalProperties": False} for n, f in by_name.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", dumped, structured=_compile(schema, all(f.strict for f in by_name.values())))
    name = choice.function.name
    if name not in by_name:
        raise ToolError("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
    fn = by_name[name]
    return ToolPlan("named", dumped, named=name, structured=_compile(_params_schema(fn), bool(fn.strict)))


def _compile(schema: dict[str, Any], strict: bool) -> StructuredOutputsParams:
    """The constraint of a tool call. As for response_format, only ``strict`` functions refuse
    schema keywords the grammar compiler does not implement; the others have them ignored."""
    if not strict:
        schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "lenient": True}}
    try:
        return StructuredOutputsParams(json=schema)
    except (ValueError, TypeError) as e:
        raise ToolError("tools", f"a tool's parameters schema is not usable: {e}") from e


# ---- the prompt -------------------------------------------------------------------------------
def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as chat templates expect them (tool call arguments as objects)."""
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name,
                                             "arguments": _arguments_value(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions. The available tools are:\n<tools>\n" + listing + "\n</tools>\n"
            "To call a tool, reply with one block per call: "
            '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>')


def _as_plain_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools and tool turns written as text, for a template that knows nothing of tools."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = "".join(f"{TOOL_CALL_OPEN}{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"
                             for c in calls)
            m["content"] = (m.get("content") or "") + blocks
        if m["role"] == "tool":
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        out.append(m)
    prompt = _hermes_system_prompt(tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def render_chat(tokenizer, messages: list[dict[str, Any]], plan: ToolPlan, add_generation_prompt: bool) -> str:
    """The chat text: the template's own tool format when it has one, else the Hermes fallback."""
    if not plan.tools:
        return apply_chat_template(tokenizer, messages, add_generation_prompt)
    with_tools = apply_chat_template(tokenizer, messages, add_generation_prompt, tools=plan.tools)
    plain = [{k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")} for m in messages]
    if with_tools != apply_chat_template(tokenizer, plain, add_generation_prompt):
        return with_tools
    return apply_chat_template(tokenizer, _as_plain_turns(messages, plan.tools), add_generation_prompt)


# ---- reading calls back -----------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from_obj(obj: Any, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _calls_from_json(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_obj(o, names) for o in items]
    return calls if calls and all(c is not None for c in calls) else None


def parse_auto(text: str, names: set[str], parallel: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments JSON)]) of a free-text reply."""
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        calls = _calls_from_json(stripped, names)
        if calls:
            return None, calls[: None if parallel else 1]
    if TOOL_CALL_OPEN not in text:
        return text, []
    calls, content, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _calls_from_json(m.group(1), names)
        if call is None or len(call) != 1:
            return text, []  # a malformed block: the reply is text, as written
        content.append(text[pos:m.start()])
        calls.append(call[0])
        pos = m.end()
    content.append(text[pos:])
    rest = "".join(content)
    return (rest if rest.strip() else None), calls[: None if parallel else 1]


def streamable_prefix(text: str) -> int:
    """How much of a running auto reply can be sent as content now: not a reply that may be
    bare JSON, nothing from a ``<tool_call>`` on, nor a tail that may start one."""
    if text.lstrip()[:1] in ("{", "[") or (not text.strip() and text):
        return 0
    i = text.find(TOOL_CALL_OPEN)
    if i != -1:
        return i
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(TOOL_CALL_OPEN[:k]):
            return len(text) - k
    return len(text)


def calls_from_constrained(text: str, plan: ToolPlan) -> list[tuple[str, str]] | None:
    """The calls of a grammar-constrained reply (None when it was cut short, e.g. by max_tokens).
    Arguments are the text as generated, as a stream sends them."""
    try:
        json.loads(text)
    except ValueError:
        return None
    if plan.mode == "named":
        return [(plan.named, text)]
    return [(name, args) for name, args, _ in required_calls(text)]


def _string_end(text: str, i: int) -> int | None:
    """Index after the JSON string that starts at ``text[i]`` (a quote); None if unfinished."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Index after the JSON value that starts at ``text[i]``; None while it is unfinished."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}] \t\r\n":
            j += 1
        return j if j < len(text) else None  # a number may go on
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == '"':
            end = _string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def required_calls(text: str) -> list[tuple[str | None, str, bool]]:
    """The calls of a ``required`` reply so far, in order: (name or None while unknown, the
    arguments' text as generated so far, whether they are complete). The grammar makes the reply
    a JSON array of ``{"name": ..., "parameters": {...}}`` objects."""
    calls: list[list] = []
    _scan_items(text, calls)
    return [tuple(c) for c in calls]


def _scan_items(text: str, calls: list[list]) -> None:
    """``required_calls``'s scan: appends [name, arguments, complete] per item; returns where
    the text ends (mid-item) or at the array's end."""
    start = text.find("[")
    i = start + 1 if start >= 0 else len(text)
    while i < len(text):
        ch = text[i]
        if ch != "{":
            i += 1  # whitespace and commas between items
            if ch == "]":
                return
            continue
        call = [None, "", False]
        calls.append(call)
        i += 1
        while i < len(text):  # the item's members: "key": value, ...
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "}":
                i += 1
                break
            key_end = _string_end(text, i) if text[i] == '"' else None
            colon = text.find(":", key_end) if key_end is not None else -1
            if colon < 0:
                return
            v = colon + 1
            while v < len(text) and text[v] in " \t\r\n":
                v += 1
            if v >= len(text):
                return
            end = _value_end(text, v)
            key = json.loads(text[i:key_end])
            if key == "name" and end is not None:
                call[0] = json.loads(text[v:end])
            elif key == "parameters":
                call[1], call[2] = text[v:end if end is not None else len(text)], end is not None
            if end is None:
                return
            i = end


def reply_calls(plan: ToolPlan, text: str, parallel: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, calls) of a finished reply under ``plan``."""
    if plan.mode == "none":
        return text, []
    if plan.mode == "auto":
        return parse_auto(text, plan.names, parallel)
    calls = calls_from_constrained(text, plan)
    return (text, []) if calls is None else (None, calls)


class ToolStream:
    """One streamed choice: which content and tool-call deltas to send as its text grows.

    Named and required choices stream each call's arguments as they are generated (a call's
    header, with its id and name, as soon as the name is complete); auto streams content up to a
    possible tool call and sends the calls when the reply ends.
    """

    def __init__(self, plan: ToolPlan, parallel: bool = True):
        self.plan, self.parallel = plan, parallel
        self.text = ""  # the reply so far (the engine's text deltas, joined)
        self.sent = 0
        self.call_id = new_call_id() if plan.mode == "named" else None
        self.has_calls = plan.mode == "named"
        self.streamed: list[list] = []  # required: per call sent, [id, arguments characters sent]

    def _required_deltas(self) -> list[P.ToolCallDelta]:
        deltas = []
        for k, (name, args, _) in enumerate(required_calls(self.text)):
            if name is None:
                break  # calls go out in order, each once its name is known
            if k == len(self.streamed):
                self.streamed.append([new_call_id(), 0])
                deltas.append(P.ToolCallDelta(index=k, id=self.streamed[k][0], type="function",
                                              function=P.FunctionCallDelta(name=name, arguments="")))
            if len(args) > self.streamed[k][1]:
                deltas.append(P.ToolCallDelta(index=k, function=P.FunctionCallDelta(
                    arguments=args[self.streamed[k][1]:])))
                self.streamed[k][1] = len(args)
        self.has_calls = bool(self.streamed)
        return deltas

    def update(self, delta: str, finished: bool) -> tuple[str, list[P.ToolCallDelta]]:
        """(content, tool-call deltas) to send for the reply's next ``delta`` of text."""
        self.text += delta
        text = self.text
        if self.plan.mode == "named":
            deltas = []
            if self.sent == 0 and (text or finished):
                deltas.append(P.ToolCallDelta(index=0, id=self.call_id, type="function",
                                              function=P.FunctionCallDelta(name=self.plan.named, arguments="")))
            if len(text) > self.sent:
                deltas.append(P.ToolCallDelta(index=0, function=P.FunctionCallDelta(arguments=text[self.sent:])))
                self.sent = len(text)
            return "", deltas
        if self.plan.mode == "required" and (not finished or self.streamed or calls_from_constrained(text, self.plan)):
            # (a reply cut short before any call had its name is sent as content, as unstreamed)
            return "", self._required_deltas()
        if not finished:
            ready = {"none": len(text), "auto": streamable_prefix(text)}.get(self.plan.mode, 0)
            delta = text[self.sent:ready] if ready > self.sent else ""
            self.sent = max(self.sent, ready)
            return delta, []
        content, calls = reply_calls(self.plan, text, self.parallel)
        self.has_calls = bool(calls)
        rest = (content or "")[self.sent:]
        self.sent = len(content or "")
        return rest, [P.ToolCallDelta(index=k, id=new_call_id(), type="function",
                                      function=P.FunctionCallDelta(name=name, arguments=args))
                      for k, (name, args) in enumerate(calls)]
