"""Structured output, tool calls, logit_bias, echo and best_of through the server, with the
official ``openai`` client against a real uvicorn server (the tiny random Llama: its text is
random, so only the grammar makes it JSON)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from pagedlm.server import protocol as P
from pagedlm.server import tools as T
from tests.helpers import train_tokenizer
from tests.server_fixtures import serve_engine, tiny_model_dir
from tests.structured_cases import SCHEMAS

MODEL = "tiny"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                            "parameters": SCHEMAS["tool_args"]}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}

# "not" is a keyword llguidance does not implement: refused when strict, ignored otherwise.
NOT_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9,
                                                     "not": {"const": 3}}}, "required": ["n"]}
STRICT_NOT = {"type": "function", "function": {"name": "f", "parameters": NOT_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_engine(tiny_model_dir(tmp_path_factory), MODEL, dtype="float32", num_kv_blocks=512, max_num_seqs=16,
                      seed=0, max_model_len=1024) as srv:
        yield srv


def chat(client, stream: bool = False, **kw):
    kw = {"model": MODEL, "messages": MSGS, "max_tokens": 160, "temperature": 0.0, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, ["", "", ""])
                c[0] += d.id or ""
                c[1] += (d.function.name or "") if d.function else ""
                c[2] += (d.function.arguments or "") if d.function else ""
            finish = ch.finish_reason or finish
    return content or None, [tuple(c) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object(client, stream):
    for name in ("nested_object", "refs", "array_of_objects", "string_pattern"):
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        content, calls, finish = chat(client, stream, response_format=rf)
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(content), SCHEMAS[name])
    content, _, finish = chat(client, stream, response_format={"type": "json_object"}, max_tokens=400)
    assert content.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(content), dict)


def test_vllm_guided_fields_on_both_endpoints(client):
    c, _, _ = chat(client, extra_body={"guided_regex": r"\d{3}-[a-z]{2}"})
    assert re.fullmatch(r"\d{3}-[a-z]{2}", c)
    c, _, _ = chat(client, temperature=1.0, seed=4, extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert c in ("alpha", "beta", "gamma")
    c, _, _ = chat(client, extra_body={"structured_outputs": {"json": SCHEMAS["enum_string"]}})
    jsonschema.validate(json.loads(c), SCHEMAS["enum_string"])
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=120, temperature=0,
                                  extra_body={"guided_json": SCHEMAS["date_like"]})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["date_like"])
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=120, temperature=0, n=3, seed=2,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": SCHEMAS["array_of_enums"]}}})
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.text), SCHEMAS["array_of_enums"])


def test_required_calls_stream_as_they_are_generated():
    """A ``required`` reply's calls come out of its growing text: a call's header once its name
    is complete, its arguments as they grow, whatever the chunking; joined, they equal the
    finished reply's calls (arguments as generated)."""
    text = ('[{"name": "get_weather", "parameters": {"city": "Pa\\"ris", "days": [1, {"a": 2}]}}, '
            '{"name":"get_time","parameters":{"tz":"CET"}}]')
    assert T.required_calls(text[:20]) == [(None, "", False)]  # the name is not complete yet
    assert T.required_calls(text[:30]) == [("get_weather", "", False)]
    partial = T.required_calls(text[:60])
    assert partial[0][0] == "get_weather" and not partial[0][2] and text.startswith(partial[0][1], text.index('{"city"'))
    plan = T.ToolPlan("required", [WEATHER, TIME])
    want = T.reply_calls(plan, text)
    assert want == (None, [("get_weather", '{"city": "Pa\\"ris", "days": [1, {"a": 2}]}'), ("get_time", '{"tz":"CET"}')])
    rng = random.Random(0)
    for _ in range(20):
        ts, got, seen, i = T.ToolStream(plan), {}, [], 0
        while i < len(text):
            j = min(len(text), i + rng.randint(1, 9))
            content, deltas = ts.update(text[i:j], j == len(text))
            assert not content
            for d in deltas:
                c = got.setdefault(d.index, ["", "", ""])
                c[0] += d.id or ""
                c[1] += (d.function.name or "") if d.function else ""
                c[2] += (d.function.arguments or "") if d.function else ""
                seen.append((j, d.index))
            i = j
        assert [(n, a) for _, n, a in (got[k] for k in sorted(got))] == want[1]
        assert all(c[0].startswith("call_") for c in got.values()) and ts.has_calls
        assert seen[0][0] < len(text)  # the first call went out before the reply ended
    # cut short before any name: the text is content, as the unstreamed reply gives it
    ts = T.ToolStream(plan)
    assert ts.update('[{"na', False) == ("", []) and ts.update("", True) == ('[{"na', [])
    assert T.reply_calls(plan, '[{"na') == ('[{"na', [])
    # cut inside a call's arguments: the calls so far, the last one's arguments cut, both ways
    cut = text[:text.index('"tz"') + 3]
    assert T.reply_calls(plan, cut) == (None, [want[1][0], ("get_time", '{"tz')])
    ts = T.ToolStream(plan)
    deltas = ts.update(cut[:30], False)[1] + ts.update(cut[30:], True)[1]
    assert [(d.function.name, d.function.arguments) for d in deltas if d.function.name] == [
        ("get_weather", ""), ("get_time", "")]
    assert "".join(d.function.arguments or "" for d in deltas if d.index == 1) == '{"tz'
    named = T.ToolPlan("named", [WEATHER], named="get_weather")
    assert T.reply_calls(named, '{"location": "Pa') == (None, [("get_weather", '{"location": "Pa')])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named_and_required(client, stream):
    content, calls, finish = chat(client, stream, tools=[WEATHER, TIME],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert content is None and finish == "tool_calls" and len(calls) == 1
    call_id, name, args = calls[0]
    assert call_id.startswith("call_") and name == "get_weather"
    jsonschema.validate(json.loads(args), SCHEMAS["tool_args"])
    content, calls, finish = chat(client, stream, tools=[WEATHER, TIME], tool_choice="required",
                                  temperature=1.0, seed=7, max_tokens=300)
    assert content is None and finish == "tool_calls" and calls
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for _, name, args in calls:
        jsonschema.validate(json.loads(args), schemas[name])
    _, calls, _ = chat(client, stream, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                       temperature=1.0, seed=7, max_tokens=300)
    assert len(calls) == 1
    lenient = {"type": "function", "function": {"name": "f", "parameters": NOT_SCHEMA}}
    _, calls, _ = chat(client, stream, tools=[lenient], tool_choice={"type": "function", "function": {"name": "f"}})
    assert 0 <= json.loads(calls[0][2])["n"] <= 9


# A function whose schema does not say whether other properties are allowed.
OPEN_ARGS = {"type": "object", "properties": {
    "location": {"type": "string", "maxLength": 10},
    "where": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}}}, "required": ["location"]}
