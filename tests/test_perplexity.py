"""pagedlm perplexity: what quantization costs on real weights, and the sliding window itself."""

from __future__ import annotations

import math
import os

import pytest
import torch

from pagedlm import LLM
from pagedlm.perplexity import perplexity

TEXT = os.path.join(os.path.dirname(__file__), "data", "public_domain_en.txt")


def test_window_scores_every_token_once(tiny_llama_dir):
    """The strided windows score tokens 1..n-1 exactly once: the NLL equals one pass over the
    whole text when the window holds it all, and stays close with shorter windows."""
    llm = LLM(tiny_llama_dir, dtype="float32", num_kv_blocks=64)
    ids = torch.randint(3, 300, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = perplexity(llm.engine, ids, ctx=128)
    assert whole.num_tokens == 69 and len(whole.top1) == 69
    for ctx, stride in ((32, 16), (40, 7), (20, 19)):
        r = perplexity(llm.engine, ids, ctx=ctx, stride=stride)
        assert r.num_tokens == 69
        assert math.isfinite(r.ppl) and abs(r.nll - whole.nll) < 0.2 * whole.nll
    # With a window covering everything the windows change nothing.
    assert perplexity(llm.engine, ids, ctx=100, stride=50).nll == pytest.approx(whole.nll, rel=1e-5)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_bad_windows_are_value_errors(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="stride"):
        perplexity(llm.engine, [1, 2, 3], ctx=8, stride=8)
    with pytest.raises(ValueError, match="ctx"):
        perplexity(llm.engine, [1, 2, 3], ctx=1)
    with pytest.raises(ValueError, match="max_model_len"):
        perplexity(llm.engine, [1, 2, 3], ctx=64)
    with pytest.raises(ValueError, match="fewer than 2"):
        perplexity(llm.engine, [1], ctx=8)


@pytest.mark.slow
def test_smollm2_quantized_perplexity_and_agreement(smollm2, smollm2_llm):
    """The shipped Q4_1 file run as int4 (+ int8 head): perplexity within 2% of the dequantised
    float32 model on the shipped text, and the same top-1 token at >= 95% of positions."""
    ids = smollm2_llm.engine.encode(open(TEXT, encoding="utf-8").read())
    assert len(ids) > 1500
    ref = perplexity(smollm2_llm.engine, ids)
    quant = LLM(smollm2, dtype="float32", kv_cache_memory=128 << 20)  # auto: the file's precision
    assert quant.engine.runner.quant_counts == {"int4": 120, "int8": 1}
    q = perplexity(quant.engine, ids)
    assert 5 < ref.ppl < 40  # a sane English perplexity for a 135M model
    assert abs(q.ppl - ref.ppl) / ref.ppl < 0.02
    agree = sum(a == b for a, b in zip(ref.top1, q.top1)) / len(ref.top1)
    assert agree >= 0.95


def test_cli_perplexity(tiny_llama_dir, tmp_path, capsys):
    from pagedlm.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    assert main(["perplexity", tiny_llama_dir, "--file", str(text), "--ctx", "32", "--enforce-eager",
                 "--kv-cache-memory", "8M"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "tokens/s" in out
    assert main(["perplexity", tiny_llama_dir, "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["perplexity", tiny_llama_dir, "--file", str(text), "--ctx", "1", "--kv-cache-memory", "8M"]) == 2
    assert "ctx" in capsys.readouterr().err
