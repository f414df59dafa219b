"""LoRA adapters: peft's merged model as the reference, mixed-adapter batches, the prefix cache
per adapter, bad adapters and bad requests."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

from pagedlm import LLM, LoRARequest, SamplingParams
from pagedlm.engine.engine import EngineConfig, LLMEngine

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: str, out_dir: str, seed: int, r: int = 8, alpha: int = 16,
                 targets=tuple(ALL_MODULES), **kw):
    """A peft adapter with random A and non-zero random B, saved as PEFT does; returns peft's
    merged model (the reference) in float32."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # init_lora_weights=False draws B small; make the deltas clearly visible
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(out_dir)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    refs = {}
    refs["a"] = make_adapter(tiny_llama_dir, str(root / "a"), seed=1)
    refs["b"] = make_adapter(tiny_llama_dir, str(root / "b"), seed=2, r=4, alpha=32, use_rslora=True,
                             targets=("q_proj", "v_proj", "down_proj"), rank_pattern={"down_proj": 2},
                             alpha_pattern={"v_proj": 8})
    return {k: str(root / k) for k in refs}, refs


def record_logits(eng: LLMEngine) -> list[torch.Tensor]:
    """Every step's logits, in order."""
    seen: list[torch.Tensor] = []
    run = eng.runner.execute

    def execute(inputs):
        out = run(inputs)
        if out is not None:
            seen.append(out.clone())
        return out

    eng.runner.execute = execute
    return seen


PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 61, 12, 200, 31, 77, 14, 150, 9, 18, 300]


@pytest.mark.parametrize("name", ["a", "b"])
def test_logits_equal_peft_merged_model(tiny_llama_dir, adapters, name):
    """Prompt and decode logits with an adapter equal peft's merged model (float32), for
    all seven projections (a: rank 8) and for q/v/down with rsLoRA scaling, a rank pattern and
    an alpha pattern (b: rank 4 and 2)."""
    paths, refs = adapters
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, max_lora_rank=8, num_kv_blocks=64, block_size=4)
    seen = record_logits(llm.engine)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False,
                       lora_request=LoRARequest(name, 1, paths[name]))[0]
    full = PROMPT + out.outputs[0].token_ids
    ours = torch.cat(seen)  # rows for positions 0 .. len(full) - 2
    with torch.no_grad():
        ref = refs[name](torch.tensor([full])).logits[0, :-1]
        import transformers as T

        base = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(
            torch.tensor([full])).logits[0, :-1]
    assert ours.shape == ref.shape
    assert (ref - base).abs().max() > 0.05  # the adapter changes the model
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _generate_one(llm: LLM, prompt, lora, max_tokens=8):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False, lora_request=lora)[0].outputs[0]


def test_two_adapters_and_base_in_one_batch_equal_solo_runs(tiny_llama_dir, adapters):
    """Requests with adapter a, adapter b and none, batched with chunked prefill (8 tokens a
    step), each give what they give alone: tokens and logprobs."""
    paths, _ = adapters
    kw = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=128, block_size=4)
    la, lb = LoRARequest("a", 1, paths["a"]), LoRARequest("b", 2, paths["b"])
    prompts = [PROMPT, PROMPT[:11] + [60, 61, 62], PROMPT[::-1], PROMPT[3:], PROMPT[:9]]
    loras = [la, lb, None, la, lb]
    solo = LLM(tiny_llama_dir, **kw)
    alone = [_generate_one(solo, p, lo) for p, lo in zip(prompts, loras)]
    batched_llm = LLM(tiny_llama_dir, max_num_batched_tokens=8, enable_prefix_caching=False, **kw)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    outs = batched_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                lora_request=loras)
    steps = batched_llm.engine.stats["steps"]
    assert steps > len(prompts)  # chunked: prompts were split over several steps
    for got, want in zip(outs, alone):
        g = got.outputs[0]
        assert g.token_ids == want.token_ids
        for lg, lw in zip(g.logprobs, want.logprobs):
            tok = next(iter(lw))
            assert lg[tok].logprob == pytest.approx(lw[tok].logprob, abs=1e-4)
    # Distinct adapters give distinct continuations (the test would pass vacuously otherwise).
    assert len({tuple(alone[i].token_ids) for i in (0, 2)}) == 2


