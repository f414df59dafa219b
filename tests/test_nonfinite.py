"""Correct at every batch size: each compiled decode bucket against the eager step, and what a
non-finite value can (not) do.

* Every bucket from 1 to 64 (and speculative decoding's 3, 6 and 12) of a compiled model with
  SmolLM2's attention layout (9 query heads, 3 KV heads of 64), full and padded, in float32 and
  bf16: the self-check trusts each one, and the tokens are the eager engine's.
* Masked positions contribute nothing: with NaN in every slot of the cache that a request does
  not write (reused blocks' tails, padding, the scratch block), its tokens are unchanged.
* A compiled step that computes non-finite logits sends its bucket back to eager and the step is
  recomputed: no request fails. A request whose own values are non-finite fails alone; its
  blocks are zeroed and leave the prefix cache, and the next 64 requests all complete.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.engine.compiled import SelfCheck
from tests.helpers import save_tiny, tokens_equal_up_to_bf16_ties

# SmolLM2-135M's attention shapes (9 x 64 query heads over 3 KV heads), two layers, small MLP.
SMOL_LAYOUT = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=256,
                   num_hidden_layers=2, vocab_size=384, max_position_embeddings=512)
# Decode batch sizes: every bucket full (1, 2, 4, ... 64) and padded (3 -> 4, ..., 63 -> 64).
ROWS = [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("smol_layout")), **SMOL_LAYOUT)


def _prompts(n: int, base: int = 0) -> list[dict]:
    # Different lengths, so rows of one step mask different numbers of keys.
    return [{"prompt_token_ids": [(11 * (i + base) + 5 * j) % 370 + 7 for j in range(5 + (i * 7) % 29)]}
            for i in range(n)]


def _generate_rows(llm: LLM, rows: list[int], logprobs=None) -> list:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=logprobs)
    outs = []
    for n in rows:  # each call's decode steps run n rows (a bucket full or padded)
        for o in llm.generate(_prompts(n, base=n), params, use_tqdm=False):
            assert o.outputs[0].finish_reason == "length", o.error
            outs.append(o.outputs[0])
    return outs


def _llm(path: str, dtype: str, eager: bool, **kw) -> LLM:
    return LLM(path, dtype=dtype, block_size=16, num_kv_blocks=160, max_num_seqs=64, max_num_batched_tokens=4096,
               enforce_eager=eager, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_bucket_agrees_with_eager(smol_dir, dtype, caplog):
    logprobs = None if dtype == "float32" else 2
    ref = _generate_rows(_llm(smol_dir, dtype, True), ROWS, logprobs)
    llm = _llm(smol_dir, dtype, False)
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        outs = _generate_rows(llm, ROWS, logprobs)
    compiled = llm.engine.runner.compiled
    assert not compiled.failed and not compiled.eager_graphs, compiled.eager_graphs
    assert compiled.checked >= {(b, False) for b in (1, 2, 4, 8, 16, 32, 64)}  # each trusted on real rows
    assert not [r for r in caplog.records if "eagerly" in r.getMessage()]
    if dtype == "float32":
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        return
    # bf16: token for token up to an exact tie of the eager step's two best logprobs.
    assert tokens_equal_up_to_bf16_ties(ref, outs) >= 0.9


def test_speculative_verification_buckets_agree_with_eager(smol_dir):
    """The extra verification sizes of speculative decoding (3, 6, 12 rows) pass the self-check
    and leave greedy output identical to plain greedy decoding."""
    spec = {"method": "ngram", "num_speculative_tokens": 11, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    prompts = [{"prompt_token_ids": [7, 8, 9, 10, 11] * 6}, {"prompt_token_ids": [20, 21, 22] * 9}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in _llm(smol_dir, "float32", True).generate(prompts, params, use_tqdm=False)]
    llm = _llm(smol_dir, "float32", False, speculative_config=spec)
    compiled = llm.engine.runner.compiled
    compiled.warmup([3, 6, 12])
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs == ref
    assert {3, 6, 12} <= set(compiled.sizes) and not compiled.eager_graphs and not compiled.failed


# ---- non-finite values -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_nonfinite")))


def _small(path: str, eager: bool, **kw) -> LLM:
    return LLM(path, dtype="float32", block_size=4, num_kv_blocks=96, max_num_seqs=8, enforce_eager=eager, **kw)


PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_nan_in_unwritten_slots_reaches_no_row(tiny_dir, eager):
    """Every slot of the cache (and the scratch block) holds NaN before the requests start: the
    slots they write get real K/V, the rest stay NaN and are masked. The tokens are unchanged."""
    prompts = _prompts(5)
    ref = [o.outputs[0].token_ids for o in _small(tiny_dir, eager).generate(prompts, PARAMS, use_tqdm=False)]
    llm = _small(tiny_dir, eager, enable_prefix_caching=False)
    for cache in llm.engine.runner.kv_caches:
        cache.fill_(float("nan"))
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 5
    assert [o.outputs[0].token_ids for o in outs] == ref


def _poison_embedding(llm: LLM, token: int) -> None:
    """Rows whose input token is ``token`` get a NaN embedding: their K/V (every layer) and their
    logits are NaN, in the eager and the compiled step alike (the hook runs in both)."""
    embed = llm.engine.runner.model.model.embed_tokens

    def hook(module, args, out):
        bad = (args[0] == token)[:, None]
        return torch.where(bad, torch.full_like(out, float("nan")), out)
    embed.register_forward_hook(hook)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_a_nonfinite_request_fails_alone_and_its_blocks_are_cleared(tiny_dir, eager):
    poison = 3  # in the victim's prompt only (the others' ids are >= 7)
    prompts = _prompts(6)
    prompts[2] = {"prompt_token_ids": [9, 10, 11, 12, 13, 14, 15, poison] + list(range(20, 30))}
    llm = _small(tiny_dir, eager)
    # (compiled float32 steps equal eager ones token for token: test_every_bucket_agrees_with_eager)
    ref = [o.outputs[0].token_ids for o in _small(tiny_dir, True).generate(_prompts(64, base=100), PARAMS,
                                                                            use_tqdm=False)]
    _poison_embedding(llm, poison)
    engine = llm.engine
    for cache in engine.runner.kv_caches:  # allocated uninitialised (any bits): start clean to see what
        cache.zero_()                      # the poisoned request leaves behind
    forgotten: list[int] = []
    forget = engine.block_manager.forget

    clear = engine.runner.clear_blocks
    cleared_then: list[bool] = []

    def spy(seq):
        ids = forget(seq)
        forgotten.extend(ids)
        return ids

    def clear_spy(ids):  # right after clearing: zero in every layer, and not a cached prefix
        clear(ids)
        cleared_then.append(all(bool((c[:, ids] == 0).all()) for c in engine.runner.kv_caches)
                            and not set(engine.block_manager.cached.values()) & set(ids))
    engine.block_manager.forget = spy
    engine.runner.clear_blocks = clear_spy
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert outs[2].outputs[0].finish_reason == "error" and "NaN or inf logits" in outs[2].error
    assert [o.outputs[0].finish_reason for i, o in enumerate(outs) if i != 2] == ["length"] * 5
    assert forgotten and cleared_then == [True]  # the victim's private blocks: zeroed, uncached
    for cache in engine.runner.kv_caches:  # no NaN left anywhere in the pool
        assert torch.isfinite(cache[:, :engine.num_kv_blocks]).all()
    # The next 64 requests reuse those blocks: all complete, with the tokens of a clean engine.
    outs = llm.generate(_prompts(64, base=100), PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert engine.block_manager.usage() == 0.0 and engine.stats["failed_requests"] == 1


def test_a_nonfinite_compiled_step_is_recomputed_eagerly(tiny_dir, caplog):
    """A compiled bucket computes NaN (as the 64-row bucket did on an AMX Xeon): that step runs
    again eagerly, no request fails, the bucket stays eager with one warning, others keep theirs."""
    prompts = _prompts(4)
    ref = [o.outputs[0].token_ids for o in _small(tiny_dir, True).generate(prompts, PARAMS, use_tqdm=False)]
    llm = _small(tiny_dir, False)
    compiled = llm.engine.runner.compiled
    compiled.warmup([1, 2, 4])
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate(prompts[:1], short, use_tqdm=False)  # buckets 1 and 4 trusted on real rows
    llm.generate(prompts, short, use_tqdm=False)
    assert {(1, False), (4, False)} <= compiled.checked
    graph = compiled.direct[(4, False)]
    nan_graph = lambda *args: [torch.full_like(t, float("nan")) if t.is_floating_point() else t  # noqa: E731
                               for t in graph[0](*args)]
    compiled.direct[(4, False)] = (nan_graph, *graph[1:])
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.engine.stats["failed_requests"] == 0
    assert (4, False) in compiled.eager_graphs and (1, False) not in compiled.eager_graphs
    warnings = [r.getMessage() for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "bucket 4" in warnings[0] and "non-finite" in warnings[0]


def test_a_graph_that_disagrees_with_eager_is_not_trusted(tiny_dir, caplog):
    """At a bucket's first real step the self-check compares it with the eager step: a graph off by
    a little more than the tolerance runs eagerly from then on and that step's logits are eager."""
    prompts = _prompts(2)
    ref = [o.outputs[0].token_ids for o in _small(tiny_dir, True).generate(prompts, PARAMS, use_tqdm=False)]
    llm = _small(tiny_dir, False)
    compiled = llm.engine.runner.compiled
    compiled.warmup([2])
    graph = compiled.direct[(2, False)]

    def skewed(*args):  # the logits (first output) tilted by up to 0.5 across the vocabulary
        logits, *rest = graph[0](*args)
        return [logits + 0.5 * torch.arange(logits.shape[-1]) / logits.shape[-1], *rest]

    compiled.direct[(2, False)] = (skewed, *graph[1:])
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert "disagrees with the eager step" in compiled.eager_graphs[(2, False)]
    assert len([r for r in caplog.records if "runs eagerly" in r.getMessage()]) == 1


