"""The roofline line of ``pagedlm bench``: the bytes a decode step reads, counted from the model's
own layers, and the report line that sets the measured step rate against the copy bandwidth."""

from __future__ import annotations

import pytest
import torch

from pagedlm.bench import copy_bandwidth_gbps, decode_step_bytes, format_report, roofline
from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from tests.helpers import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_roofline")), with_tokenizer=False)


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_decode_step_bytes_counts_every_linear_and_the_head_as_stored(tiny_dir, quantization):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    model = load_model(tiny_dir, cfg, torch.float32, quantization=quantization, dense_min_rows=1 << 20)
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = [(qkv, h), (h, cfg.num_attention_heads * cfg.head_dim), (2 * i, h), (h, i)] * layers
    shapes.append((cfg.vocab_size, h))  # the head
    weights = sum(o * k for o, k in shapes)
    per_weight = {"none": 4.0, "int8": 1.0, "int4": 0.5}[quantization]
    got = decode_step_bytes(model)
    # Scales on top of the weights: none for dense; per output row (int8) or per block of 32 (int4).
    assert weights * per_weight <= got <= weights * per_weight * 1.6
    if quantization == "none":
        assert got == weights * 4


def test_the_report_prints_the_roofline():
    class Eng:  # what ``roofline`` reads of an engine
        class runner:  # noqa: N801
            model = torch.nn.Sequential(torch.nn.Linear(256, 256))

    assert roofline(Eng, {"itl_p50_ms": 10.0}) == {}  # a plain nn.Linear is not one of pagedlm's layers
    r = {"requests": 1, "prompt_tokens": 1, "output_tokens": 2, "wall_s": 1.0, "steps": 2, "requests_per_s": 1.0,
         "output_tokens_per_s": 2.0, "total_tokens_per_s": 3.0, "ttft_mean_ms": 1.0, "ttft_p50_ms": 1.0,
         "ttft_p99_ms": 1.0, "itl_mean_ms": 10.0, "itl_p50_ms": 10.0, "itl_p99_ms": 10.0, "copy_bandwidth_GBps": 10.0,
         "decode_step_bytes": 50_000_000, "roofline_steps_per_s": 200.0, "decode_steps_per_s": 100.0,
         "roofline_pct": 50.0}
    line = format_report(r).splitlines()[-1]
    assert "10.0 GB/s" in line and "50.0 MB" in line and "200 steps/s" in line and "50% of roofline" in line


def test_copy_bandwidth_is_measured():
    assert 0.1 < copy_bandwidth_gbps(8 << 20, repeats=2) < 10_000
