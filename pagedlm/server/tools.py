"""Tool calling for /v1/chat/completions: the prompt, the constraint, and reading the calls back.

* **Prompt.** Tools go to the model's chat template (``apply_chat_template(tools=...)``), in the
  format that template defines. A template that ignores ``tools`` (SmolLM2's, for one) gets
  them in a system message in the Hermes format instead, and earlier tool calls and tool
  results are written into the turns as ``<tool_call>`` / ``<tool_response>`` text.
* **tool_choice.** ``none``: tools are not shown and nothing is parsed. ``auto``: free text,
  read for calls as it is generated (``AutoCallScanner``). A named function: the output is the
  arguments object, grammar-constrained to that function's ``parameters`` schema.
  ``required``: the output is a JSON array (``[{"name": ..., "parameters": {...}}, ...]``, one
  item when ``parallel_tool_calls`` is false) constrained to the tools' names and schemas.
  Forced calls allow no properties beyond those a schema lists unless it says otherwise
  (``closed_objects``); one cut short (``max_tokens``) is still a call, with the arguments
  generated so far and ``finish_reason`` "length", streamed or not.
* **Formats read for auto**: Hermes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (any number, text around them is content), and a bare JSON reply that is one such
  object or a list of them (``arguments`` or ``parameters``). A block naming an unknown tool, or
  that is not a call object, is left as text content.
* **Streaming.** Every mode sends a call's header once its name is known, then its arguments'
  text as it grows (``ToolStream``); the finished reply is read by the same scanners, so the
  joined stream equals it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedlm.sampling_params import StructuredOutputsParams
from pagedlm.server import protocol as P
from pagedlm.tokenizer import apply_chat_template

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


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


# Where a JSON schema holds subschemas: maps of them, one of them, or lists of them. Values under
# other keywords (const, enum, default, examples) are data and are never touched.
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
              "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")


def closed_objects(schema: Any, close: bool = True) -> Any:
    """A copy of ``schema`` in which every object schema that lists its properties
    (``properties`` / ``patternProperties``) but does not say whether others are allowed
    (``additionalProperties``, ``unevaluatedProperties``) allows none, as vLLM's grammar
    backends read a tool's schema (xgrammar's strict mode). Without it, a small model forced to
    call a function can add properties of its own, nested ever deeper, until ``max_tokens``.
    The members of an ``allOf`` are left open (``close=False``): closing each would forbid the
    properties the others declare."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed_objects(sub, close=False) for sub in out["allOf"]]
    if (close and ("properties" in out or "patternProperties" in out)
            and "additionalProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def _params_schema(fn: P.FunctionDef) -> dict[str, Any]:
    """The schema a forced call's arguments are constrained to: the function's ``parameters``
    with no properties beyond those it lists (``closed_objects``), ``{}`` without parameters."""
    return closed_objects(fn.parameters if fn.parameters else {"type": "object", "properties": {}})


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
    """(content, [(name, arguments)]) of a finished free-text reply (``AutoCallScanner``);
    content is None when it is only whitespace."""
    scanner = AutoCallScanner(names, parallel)
    scanner.feed(text)
    scanner.finish()
    return (scanner.content if scanner.content.strip() else None), scanner.current()


def calls_from_constrained(text: str, plan: ToolPlan) -> list[tuple[str, str]] | None:
    """The calls of a grammar-constrained reply, arguments as the text generated (as a stream
    sends them). A reply cut short (``max_tokens``, a stop string) keeps the calls begun, the
    last one with its arguments cut, as OpenAI returns a forced call cut by ``max_tokens`` and
    as the stream has already sent them; None only for a ``required`` reply cut before its
    first call had a name (its text is then content)."""
    if plan.mode == "named":
        return [(plan.named, text)]
    return [(name, args) for name, args, _ in required_calls(text) if name is not None] or None


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


# ---- auto: reading calls out of free text as it grows -----------------------------------------
_WS = " \t\r\n"
MORE, NO = "more", "no"
# How a streamable call starts, token by token (whitespace between); None: the name, a JSON string.
_HEAD: list[tuple[str, ...] | None] = [("{",), ('"name"',), (":",), None, (",",), ('"arguments"', '"parameters"'),
                                       (":",), ("{",)]


def _string_end(text: str, i: int) -> int | None:
    """The end of the JSON string opening at ``text[i]`` (after its closing quote); None if open."""
    esc = False
    for j in range(i + 1, len(text)):
        if esc:
            esc = False
        elif text[j] == "\\":
            esc = True
        elif text[j] == '"':
            return j + 1
    return None


def match_call_head(text: str, i: int, names: set[str]) -> str | tuple[str, int]:
    """Whether ``text[i:]`` starts a streamable call, ``{"name": <a tool>, "arguments": {`` (or
    ``"parameters"``; whitespace anywhere between): (name, where its arguments object starts),
    MORE while it still may, NO once it cannot."""
    name_limit = 6 * max(map(len, names), default=0) + 2  # the longest name, every character escaped
    name = ""
    for want in _HEAD:
        while i < len(text) and text[i] in _WS:
            i += 1
        if i == len(text):
            return MORE
        if want is None:
            end = _string_end(text, i) if text[i] == '"' else -1
            if end is None:
                return MORE if len(text) - i <= name_limit else NO
            try:
                name = json.loads(text[i:end]) if end != -1 else None
            except ValueError:
                name = None
            if name not in names:
                return NO
            i = end
            continue
        lit = next((w for w in want if text.startswith(w, i)), None)
        if lit is None:
            rest = text[i:]
            return MORE if any(len(rest) < len(w) and w.startswith(rest) for w in want) else NO
        i += len(lit)
    return name, i - 1


class _JsonSpan:
    """Where a JSON value (or the rest of one, ``depth`` brackets in) closes, reading each
    character once. ``stop``: a tag that, outside strings, ends it early (a block's
    ``</tool_call>`` after arguments whose brackets never close)."""

    def __init__(self, start: int, depth: int = 0, stop: str | None = None):
        self.i, self.depth, self.stop = start, depth, stop
        self.in_str = self.esc = False

    def scan(self, text: str) -> tuple[int, bool] | None:
        """(its end, whether the stop tag ended it) once it closes; None while open."""
        while self.i < len(text):
            ch = text[self.i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == "<" and self.stop:
                if text.startswith(self.stop, self.i):
                    return self.i, True
                if self.stop.startswith(text[self.i:]):
                    return None  # may be the tag: wait for more text
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.i += 1
                    return self.i, False
            self.i += 1
        return None


@dataclass
class _Call:
    name: str
    start: int = 0  # streamed: where its arguments' text starts in the reply
    end: int | None = None  # ... and ends (None while it grows)
    args: str | None = None  # read whole: the arguments, re-serialised


class AutoCallScanner:
    """Reads an ``auto`` reply as it grows and decides each piece of it once, as early as it can.

    * Content: the text outside calls. A tail that may begin a ``<tool_call>`` tag is held back
      until it is decided, and so is a reply that starts with ``{`` / ``[`` (it may be bare JSON).
    * A call is recognised by its start, ``{"name": <a tool>, "arguments": {`` (or
      ``"parameters"``), in a ``<tool_call>`` block or as a bare JSON reply (an object, or a list
      of them): from there it is a call, and its arguments are the text of that object as
      generated, growing until it closes (or its block, or the reply, ends). As with OpenAI's,
      they are not guaranteed to be valid JSON. The rest of its block (or object) is not content.
    * A block, or bare JSON, that starts otherwise is held until it ends and then read whole: a
      JSON call (any key order; arguments an object or a JSON string) is a call, with its
      arguments re-serialised; anything else is content, as written.

    A stream and the finished reply read the same decisions, so they agree whatever the
    chunking. ``parallel=False`` keeps the first call and drops later ones.
    """

    def __init__(self, names: set[str], parallel: bool = True):
        self.names, self.parallel = names, parallel
        self.text = ""
        self.content = ""  # the decided content
        self.calls: list[_Call] = []
        self._mode = "start"
        self._mark = 0  # where the text not yet decided starts
        self._i = 0  # text and block modes: where to look for a tag next
        self._item = 0  # where the block's body, or the JSON value, being read starts
        self._block = False  # the call being read is in a <tool_call> block (else bare JSON)
        self._in_list = False  # the bare JSON is a list
        self._span: _JsonSpan | None = None
        self._call: _Call | None = None  # the call whose arguments are being read

    def current(self) -> list[tuple[str, str]]:
        """(name, its arguments' text so far) per call."""
        return [(c.name, c.args if c.args is not None
                 else self.text[c.start:c.end if c.end is not None else self._span.i]) for c in self.calls]

    def feed(self, delta: str) -> None:
        self.text += delta
        while self._step():
            pass

    def finish(self) -> None:
        """The reply ended (also when cut short): decide what is still open."""
        t = self.text
        if self._mode.endswith("_whole"):
            self._whole(len(t))
        elif self._mode in ("args", "tail", "list"):
            if self._call is not None and self._call.end is None:
                self._call.end = len(t)  # cut inside its arguments
            self._mark = len(t)
        self._to_content(len(t))  # text, an undecided start: content as written
        self._mode = "done"

    # -- pieces -----------------------------------------------------------------------------
    def _to_content(self, end: int) -> None:
        self.content += self.text[self._mark:end]
        self._mark = end

    def _add(self, call: _Call) -> _Call | None:
        if self.parallel or not self.calls:
            self.calls.append(call)
            return call
        return None

    def _whole(self, end: int, body_end: int | None = None) -> None:
        """The block or JSON value from ``_item`` is complete (up to ``end``): its calls, or content."""
        calls = _calls_from_json(self.text[self._item:end if body_end is None else body_end].strip(), self.names)
        if calls and (len(calls) == 1 or self._mode == "bare_whole"):
            for name, args in calls:
                self._add(_Call(name, args=args))
            self._mark = end
        else:
            self._to_content(end)

    def _to_text(self, at: int) -> bool:
        self._mode, self._i, self._call = "text", at, None
        return True

    # -- the state machine ------------------------------------------------------------------
    def _step(self) -> bool:
        """Read on; False when it needs more text."""
        t, mode = self.text, self._mode
        if mode == "start":
            i = len(t) - len(t.lstrip(_WS))
            if i == len(t):
                return False
            self._block, self._in_list, self._item = False, t[i] == "[", i
            self._mode = "bare_head" if t[i] in "{[" else "text"
            return True
        if mode == "text":
            return self._text()
        if mode.endswith("_head"):
            return self._head()
        if mode == "args":
            return self._args()
        if mode == "tail":
            return self._tail()
        if mode == "list":
            return self._list()
        return self._read_whole()

    def _text(self) -> bool:
        t = self.text
        j = t.find(TOOL_CALL_OPEN, self._i)
        if j == -1:
            held = next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(t)), 0, -1)
                         if t.endswith(TOOL_CALL_OPEN[:k])), 0)
            self._i = max(self._mark, len(t) - held)
            self._to_content(self._i)
            return False
        self._to_content(j)  # the block's text stays undecided: content if it is not a call
        self._block, self._item, self._mode = True, j + len(TOOL_CALL_OPEN), "block_head"
        return True

    def _head(self) -> bool:
        t, start = self.text, self._item
        if self._mode == "bare_head" and self._in_list:  # its first item
            start = len(t) - len(t[self._item + 1:].lstrip(_WS))
            if start == len(t):
                return False
        m = match_call_head(t, start, self.names)
        if m == MORE:
            return False
        if m == NO:
            self._mode = self._mode.replace("_head", "_whole")
            self._span = None if self._block else _JsonSpan(self._item)
            self._i = self._item
            return True
        name, args_start = m
        self._call = self._add(_Call(name, args_start))
        self._span = _JsonSpan(args_start, stop=TOOL_CALL_CLOSE if self._block else None)
        self._mode = "args"
        return True

    def _args(self) -> bool:
        r = self._span.scan(self.text)
        if r is None:
            return False
        end, by_tag = r
        if self._call is not None:
            self._call.end = end
        if by_tag:  # the block closed inside the arguments
            self._mark = end + len(TOOL_CALL_CLOSE)
            return self._to_text(self._mark)
        self._mode, self._i = "tail", end
        if not self._block:
            self._span = _JsonSpan(end, depth=1)  # the rest of the call object
        return True

    def _tail(self) -> bool:
        """After a call's arguments: its block runs to the close tag (or the next block's open
        tag), a bare call object to its closing brace; none of it is content."""
        t = self.text
        if self._block:
            ends = [(j, tag) for tag in (TOOL_CALL_CLOSE, TOOL_CALL_OPEN) if (j := t.find(tag, self._i)) != -1]
            if not ends:
                self._i = max(self._i, len(t) - len(TOOL_CALL_CLOSE) + 1)
                return False
            j, tag = min(ends)
            self._mark = j + len(tag) if tag == TOOL_CALL_CLOSE else j
            return self._to_text(self._mark)
        r = self._span.scan(t)
        if r is None:
            return False
        self._mark = r[0]
        if self._in_list:
            self._mode, self._i = "list", r[0]
            return True
        return self._to_text(self._mark)

    def _list(self) -> bool:
        """Between the items of a bare list of calls: commas and whitespace are skipped, a ``]``
        ends it; anything else is content from there."""
        t, i = self.text, self._i
        while i < len(t) and t[i] in _WS + ",":
            i += 1
        self._i = self._mark = i
        if i == len(t):
            return False
        if t[i] == "{":
            self._item, self._mode = i, "item_head"
            return True
        if t[i] == "]":
            self._mark = i + 1
        return self._to_text(self._mark)

    def _read_whole(self) -> bool:
        """A block (to its close tag) or a JSON value (to its closing bracket) to be read whole."""
        t = self.text
        if self._block:
            j = t.find(TOOL_CALL_CLOSE, self._i)
            if j == -1:
                self._i = max(self._i, len(t) - len(TOOL_CALL_CLOSE) + 1)
                return False
            self._whole(j + len(TOOL_CALL_CLOSE), body_end=j)
            return self._to_text(self._mark)
        r = self._span.scan(t)
        if r is None:
            return False
        in_list = self._mode == "item_whole"
        self._whole(r[0])
        if in_list:
            self._mode, self._i = "list", r[0]
            return True
        return self._to_text(r[0])


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

    Every mode streams a call's header (id, name) as soon as its name is known, then its
    arguments' text as it is generated; joined, the deltas equal the finished reply
    (``reply_calls``). Named: the whole output is the arguments. Required: ``RequiredCallScanner``.
    Auto: ``AutoCallScanner`` decides content and calls; content that is only whitespace so far
    is held (a reply of calls alone has no content).
    """

    def __init__(self, plan: ToolPlan, parallel: bool = True):
        self.plan, self.parallel = plan, parallel
        self.text = ""  # the reply so far (the engine's text deltas, joined)
        self.sent = 0  # content characters sent (named: arguments characters)
        self.call_id = new_call_id() if plan.mode == "named" else None
        self.has_calls = plan.mode == "named"
        self.streamed: list[list] = []  # required / auto: per call sent, [id, arguments characters sent]
        self.scanner: RequiredCallScanner | AutoCallScanner | None = (
            RequiredCallScanner() if plan.mode == "required"
            else AutoCallScanner(plan.names, parallel) if plan.mode == "auto" else None)

    def _call_deltas(self, calls: list[tuple[str | None, str]]) -> list[P.ToolCallDelta]:
        """The deltas that bring the calls sent up to ``calls`` (name or None, arguments so far)."""
        deltas = []
        for k, (name, args) in enumerate(calls):
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

    def _content(self, content: str) -> str:
        ready = len(content) if content.strip() else 0
        delta = content[self.sent:ready]
        self.sent = max(self.sent, ready)
        return delta

    def update(self, delta: str, finished: bool) -> tuple[str, list[P.ToolCallDelta]]:
        """(content, tool-call deltas) to send for the reply's next ``delta`` of text."""
        self.text += delta
        text, mode = self.text, self.plan.mode
        if mode == "named":
            deltas = []
            if self.sent == 0 and (text or finished):
                deltas.append(P.ToolCallDelta(index=0, id=self.call_id, type="function",
                                              function=P.FunctionCallDelta(name=self.plan.named, arguments="")))
            if len(text) > self.sent:
                deltas.append(P.ToolCallDelta(index=0, function=P.FunctionCallDelta(arguments=text[self.sent:])))
                self.sent = len(text)
            return "", deltas
        if mode == "auto":
            self.scanner.feed(delta)
            if finished:
                self.scanner.finish()
            return self._content(self.scanner.content), self._call_deltas(self.scanner.current())
        if mode == "required":
            self.scanner.feed(delta)
            if not finished or self.streamed or calls_from_constrained(text, self.plan):
                return "", self._call_deltas([(name, args) for name, args, _ in self.scanner.current()])
            # (a reply cut short before any call had its name is sent as content, as unstreamed)
            return text, []
        delta_out = text[self.sent:]
        self.sent = len(text)
        return delta_out, []