def test_self_check_tolerances():
    torch.manual_seed(0)
    ref = torch.randn(3, 500) * 8
    for dtype, noise in ((torch.float32, 1e-5), (torch.bfloat16, 5e-3)):
        check = SelfCheck.for_dtype(dtype)
        assert check.compare(ref + noise * torch.randn_like(ref), ref) is None
        bad = ref.clone()
        bad[1, 7] = float("nan")
        assert "non-finite" in check.compare(bad, ref)
        assert "differ" in check.compare(ref + torch.randn_like(ref), ref)
    swapped = ref.clone()
    top = ref.argmax(dim=-1)
    swapped[0, top[0]] = -100  # the compiled top token is far from the eager one: not a tie
    assert "greedy token of row 0" in SelfCheck(rtol=100.0, tie=1e-3).compare(swapped, ref)


# ---- benchmarks count what was produced --------------------------------------------------------

def test_bench_with_a_failed_request_exits_non_zero(tiny_dir, monkeypatch, capsys):
    """`pagedlm bench` counts produced tokens, reports the failed request and exits 1."""
    import json

    from pagedlm.bench import BenchConfig, make_workload
    from pagedlm.cli import main

    args = ["bench", "--model", tiny_dir, "--dtype", "float32", "--num-requests", "6", "--input-len", "8:16",
            "--output-len", "4:8", "--warmup", "0", "--enforce-eager"]
    assert main(args) == 0
    work = make_workload(BenchConfig(num_requests=6, input_len=(8, 16), output_len=(4, 8)), 384)
    victim = next(t for t in work[2][0] if all(t not in p for i, (p, _) in enumerate(work) if i != 2))
    monkeypatch.setenv("PAGEDLM_FAULT_INJECT", json.dumps({"token": victim, "stage": "sample"}))
    capsys.readouterr()
    assert main(args) == 1
    out = capsys.readouterr()
    assert "(1 failed)" in out.out and "FAILED: 1 of 6 requests failed" in out.err
    produced = int(out.out.split("output tokens produced: ")[1].split()[0])
    assert produced == sum(n for i, (_, n) in enumerate(work) if i != 2)
