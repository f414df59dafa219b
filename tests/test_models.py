"""pagedlm's model code against transformers' implementation of the same weights.

Tolerance: float32 logits within 1e-4 x max(1, |logits|max). Both sides run the same float32
math in a different order (fused qkv, SDPA vs eager attention), so they differ by rounding only:
observed differences are ~1e-7 on logits of scale ~1. A real bug (a wrong rope half, a missing
norm offset, a window off by one) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.layers.attention import AttentionMetadata, PrefillSegment
from pagedlm.model.registry import load_model
from tests.helpers import hf_tiny

KINDS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]


def run_pagedlm(model, ids: torch.Tensor, prefill: int, block_size: int = 4) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens, then one decode step per remaining token."""
    n = len(ids)
    nb = (n + block_size - 1) // block_size + 1
    from pagedlm.model.layers.matmul import split_dtype

    dtype = split_dtype(next(model.parameters()).dtype)[1]  # the compute dtype holds the KV cache
    for a in model.attention_layers():
        a.kv_cache = torch.zeros(a.kv_cache_shape(nb, block_size), dtype=dtype)
    table = torch.randperm(nb)  # blocks need not be contiguous
    slots = lambda ps: torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in ps])  # noqa: E731
    out = []
    with torch.no_grad():
        meta = AttentionMetadata(slot_mapping=slots(range(prefill)), block_size=block_size,
                                 prefills=[PrefillSegment(0, prefill, prefill, table)])
        out.append(model.compute_logits(model(ids[:prefill], torch.arange(prefill), meta)))
        for t in range(prefill, n):
            meta = AttentionMetadata(slot_mapping=slots([t]), num_decodes=1, decode_block_tables=table[None],
                                     decode_context_lens=torch.tensor([t + 1]), decode_max_context=t + 1,
                                     block_size=block_size)
            out.append(model.compute_logits(model(ids[t:t + 1], torch.tensor([t]), meta)))
    return torch.cat(out).float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
    hf = hf_tiny(kind)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = load_model(str(tmp_path), cfg, torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (20,))  # longer than the tiny sliding windows
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(run_pagedlm(model, ids, prefill=11), ref)


def test_chunked_prefill_over_cached_prefix_matches(tmp_path):
    """A second prefill chunk attends to the first chunk through the block table."""
    hf = hf_tiny("gemma3")
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), ModelConfig.from_pretrained(str(tmp_path)), torch.float32)
    ids = torch.randint(0, 384, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    bs, nb = 4, 5
    for a in model.attention_layers():
        a.kv_cache = torch.zeros(a.kv_cache_shape(nb, bs))
    table = torch.tensor([3, 0, 4, 1, 2])
    slots = lambda ps: torch.tensor([int(table[p // bs]) * bs + p % bs for p in ps])  # noqa: E731
    with torch.no_grad():
        m1 = AttentionMetadata(slot_mapping=slots(range(7)), block_size=bs, prefills=[PrefillSegment(0, 7, 7, table)])
        a = model.compute_logits(model(ids[:7], torch.arange(7), m1))
        m2 = AttentionMetadata(slot_mapping=slots(range(7, 16)), block_size=bs,
                               prefills=[PrefillSegment(0, 9, 16, table)])
        b = model.compute_logits(model(ids[7:], torch.arange(7, 16), m2))
    assert_close(torch.cat([a, b]), ref)


def test_bfloat16_close_to_float32(tmp_path):
    hf = hf_tiny("llama")
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    f32 = run_pagedlm(load_model(str(tmp_path), cfg, torch.float32), ids, 6)
    bf16 = run_pagedlm(load_model(str(tmp_path), cfg, torch.bfloat16), ids, 6).float()
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max().item() < 0.05 * max(1.0, f32.abs().max().item())


def test_sharded_safetensors_and_bin(tmp_path):
    hf = hf_tiny("qwen3")
    ids = torch.randint(0, 384, (9,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    cfg = ModelConfig.from_pretrained(str(sharded))
    assert_close(run_pagedlm(load_model(str(sharded), cfg, torch.float32), ids, 5), ref)

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    assert_close(run_pagedlm(load_model(str(binary), cfg, torch.float32), ids, 5), ref)


def test_bin_rejects_pickled_objects(tmp_path):
    """pytorch_model.bin goes through torch.load(weights_only=True): arbitrary pickles are refused."""
    from pagedlm.errors import ModelLoadError

    hf = hf_tiny("llama")
    hf.config.save_pretrained(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(str(tmp_path), ModelConfig.from_pretrained(str(tmp_path)), torch.float32)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_eager_prefill_uses_the_fused_ops_where_it_can(kind, tmp_path, monkeypatch):
    """Inference with pagedlm's kernels loaded: the norms and rope take the one-pass kernels
    (``basic.fused_ops``), with logits as torch's separate ops give them to float32
    rounding (and transformers' within this file's tolerance, above); with autograd on
    (training) they do not run."""
    from pagedlm import kernels
    from pagedlm.model.layers import basic

    if kernels.ops() is None:
        pytest.skip("no C++ compiler: pagedlm's kernels are not built here")
    hf = hf_tiny(kind)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), ModelConfig.from_pretrained(str(tmp_path)), torch.float32)
    ids = torch.randint(0, 384, (20,), generator=torch.Generator().manual_seed(5))
    used = []
    real = basic.fused_ops

    def watched(x):
        ops = real(x)
        used.append(ops is not None)
        return ops

    monkeypatch.setattr("pagedlm.model.layers.basic.fused_ops", watched)
    fused = run_pagedlm(model, ids, prefill=20)
    assert used and all(used)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(fused, ref)
    monkeypatch.setattr("pagedlm.model.layers.basic.fused_ops", lambda x: None)
    torch.testing.assert_close(fused, run_pagedlm(model, ids, prefill=20), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr("pagedlm.model.layers.basic.fused_ops", watched)
    used.clear()
    meta = AttentionMetadata(slot_mapping=torch.arange(4), block_size=4,
                             prefills=[PrefillSegment(0, 4, 4, torch.tensor([0, 1]))])
    model(ids[:4], torch.arange(4), meta).sum().backward()
    assert used and not any(used)
