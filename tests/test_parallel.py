"""Tensor, pipeline and expert parallelism (gloo on CPU, 2 spawned ranks per engine).

Greedy outputs equal the single-process engine's token for token; the engine's collective
counters equal ``pagedlm.analysis.comm``'s prediction; dead ranks and bad layouts fail fast.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from pagedlm import LLM, SamplingParams
from pagedlm.analysis import collectives_per_step
from pagedlm.distributed.runner import WorkerError
from tests.helpers import save_tiny
from tests.test_moe import hf_tiny_moe

# Mixed lengths: decodes and prefills share steps; the 21-token prompt is chunked (budget 16).
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 1 for j in range(n)]}
           for i, n in enumerate([3, 21, 8, 1, 13])]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ENGINE = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_num_batched_tokens=16)
LIMIT_S = 60  # every distributed wait in these tests is bounded


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """kind -> (model dir, single-process greedy outputs)."""
    cache: dict[str, tuple[str, list[list[int]]]] = {}

    def get(kind: str) -> tuple[str, list[list[int]]]:
        if kind not in cache:
            d = str(tmp_path_factory.mktemp(kind))
            if kind in ("mixtral", "qwen2_moe", "qwen3_moe"):
                hf_tiny_moe(kind).save_pretrained(d)
            else:
                save_tiny(kind, d, with_tokenizer=False)
            cache[kind] = (d, generate(LLM(d, **ENGINE)))
        return cache[kind]

    return get


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def parallel_llm(path: str, **layout) -> LLM:
    return LLM(path, **ENGINE, **layout, extra={"distributed": {"timeout_s": LIMIT_S, "start_timeout_s": LIMIT_S}})


def step_counters(llm: LLM):
    """Run one engine step; return (per-part (tokens, logit rows), per-rank counters)."""
    eng, runner = llm.engine, llm.engine.runner
    seen = []
    prepare = runner.prepare
    runner.prepare = lambda sched: seen.append(prepare(sched)) or seen[-1]
    try:
        runner.reset_collective_stats()
        eng.step()
    finally:
        del runner.prepare
    parts = [(len(p[0]), len(p[3])) for p in seen[0].parts]
    return parts, runner.collective_stats()


def check_counters_match_analysis(llm: LLM, layout: dict) -> None:
    cfg = llm.engine.model_config
    tp, pp, ep = (layout.get(k, 1) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                               "expert_parallel_size"))
    lay = llm.engine.runner.layout
    for _ in range(2):  # a prefill step, then a step with decodes
        parts, stats = step_counters(llm)
        summed = {}
        for rank, counters in stats.items():
            pp_rank, ep_rank, _ = lay.coords(rank)
            tokens, sampled = parts[ep_rank]
            pred = collectives_per_step(cfg, tp=tp, pp=pp, ep=ep, num_tokens=tokens, num_sampled=sampled,
                                        dtype_bytes=4).by_kind(pp_rank)
            for kind, total in pred.items():
                got = counters.get(kind, {"calls": 0, "bytes": 0})
                assert got["calls"] == total.calls, (rank, kind, got, total)
                s = summed.setdefault(kind, [0, 0])
                s[0] += got["bytes"]
                s[1] += total.payload_bytes
                if kind != "all_to_all":  # a rank's combine payload depends on the routing
                    assert got["bytes"] == total.payload_bytes, (rank, kind, got, total)
        for kind, (got, want) in summed.items():
            assert got == want, (kind, got, want)
        assert summed["all_reduce" if tp > 1 else ("all_to_all" if ep > 1 else "send")][0] > 0


CASES = [
    ("llama", {"tensor_parallel_size": 2}),
    ("qwen3", {"tensor_parallel_size": 2}),
    ("gpt2", {"tensor_parallel_size": 2}),
    ("llama", {"pipeline_parallel_size": 2}),
    ("gpt2", {"pipeline_parallel_size": 2}),
    ("mixtral", {"expert_parallel_size": 2}),
    ("qwen2_moe", {"expert_parallel_size": 2}),
    ("qwen3_moe", {"tensor_parallel_size": 2}),
    ("qwen2_moe", {"tensor_parallel_size": 2, "expert_parallel_size": 2}),  # 4 ranks
]
COUNTED = {("llama", "tensor_parallel_size"), ("mixtral", "expert_parallel_size"),
           ("llama", "pipeline_parallel_size"), ("qwen2_moe", "tensor_parallel_size")}


@pytest.mark.parametrize("kind, layout", CASES, ids=[f"{k}-{'-'.join(f'{n[0]}{v}' for n, v in lay.items())}"
                                                     for k, lay in CASES])
def test_greedy_outputs_match_single_process(model_dirs, kind, layout):
    path, ref = model_dirs(kind)
    llm = parallel_llm(path, **layout)
    try:
        assert generate(llm) == ref
        if (kind, next(iter(layout))) in COUNTED:
            for i, p in enumerate(PROMPTS):
                llm.engine.add_request(f"count-{i}", None, GREEDY, prompt_token_ids=p["prompt_token_ids"][:5])
            check_counters_match_analysis(llm, layout)
    finally:
        llm.engine.shutdown()
    assert not llm.engine.runner._workers.alive


def test_killed_worker_is_reported_by_rank_and_other_engines_keep_going(model_dirs):
    """Two parallel engines share the host (free ports by default); killing a rank of one makes
    it fail fast, naming the rank, while the other still serves."""
    path, ref = model_dirs("llama")
    a = parallel_llm(path, tensor_parallel_size=2)
    try:
        b = parallel_llm(path, pipeline_parallel_size=2)
        try:
            victim = a.engine.runner.pids[1]
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(WorkerError, match=r"worker rank 1 .*died") as e:
                generate(a)
            assert time.monotonic() - t0 < 10
            assert e.value.rank == 1
            with pytest.raises(RuntimeError, match="shut down"):
                generate(a)
            assert generate(b) == ref
        finally:
            b.engine.shutdown()
    finally:
        a.engine.shutdown()
    assert not any(p.is_alive() for p in a.engine.runner._workers.procs + b.engine.runner._workers.procs)


def test_worker_failing_to_start_is_reported_by_rank(tmp_path):
    """Only stage 1 loads layer 1, whose tensor is mis-shaped: rank 1 fails, the engine says so."""
    from safetensors.torch import load_file, save_file

    save_tiny("llama", str(tmp_path), with_tokenizer=False)
    st = tmp_path / "model.safetensors"
    state = load_file(str(st))
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(state, str(st))
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 failed during start-up: .*down_proj"):
        parallel_llm(str(tmp_path), pipeline_parallel_size=2)
    assert time.monotonic() - t0 < LIMIT_S
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("kind, layout, match", [
    ("llama", {"tensor_parallel_size": 3}, "does not divide num_attention_heads"),
    ("llama", {"pipeline_parallel_size": 3}, "more than num_hidden_layers"),
    ("llama", {"expert_parallel_size": 2}, "dense"),
    ("mixtral", {"expert_parallel_size": 3}, "does not divide num_experts"),
    ("mixtral", {"expert_parallel_size": 2, "pipeline_parallel_size": 2}, "not supported"),
    ("llama", {"tensor_parallel_size": 0}, "positive integer"),
])
def test_bad_layouts_rejected_before_any_process_starts(model_dirs, kind, layout, match):
    path, _ = model_dirs(kind)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=match):
        parallel_llm(path, **layout)
    assert time.monotonic() - t0 < 2
    assert not multiprocessing.active_children()