def test_more_adapters_than_slots_queue_and_finish(tiny_llama_dir, adapters):
    """max_loras=1 with two adapters in the queue: they take turns in the one slot; every
    request finishes with its solo result and no KV block leaks."""
    paths, _ = adapters
    kw = dict(dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, num_kv_blocks=128, block_size=4)
    la, lb = LoRARequest("a", 1, paths["a"]), LoRARequest("b", 2, paths["b"])
    solo = LLM(tiny_llama_dir, **kw)
    want = [_generate_one(solo, PROMPT, lo).token_ids for lo in (la, lb, None, la)]
    llm = LLM(tiny_llama_dir, **kw)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 4, params, use_tqdm=False, lora_request=[la, lb, None, la])
    assert [o.outputs[0].token_ids for o in outs] == want
    eng = llm.engine
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.block_manager.check_invariants(eng.live_sequences())


def test_prefix_cache_is_per_adapter(tiny_llama_dir, adapters):
    paths, _ = adapters
    llm = LLM(tiny_llama_dir, dtype="float32", max_loras=2, max_lora_rank=8, num_kv_blocks=128, block_size=4,
              lora_modules={"a": paths["a"], "b": paths["b"]})
    la, lb = (llm.engine.lora_requests[n] for n in ("a", "b"))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def cached(lora) -> int:
        return llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False,
                            lora_request=lora)[0].metrics.num_cached_tokens

    assert cached(la) == 0
    assert cached(lb) == 0  # same prompt, other adapter: nothing shared
    assert cached(None) == 0  # the base model shares nothing with adapters either
    full = (len(PROMPT) - 1) // 4 * 4
    assert cached(la) == full  # same adapter: its blocks are found
    assert cached(lb) == full
    assert cached(None) == full


def test_int8_base_layer_adds_the_same_delta(tiny_llama_dir, adapters):
    """On a quantized base layer the LoRA delta is added to the quantized layer's own output."""
    paths, _ = adapters
    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", quantization="int8", enable_lora=True,
                                 max_lora_rank=8, num_kv_blocks=32, block_size=4))
    manager = eng.runner.lora
    adapter = manager.add(LoRARequest("a", 1, paths["a"]))
    name = "model.layers.0.self_attn.qkv_proj"
    lin = manager.linears[name]
    assert lin.quant_method.base.name == "int8"
    x = torch.randn(3, lin.in_features)

    class S:  # a scheduled sequence: only its adapter matters here
        lora = adapter

    manager.set_batch([(S, 3)])
    with torch.no_grad():
        y = lin(x)
        base = lin.quant_method.base.apply(lin, x, lin.weight, lin.bias)
        manager.set_batch([])
        assert torch.equal(lin(x), base)  # no adapter in the step: the base layer, exactly
    expected = base.clone()
    for part, (a, b) in adapter.weights[name].items():
        first, rows = manager._parts(lin)[part]
        expected[:, first:first + rows] += x @ a.t() @ b.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _phases(llm: LLM, paths: dict[str, str]) -> list:
    """Four batches of four requests each (one decode bucket): b and base; a, b, base, a (a is
    loaded now and wraps more layers than b); c, base, c, a with two slots (c enters b's slot);
    base only. Greedy tokens and their logprobs per request."""
    lb = llm.engine.lora_requests["b"]  # loaded at start-up (id 1)
    la, lc = LoRARequest("a", 2, paths["a"]), LoRARequest("c", 3, str(paths["c"]))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, PROMPT[::-1], PROMPT[3:], PROMPT[:9])]
    outs = []
    for loras in ([lb, None, lb, None], [la, lb, None, la], [lc, None, lc, la], [None] * 4):
        outs += [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    return outs


def test_compiled_lora_decode_step_equals_eager(tiny_llama_dir, adapters, tmp_path):
    """Decode steps with adapters run the bucket's LoRA graph, base-only steps the base graph,
    and both give the eager tokens and logprobs (float32), through a LoRA graph traced again when
    a new adapter wraps more layers and an adapter written into a slot after the graph was
    captured (the captured graph reads the slot tensors in place)."""
    paths, _ = adapters
    paths = dict(paths, c=tmp_path / "c")
    make_adapter(tiny_llama_dir, str(paths["c"]), seed=3, r=8, targets=("k_proj", "o_proj", "up_proj"))
    kw = dict(dtype="float32", lora_modules={"b": paths["b"]}, max_loras=2, max_lora_rank=8, num_kv_blocks=64,
              block_size=4, max_num_seqs=4, enable_prefix_caching=False)
    want = _phases(LLM(tiny_llama_dir, enforce_eager=True, **kw), paths)

    llm = LLM(tiny_llama_dir, enforce_eager=False, **kw)
    compiled = llm.engine.runner.compiled
    steps: list[tuple[bool, bool]] = []  # per compiled step: (adapter in the step, LoRA graph ran it)
    execute = compiled.execute

    def spy(batch):
        steps.append((any(s.lora is not None for s, _ in batch.sched.scheduled), batch.lora))
        return execute(batch)

    compiled.execute = spy
    layers = []
    generate = llm.generate

    def generate_and_count(*args, **kwargs):  # LoRA layers the bucket's LoRA graph was traced over
        out = generate(*args, **kwargs)
        layers.append(compiled.lora_layers.get(4))
        return out

    llm.generate = generate_and_count
    got = _phases(llm, paths)
    assert not compiled.failed and not compiled.lora_failed
    assert compiled.compiled_buckets == {4} and compiled.lora_buckets == {4}
    assert {(4, False), (4, True)} <= set(compiled.direct)  # both called directly
    assert steps.count((True, True)) >= 15 and steps.count((False, False)) >= 5
    assert all(with_lora == lora_graph for with_lora, lora_graph in steps)
    assert layers[0] < layers[1] == layers[2] == layers[3]  # a wrapped more layers: traced again
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        for lg, lw in zip(g.logprobs, w.logprobs):
            tok = next(iter(lw))
            assert lg[tok].logprob == pytest.approx(lw[tok].logprob, abs=1e-4)
    # Every adapter changes its requests' tokens (else the comparison would prove little).
    base = [w.token_ids for w in want[12:]]
    assert want[0].token_ids != base[0] and want[4].token_ids != base[0] and want[8].token_ids != base[0]


def test_warmup_compiles_the_lora_graph_too(tiny_llama_dir, adapters):
    """compile_at_startup with an adapter loaded compiles each bucket's base and LoRA graphs
    (the base graph traced with the LoRA layers off); requests then compile nothing and give the
    eager tokens, with the adapter and without."""
    paths, _ = adapters
    kw = dict(dtype="float32", lora_modules={"a": paths["a"]}, max_lora_rank=8, num_kv_blocks=64, block_size=4,
              max_num_seqs=1)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def run(llm):
        a = llm.engine.lora_requests["a"]
        return [llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False, lora_request=lo)[0]
                .outputs[0].token_ids for lo in (a, None, a)]

    want = run(LLM(tiny_llama_dir, enforce_eager=True, **kw))
    llm = LLM(tiny_llama_dir, enforce_eager=False, compile_at_startup=True, **kw)
    compiled = llm.engine.runner.compiled
    assert compiled.compiled_buckets == {1} and compiled.lora_buckets == {1}
    assert not llm.engine.runner.lora.batch.active  # warm-up left the LoRA layers off
    compiled._compiled = None  # a compile from here on would fail (and fall back): none may happen
    assert run(llm) == want
    assert not compiled.failed and not compiled.lora_failed
    assert want[0] != want[1]


