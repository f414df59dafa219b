"""The compiled decode step and the in-place paged attention backend, against the eager
reference: attention outputs, and whole generations token for token under chunked prefill and
preemption; a compile failure falls back to eager with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.model.layers.attention import (
    AttentionMetadata,
    PagedAttentionBackend,
    PagedDecodeMetadata,
    TorchAttentionBackend,
)
from tests.helpers import save_tiny, tokens_equal_up_to_bf16_ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_backend_matches_torch_backend(dtype, window):
    torch.manual_seed(0)
    nb, bs, kvh, heads, d = 12, 4, 2, 6, 16
    lens = [1, 7, 13, 4]  # context per row, including the new token
    width = 5  # padded block-table width (> any row's blocks)
    perm = torch.randperm(nb - 1).tolist()
    tables, slots = [], []
    for i, n in enumerate(lens):
        blocks = [perm[(3 * i + j) % (nb - 1)] for j in range((n + bs - 1) // bs)]
        tables.append(blocks + [nb - 1] * (width - len(blocks)))
        slots.append(blocks[(n - 1) // bs] * bs + (n - 1) % bs)
    cache = torch.randn(2, nb, bs, kvh, d).to(dtype)
    q = torch.randn(4, heads, d).to(dtype)
    k, v = torch.randn(4, kvh, d).to(dtype), torch.randn(4, kvh, d).to(dtype)
    ref_cache, paged_cache = cache.clone(), cache.clone()
    slot_t = torch.tensor(slots)
    ref_meta = AttentionMetadata(slot_mapping=slot_t, num_decodes=4, decode_block_tables=torch.tensor(tables),
                                 decode_context_lens=torch.tensor(lens), decode_max_context=max(lens), block_size=bs)
    ref = TorchAttentionBackend.forward(q, k, v, ref_cache, ref_meta, 0.25, window)
    meta = PagedDecodeMetadata(slot_t, torch.tensor(tables), torch.tensor(lens), bs)
    out = PagedAttentionBackend.forward(q, k, v, paged_cache, meta, 0.25, window)
    assert torch.equal(ref_cache, paged_cache)  # the new K/V land in the same slots
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_compiled")))


def _run(path, dtype, eager, logprobs=None, **kw):
    llm = LLM(path, dtype=dtype, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=4,
              enforce_eager=eager, **kw)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 5 for j in range(n)]}
               for i, n in enumerate([3, 21, 9, 30, 5, 14])]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=logprobs)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    return llm, outs if logprobs else [o.token_ids for o in outs]


def test_compiled_decode_equals_eager_float32(tiny_dir, monkeypatch):
    """Six requests through four slots of a 96-token cache, 16-token steps: chunked prefill,
    preemption, decode batches of 1 to 4 padded to buckets 1, 2, 4 (the kernels skip the padding
    rows: a bucket-4 step of 3 live rows limits them to 3). Token for token."""
    from pagedlm import kernels

    limits = []
    real = kernels.row_limit
    monkeypatch.setattr(kernels, "row_limit", lambda n: limits.append(n) or real(n))
    have_kernels = kernels.ops() is not None  # loaded: attention runs pagedlm's kernel
    _, ref = _run(tiny_dir, "float32", True)
    llm, outs = _run(tiny_dir, "float32", False)
    if have_kernels:
        assert 3 in limits  # a step of 3 live rows in bucket 4
    compiled = llm.engine.runner.compiled
    assert compiled is not None and not compiled.failed
    assert compiled.compiled_buckets >= {1, 2, 4}  # every bucket ran
    assert set(compiled.direct) >= {(1, False), (2, False), (4, False)}  # ... called directly, past Dynamo's prologue
    assert llm.engine.get_metrics()["num_preemptions"] > 0
    assert outs == ref
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_compiled_decode_equals_eager_bfloat16(tiny_dir):
    """Same workload in bf16. Token for token, except that an exact tie of the reference's bf16
    logits may break the other way (the compiled graph rounds the head's output from other partial
    sums): a sequence may differ only where the eager step's two candidates had equal bf16
    logprobs, and is compared up to there."""
    _, ref = _run(tiny_dir, "bfloat16", True, logprobs=2)
    llm, outs = _run(tiny_dir, "bfloat16", False, logprobs=2)
    assert llm.engine.runner.compiled.compiled_buckets >= {1, 2, 4}
    assert tokens_equal_up_to_bf16_ties(ref, outs) >= 0.8


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny_dir, monkeypatch, caplog):
    from pagedlm.engine import compiled

    def broken(self, *args):
        raise RuntimeError("inductor is not available here")

    monkeypatch.setattr(compiled.CompiledDecode, "_forward", broken)
    _, ref = _run(tiny_dir, "float32", True)
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        llm, outs = _run(tiny_dir, "float32", False)
    assert outs == ref
    assert llm.engine.runner.compiled.failed
    warnings = [r for r in caplog.records if "compiled decode step failed" in r.getMessage()]
    assert len(warnings) == 1  # one warning, then eager for good (the reason is Dynamo's wording)
