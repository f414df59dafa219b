"""`pagedlm inspect` and the engine read the same ModelConfig, so they must agree exactly: the
tool's parameter count equals the numel of the model pagedlm builds, and its KV bytes per token
equal what the engine allocates per token."""

from __future__ import annotations

import pytest
import torch

from pagedlm import LLM
from pagedlm.analysis.memory import kv_cache_bytes_per_token
from pagedlm.analysis.params import count_parameters
from pagedlm.config import ModelConfig
from pagedlm.model.registry import build_model
from tests.helpers import KINDS_ALL, hf_tiny


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_param_count_equals_built_model(kind, tmp_path):
    hf_tiny(kind).save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = build_model(cfg, torch.float32)
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_bytes_per_token_equal_engine_allocation(kind, dtype, tmp_path):
    from pagedlm.model.layers.matmul import split_dtype
    from pagedlm.model.registry import resolve_dtype

    hf_tiny(kind).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype=dtype, num_kv_blocks=8, block_size=4)
    eng = llm.engine
    # The cache holds the compute dtype: fp32 for bf16 weights on CPUs without native bf16.
    kv_dtype = split_dtype(resolve_dtype(dtype))[1]
    assert eng.runner.dtype == kv_dtype
    nbytes = kv_dtype.itemsize
    allocated = sum(c.numel() * c.element_size() for c in eng.runner.kv_caches)
    per_token = allocated // (eng.num_kv_blocks * eng.config.block_size)
    assert per_token == eng.kv_bytes_per_token == kv_cache_bytes_per_token(eng.model_config, nbytes)


def test_smollm2_count_from_gguf_equals_model(smollm2):
    cfg = ModelConfig.from_pretrained(smollm2)
    model = build_model(cfg, torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg).total == n == 134_515_008