def test_lora_graph_failure_falls_back_to_eager_for_lora_steps_only(tiny_llama_dir, adapters, monkeypatch,
                                                                    caplog):
    """A LoRA graph that fails to compile: one warning, steps with adapters run eagerly from then
    on (same tokens), base-only steps keep their compiled graph."""
    import logging

    from pagedlm.model.layers import lora as lora_layers

    add_delta = lora_layers.LoRALayer.add_delta

    def broken_in_graphs(self, x, y):
        if self.batch.graph:
            raise RuntimeError("no LoRA graph here")
        return add_delta(self, x, y)

    paths, _ = adapters
    kw = dict(dtype="float32", lora_modules={"a": paths["a"]}, max_lora_rank=8, num_kv_blocks=64, block_size=4,
              max_num_seqs=2)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[::-1]}]

    def run(llm):
        a = llm.engine.lora_requests["a"]
        return [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
                for loras in ([a, None], [a, a], [None, None])]

    want = run(LLM(tiny_llama_dir, enforce_eager=True, **kw))
    monkeypatch.setattr(lora_layers.LoRALayer, "add_delta", broken_in_graphs)
    llm = LLM(tiny_llama_dir, enforce_eager=False, **kw)
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        got = run(llm)
    assert got == want
    compiled = llm.engine.runner.compiled
    assert compiled.lora_failed and not compiled.failed and compiled.lora_buckets == set()
    assert compiled.compiled_buckets == {2}  # the base-only batch still ran its graph
    warnings = [r for r in caplog.records if "compiled LoRA decode step failed" in r.getMessage()]
    assert len(warnings) == 1


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32", enable_lora=True, max_lora_rank=8, num_kv_blocks=64, block_size=4)


def _write_adapter(path, config: dict | None, tensors: dict | None) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    if config is not None:
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config, f)
    if tensors is not None:
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return str(path)


def _cfg(**kw):
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **kw}


def _q(layer=0, r=2, in_f=64, out=64):
    key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    return {f"{key}.lora_A.weight": torch.randn(r, in_f), f"{key}.lora_B.weight": torch.randn(out, r)}


