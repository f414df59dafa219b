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


class RequiredCallScanner:
    """Reads a ``required`` reply as it grows, each character once: the grammar makes it a JSON
    array of ``{"name": ..., "parameters": {...}}`` objects. ``calls``: per item so far, [name
    (None until complete), start of its "parameters" value, end of that value (None until
    complete)]."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[list] = []
        self._i = 0  # next character to read
        self._depth = 0  # open brackets: 1 inside the array, 2 inside an item
        self._in_str = self._esc = False
        self._str_start = 0
        self._key: str | None = None  # the item member being read
        self._value: int | None = None  # where its value starts

    def feed(self, delta: str) -> None:
        self.text += delta
        t = self.text
        while self._i < len(t):
            i, ch = self._i, t[self._i]
            self._i += 1
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                    if self._depth == 2 and self._value is None:
                        self._key = json.loads(t[self._str_start:i + 1])
                    elif self._depth == 2:
                        self._end_value(i + 1)  # a string value
                continue
            if self._depth == 2 and self._key is not None and self._value is None:
                if ch in " \t\r\n:":
                    continue
                self._value = i
                if self._key == "parameters":
                    self.calls[-1][1] = i
            elif self._depth == 2 and self._value is not None and t[self._value] not in '"{[' and ch in ",} \t\r\n":
                self._end_value(i)  # a number, true, false or null
            if ch == '"':
                self._in_str, self._str_start = True, i
            elif ch in "{[":
                self._depth += 1
                if self._depth == 2 and ch == "{":
                    self.calls.append([None, None, None])
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 2 and self._value is not None:
                    self._end_value(i + 1)  # an object or array value

    def _end_value(self, end: int) -> None:
        call = self.calls[-1]
        if self._key == "name":
            call[0] = json.loads(self.text[self._value:end])
        elif self._key == "parameters":
            call[2] = end
        self._key = self._value = None

    def current(self) -> list[tuple[str | None, str, bool]]:
        """(name or None, the arguments' text so far, whether they are complete) per call."""
        return [(name, "" if a is None else self.text[a:len(self.text) if b is None else b], b is not None)
                for name, a, b in self.calls]


def required_calls(text: str) -> list[tuple[str | None, str, bool]]:
    """The calls of a ``required`` reply so far (``RequiredCallScanner.current``)."""
    scanner = RequiredCallScanner()
    scanner.feed(text)
    return scanner.current()


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
        self.scanner = RequiredCallScanner() if plan.mode == "required" else None

    def _required_deltas(self) -> list[P.ToolCallDelta]:
        deltas = []
        for k, (name, args, _) in enumerate(self.scanner.current()):
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
        if self.scanner is not None:
            self.scanner.feed(delta)
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