OPEN = {"type": "function", "function": {"name": "find", "parameters": OPEN_ARGS}}


def test_closed_objects_reads_only_schemas():
    got = T.closed_objects({
        "type": "object", "additionalProperties": True,
        "properties": {"properties": {"type": "object", "properties": {}},  # a property named "properties"
                       "c": {"const": {"properties": {}}}, "d": {"default": {"properties": {}}},
                       "l": {"type": "array", "items": {"properties": {"k": {}}}},
                       "u": {"anyOf": [{"properties": {}}, {"type": "string"}]}, "r": {"$ref": "#/$defs/d"}},
        "$defs": {"d": {"patternProperties": {"^x": {}}}},
        "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {"properties": {}}}}]})
    assert got["additionalProperties"] is True  # the schema said so
    p = got["properties"]
    assert p["properties"] == {"type": "object", "properties": {}, "additionalProperties": False}
    assert p["c"] == {"const": {"properties": {}}} and p["d"] == {"default": {"properties": {}}}  # data
    assert p["l"]["items"]["additionalProperties"] is False and p["u"]["anyOf"][0]["additionalProperties"] is False
    assert got["$defs"]["d"]["additionalProperties"] is False
    # allOf members stay open (closing each would forbid the others' properties), their insides do not
    assert "additionalProperties" not in got["allOf"][0] and "additionalProperties" not in got["allOf"][1]
    assert got["allOf"][1]["properties"]["b"]["additionalProperties"] is False
    assert "additionalProperties" not in OPEN_ARGS  # a copy: the request's schema is untouched


def test_forced_calls_allow_no_properties_beyond_the_schema():
    """A named or required call's arguments may hold only the properties the schema lists
    (unless it allows others), at every depth: the grammar refuses the first extra key."""
    from pagedlm.engine.structured import GrammarManager
    from pagedlm.sampling_params import StructuredOutputsParams

    tok = train_tokenizer()
    grammars = GrammarManager(tok, 384, 1)

    def accepts(params, text: str) -> bool:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return grammars.compiled(params).deep_copy().validate_tokens(ids) == len(ids)

    def plan(choice, tools=(OPEN, TIME)):
        return T.plan_tools(P.ChatCompletionRequest(messages=MSGS, tools=list(tools), tool_choice=choice))

    named = plan({"type": "function", "function": {"name": "find"}}).structured
    required = plan("required").structured
    as_written = StructuredOutputsParams(json=OPEN_ARGS)
    # (the grammar writes JSON without whitespace)
    for extra in ('{"location":"x","other":1', '{"location":"x","where":{"city":"y","z":2'):
        assert accepts(as_written, extra)  # JSON Schema's own default allows them
        assert not accepts(named, extra)
        assert not accepts(required, '[{"name":"find","parameters":' + extra)
    assert accepts(named, '{"location":"x","where":{"city":"y"}}')
    assert accepts(required, '[{"name":"find","parameters":{"location":"x","where":{}}}]')
    # an explicit additionalProperties is kept
    allows = {"type": "function", "function": {"name": "find", "parameters": {**OPEN_ARGS, "additionalProperties": True}}}
    assert accepts(plan({"type": "function", "function": {"name": "find"}}, [allows]).structured,
                   '{"location":"x","other":1}')


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_call_cut_short_is_the_same_call_streamed_or_not(client, choice):
    """A forced call cut by max_tokens is a call with the arguments generated so far and
    finish_reason "length", streamed or not (OpenAI's answer; unstreamed used to return the text
    as content while the stream sent the call); uncut, it obeys the schema without extra keys."""
    tool_choice = {"type": "function", "function": {"name": "find"}} if choice == "named" else "required"
    kw = dict(tools=[OPEN, TIME], tool_choice=tool_choice)
    cut_calls = 0
    for max_tokens in (3, 8, 14, 20, 26):
        content, calls, finish = chat(client, max_tokens=max_tokens, **kw)
        s_content, s_calls, s_finish = chat(client, True, max_tokens=max_tokens, **kw)
        assert (content, [c[1:] for c in calls], finish) == (s_content, [c[1:] for c in s_calls], s_finish)
        if finish != "length":
            assert finish == "tool_calls" and content is None
        elif calls:
            assert content is None and {c[1] for c in calls} <= {"find", "get_time"}
            cut_calls += 1
        else:  # required, cut before the first call had its name: the text is content
            assert choice == "required" and content.startswith("[")
    assert cut_calls >= 2
    closed = T.closed_objects(OPEN_ARGS)
    content, calls, finish = chat(client, max_tokens=400, **kw)
    assert content is None and finish == "tool_calls"
    for _, name, args in calls:
        jsonschema.validate(json.loads(args), closed if name == "find" else TIME["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_parses_hermes_blocks(client, stream):
    # The tiny model never calls a tool by itself: a regex makes it write a Hermes block, so what
    # is tested is the parser on a real reply (content before the block, then the call).
    reply = 'Sure. <tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
    content, calls, finish = chat(client, stream, tools=[WEATHER, TIME], extra_body={"guided_regex": re.escape(reply)})
    assert content == "Sure. " and finish == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_time", {"tz": "CET"})]
    # An unknown function name is not a call: the text stays content.
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    content, calls, finish = chat(client, stream, tools=[WEATHER], extra_body={"guided_regex": re.escape(bad)})
    assert content == bad and not calls and finish == "stop"
    # none: free text, even if it looks like a call.
    content, calls, _ = chat(client, stream, tools=[TIME], tool_choice="none",
                             extra_body={"guided_regex": re.escape(reply)})
    assert content == reply and not calls


def test_tool_round_trip_conversation(client):
    msgs = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    content, calls, finish = chat(client, messages=msgs, tools=[TIME], max_tokens=8)
    assert finish in ("stop", "length") and isinstance(content, str)


def test_parse_auto_formats():
    names = {"f", "g"}
    assert T.parse_auto('{"name": "f", "arguments": {"a": 1}}', names) == (None, [("f", '{"a": 1}')])
    assert T.parse_auto('[{"name": "f", "parameters": {}}, {"name": "g", "arguments": "{\\"b\\": 2}"}]',
                        names) == (None, [("f", "{}"), ("g", '{"b": 2}')])
    two = 'x <tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert T.parse_auto(two, names) == ("x \n", [("f", "{}"), ("g", "{}")])
    assert T.parse_auto(two, names, parallel=False)[1] == [("f", "{}")]
    assert T.parse_auto('{"name": "h", "arguments": {}}', names) == ('{"name": "h", "arguments": {}}', [])
    assert T.parse_auto("<tool_call>{broken</tool_call>", names) == ("<tool_call>{broken</tool_call>", [])
    # recognised by its start: from there a call, its arguments the text as generated
    assert T.parse_auto('<tool_call>{"name": "f", "arguments": {"a": "</tool_call>"}}</tool_call> ok',
                        names) == (" ok", [("f", '{"a": "</tool_call>"}')])
    assert T.parse_auto('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>', names) == (None, [("f", '{"a": 1')])
    assert T.parse_auto('{"name": "f", "arguments": {"a": 1}} then', names) == (" then", [("f", '{"a": 1}')])
    # another key order is read whole; JSON that is not a call is content
    assert T.parse_auto('<tool_call>{"arguments": {"a": 1}, "name": "g"}</tool_call>', names) == (None, [("g", '{"a": 1}')])
    assert T.parse_auto('{"answer": 4}', names) == ('{"answer": 4}', [])
    assert T.parse_auto("  ", names) == (None, [])


AUTO_PIECES = ["Sure, ", "let me check. ", "<", "tool", "<tool_call>", "</tool_call>", "\n", " ",
               '<tool_call>{"name": "f", "arguments": {"city": "Pa\\"ris", "d": [1, {"x": "}"}]}}</tool_call>',
               '<tool_call>\n{"name":"g","parameters":{}}\n</tool_call>',
               '<tool_call>{"arguments": {"a": 1}, "name": "g"}</tool_call>',  # read whole
               '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # content
               '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>',  # unclosed arguments
               '<tool_call>{broken</tool_call>', "{", '"name"', "}"]
AUTO_STARTS = ["", '{"name": "f", "arguments": {"q": "a b"}}', '  [{"name": "f", "arguments": {}}, '
               '{"name": "g", "arguments": "{\\"b\\": 2}"}]', '{"name": "g", "arguments": {"x": {"y": [1]}}',
               '[1, 2]', '{"result": 3}']


def _stream_auto(text: str, names: set[str], parallel: bool, rng: random.Random):
    """Feed ``text`` to a ToolStream in random chunks: (content, calls, when the first call went out)."""
    ts = T.ToolStream(T.ToolPlan("auto", [{"function": {"name": n}} for n in sorted(names)]), parallel)
    content, got, first, i = "", {}, None, 0
    while True:
        j = min(len(text), i + rng.randint(1, 7))
        c, deltas = ts.update(text[i:j], j == len(text))
        content += c
        for d in deltas:
            call = got.setdefault(d.index, ["", "", ""])
            call[0] += d.id or ""
            call[1] += d.function.name or ""
            call[2] += d.function.arguments or ""
            first = j if first is None else first
        i = j
        if i == len(text):
            break
    assert all(c[0].startswith("call_") for c in got.values()) and ts.has_calls == bool(got)
    return content or None, [(n, a) for _, n, a in (got[k] for k in sorted(got))], first


def test_auto_calls_stream_as_they_are_generated():
    """Auto replies (random mixes of content, Hermes blocks, bare JSON, malformed and unclosed
    calls, tag fragments, cut anywhere): in random chunks, the joined stream equals the finished
    reply's content and calls, exactly; a call goes out before the reply ends."""
    names, rng = {"f", "g"}, random.Random(0)
    streamed_early = 0
    for trial in range(400):
        text = rng.choice(AUTO_STARTS) + "".join(rng.choice(AUTO_PIECES) for _ in range(rng.randint(0, 6)))
        if trial % 3 == 0:
            text = text[:rng.randint(0, len(text))]  # cut, as max_tokens does
        parallel = trial % 5 != 0
        want = T.parse_auto(text, names, parallel)
        for _ in range(3):
            content, calls, first = _stream_auto(text, names, parallel, rng)
            assert (content, calls) == want, (text, parallel)
        streamed_early += first is not None and first < len(text)
    assert streamed_early > 100
    # A call's header goes out once its name is complete, its arguments as they grow.
    ts = T.ToolStream(T.ToolPlan("auto", [WEATHER, TIME]))
    assert ts.update("Let me look. <tool_call>{", False) == ("Let me look. ", [])
    assert ts.update('"name": "get_time"', False) == ("", [])  # not yet: is it followed by arguments?
    _, deltas = ts.update(', "arguments": {"tz": "C', False)
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_time", ""), (None, '{"tz": "C')]
    _, deltas = ts.update('ET"}}</tool_call>', True)
    assert [d.function.arguments for d in deltas] == ['ET"}'] and ts.has_calls


def test_template_tool_format_or_hermes_fallback():
    tok = train_tokenizer()
    plan = T.ToolPlan("auto", [TIME])
    fallback = T.render_chat(tok, MSGS, plan, True)
    assert "<tools>" in fallback and '"get_time"' in fallback and fallback.startswith("<|im_start|>system")
    tok.chat_template = ("{% if tools %}TOOLS:{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n"
                         "{% endif %}" + tok.chat_template)
    own = T.render_chat(tok, MSGS, plan, True)
    assert own.startswith("TOOLS:get_time\n") and "<tools>" not in own


def test_logit_bias_echo_and_best_of(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logit_bias={"42": 100})
    tok = train_tokenizer()
    assert r.choices[0].text == tok.decode([42] * 4)
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert r.choices[0].text == "Hello there" + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=1.0, seed=3, n=2, best_of=4)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].logprobs is None
    assert r.usage.completion_tokens > sum(len(tok(c.text)["input_ids"]) for c in r.choices) - 1  # 4 samples paid
    # best_of keeps the likeliest: the same request with logprobs shows them ordered.
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=1.0, seed=3, n=2, best_of=4,
                                  logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums == sorted(sums, reverse=True)


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix", "suffix is not supported"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "0 is accepted with echo only"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens",
     "must be 0 when max_tokens is 0"),
    ("/v1/completions", {"prompt": "a", "best_of": 1, "n": 2}, "best_of", "must be >= n"),
    ("/v1/completions", {"prompt": "a", "best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999": 1}}, "logit_bias", "not a token id"),
    ("/v1/chat/completions", {"messages": MSGS, "audio": {"voice": "x"}}, "audio", "audio is not supported"),
    ("/v1/chat/completions", {"messages": MSGS, "functions": [{"name": "f"}]}, "functions", "not supported"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}, "strict": True}}}, "response_format", "Invalid type: foo"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema"}}, "response_format",
     "needs a json_schema"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}}, "response_format.type", "json"),
    ("/v1/chat/completions", {"messages": MSGS, "guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
    ("/v1/chat/completions", {"messages": MSGS, "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice",
     "give only one"),
    ("/v1/chat/completions", {"messages": MSGS, "guided_regex": r"[^\x00-\U0010FFFF]"}, None, "cannot be satisfied"),
    ("/v1/chat/completions", {"messages": MSGS, "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend",
     "None"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in tools"),
    ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "required"}, "tool_choice", "needs a non-empty tools"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [STRICT_NOT], "tool_choice": "required"}, "tools",
     "Unimplemented keys"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [WEATHER], "tool_choice": "required",
                              "guided_regex": "a"}, "tool_choice", "do not also set"),
])
def test_bad_input_is_a_400_naming_the_field(http, path, body, param, needle):
    r = http.post(path, json={"model": MODEL, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == param, err
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200  # the server goes on serving