@pytest.mark.parametrize("case, match", [
    ("missing", "is not a directory"),
    ("no_config", "no adapter_config.json"),
    ("bad_json", "cannot read"),
    ("not_lora", "peft_type 'IA3' is not supported"),
    ("dora", "DoRA"),
    ("bias", "bias='all' is not supported"),
    ("no_rank", "needs r"),
    ("bin_only", "only adapter_model.bin"),
    ("no_weights", "no adapter_model.safetensors"),
    ("rank_too_big", "rank 16 .*above max_lora_rank 8"),
    ("lm_head", "target module 'lm_head' is not supported"),
    ("embedding", "tensor .*lora_embedding_A.* is not supported"),
    ("layer_out_of_range", "target module 'model.layers.7.self_attn.q_proj' is not supported"),
    ("wrong_shape", "an adapter for another base model"),
    ("half_pair", "has lora_A but no lora_B"),
])
def test_bad_adapter_is_a_clear_error_and_others_unaffected(lora_llm, tmp_path, case, match):
    p = tmp_path / case
    if case == "missing":
        path = str(p)
    elif case == "no_config":
        path = _write_adapter(p, None, _q())
    elif case == "bad_json":
        os.makedirs(p)
        (p / "adapter_config.json").write_text("{not json")
        path = str(p)
    elif case == "not_lora":
        path = _write_adapter(p, _cfg(peft_type="IA3"), _q())
    elif case == "dora":
        path = _write_adapter(p, _cfg(use_dora=True), _q())
    elif case == "bias":
        path = _write_adapter(p, _cfg(bias="all"), _q())
    elif case == "no_rank":
        path = _write_adapter(p, {"peft_type": "LORA"}, _q())
    elif case == "bin_only":
        path = _write_adapter(p, _cfg(), None)
        torch.save(_q(), p / "adapter_model.bin")
    elif case == "no_weights":
        path = _write_adapter(p, _cfg(), None)
    elif case == "rank_too_big":
        path = _write_adapter(p, _cfg(r=16), _q(r=16))
    elif case == "lm_head":
        path = _write_adapter(p, _cfg(), {"base_model.model.lm_head.lora_A.weight": torch.randn(2, 64),
                                          "base_model.model.lm_head.lora_B.weight": torch.randn(384, 2)})
    elif case == "embedding":
        path = _write_adapter(p, _cfg(), {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(2, 384)})
    elif case == "layer_out_of_range":
        path = _write_adapter(p, _cfg(), _q(layer=7))
    elif case == "wrong_shape":
        path = _write_adapter(p, _cfg(), _q(in_f=32))
    elif case == "half_pair":
        path = _write_adapter(p, _cfg(), {k: v for k, v in _q().items() if "lora_A" in k})
    with pytest.raises(ValueError, match=match):
        lora_llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False,
                          lora_request=LoRARequest(case, 100 + len(case), path))
    eng = lora_llm.engine
    assert not eng.has_unfinished_requests() and not eng.requests
    out = lora_llm.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_a_refused_request_loads_no_adapter(lora_llm, tmp_path, monkeypatch):
    """A new adapter is read from disk only once its request passed every other check: a
    refused request must not stall the engine's thread loading it."""
    eng = lora_llm.engine
    manager = eng.runner.lora
    loads = []
    real_load = manager._load
    monkeypatch.setattr(manager, "_load", lambda req: loads.append(req.lora_name) or real_load(req))
    lora = LoRARequest("late", 77, _write_adapter(tmp_path / "late", _cfg(), _q()))
    vocab = eng.model_config.vocab_size
    for prompt, params, match in [
        ({"prompt_token_ids": [vocab]}, SamplingParams(max_tokens=2), "outside the vocabulary"),
        ({"prompt_token_ids": [5] * eng.max_model_len}, SamplingParams(max_tokens=2), "max_model_len"),
        ("hello", SamplingParams(max_tokens=2, logit_bias={vocab: 1.0}), "logit_bias"),
        ("hello", SamplingParams(max_tokens=2, structured_outputs={"regex": r"[^\x00-\U0010FFFF]"}),
         "cannot be satisfied"),
    ]:
        with pytest.raises(ValueError, match=match):
            lora_llm.generate(prompt, params, use_tqdm=False, lora_request=lora)
        assert not loads and 77 not in manager.adapters and not eng.requests
    out = lora_llm.generate("hello", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False, lora_request=lora)
    assert loads == ["late"] and 77 in manager.adapters and len(out[0].outputs[0].token_ids) == 2


def test_bad_requests(tiny_llama_dir, lora_llm, adapters):
    paths, _ = adapters
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        LLM(tiny_llama_dir, dtype="float32", num_kv_blocks=16).generate(
            "hi", use_tqdm=False, lora_request=LoRARequest("a", 1, paths["a"]))
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("a", 0, paths["a"])
    with pytest.raises(ValueError, match="lora_name must be a non-empty string"):
        LoRARequest("", 1, paths["a"])
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest"):
        lora_llm.generate("hi", use_tqdm=False, lora_request="a")
    with pytest.raises(ValueError, match="got 2 lora_requests for 1 prompts"):
        lora_llm.generate("hi", use_tqdm=False, lora_request=[None, None])
    lora_llm.generate("hi", SamplingParams(max_tokens=1), use_tqdm=False, lora_request=LoRARequest("a", 1, paths["a"]))
    with pytest.raises(ValueError, match="lora_int_id 1 is already used by adapter 'a'"):
        lora_llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("other", 1, paths["b"]))
    with pytest.raises(ValueError, match="name 'a' is already used by lora_int_id 1"):
        lora_llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("a", 2, paths["b"]))
    for kw, match in [(dict(max_loras=0), "max_loras must be a positive integer"),
                      (dict(max_lora_rank=-1), "max_lora_rank must be a positive integer"),
                      (dict(lora_modules=["noequals"]), "use NAME=PATH"),
                      (dict(lora_modules=["a=x", "a=y"]), "given twice"),
                      (dict(enable_lora=True, tensor_parallel_size=2), "not supported with tensor, pipeline")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(model=tiny_llama_dir, **kw)
    assert not lora_llm.engine.requests


# ---- server and CLI --------------------------------------------------------------------------

def test_server_serves_adapters_by_name(tiny_llama_dir, adapters):
    import httpx
    import openai

    from pagedlm.engine.async_engine import AsyncLLMEngine
    from pagedlm.server.app import ServerConfig, build_app
    from tests.server_fixtures import ServerThread

    paths, _ = adapters
    kw = dict(model=tiny_llama_dir, dtype="float32", max_lora_rank=8, max_loras=2, num_kv_blocks=128, block_size=4)
    engine = LLMEngine(EngineConfig(lora_modules=[f"a={paths['a']}", f"b={paths['b']}"], **kw))
    offline = LLM(tiny_llama_dir, lora_modules={"a": paths["a"]}, **{k: v for k, v in kw.items() if k != "model"})
    want = {name: offline.generate("Hello world", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                   use_tqdm=False, lora_request=lora)[0].outputs[0].text
            for name, lora in [("tiny", None), ("a", offline.engine.lora_requests["a"])]}
    assert want["tiny"] != want["a"]
    aeng = AsyncLLMEngine(engine)
    with ServerThread(build_app(aeng, ServerConfig(served_model_name="tiny")), aeng) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"tiny", "a", "b"}
        assert models["a"].parent == "tiny" and models["a"].root == paths["a"]
        for name in ("tiny", "a"):
            r = client.completions.create(model=name, prompt="Hello world", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.model == name and r.choices[0].text == want[name]
            chunks = list(client.completions.create(model=name, prompt="Hello world", max_tokens=8, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}))
            assert {c.model for c in chunks} == {name}
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want[name]
        chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.model == "b" and chat.choices[0].finish_reason in ("stop", "length")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and "'a'" in err["message"]
        r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want["tiny"]  # other requests unaffected


def test_cli_lora_flags(tiny_llama_dir, adapters, capsys):
    from pagedlm.cli import main

    paths, _ = adapters
    base = ["generate", "hello", "--model", tiny_llama_dir, "--dtype", "float32", "--max-tokens", "3",
            "--kv-cache-memory", "1M", "--enforce-eager", "--max-lora-rank", "8"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--lora-modules", f"a={paths['a']}"]) == 0  # the only adapter: used by default
    with_a = capsys.readouterr().out
    assert main(base + ["--lora-modules", f"a={paths['a']}", f"b={paths['b']}", "--lora", "a"]) == 0
    assert with_a != plain and capsys.readouterr().out == with_a
    assert main(base + ["--lora-modules", "broken"]) == 2
    assert "invalid LoRA module 'broken': use NAME=PATH" in capsys.readouterr().err
    assert main(base + ["--lora-modules", f"a={paths['a']}", "--lora", "zzz"]) == 2
    assert "unknown LoRA adapter 'zzz'; loaded adapters: a" in capsys.readouterr().err
    assert main(base + ["--lora-modules", f"a={paths['a']}", "--max-lora-rank", "4"]) == 2
    assert "rank 8" in capsys.readouterr().err
