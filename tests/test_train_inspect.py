"""``inspect --train`` arithmetic against the real training objects: parameter and adapter counts,
optimizer state sizes, ZeRO partitioning, and the CLI output."""

from __future__ import annotations

import torch

from pagedlm.analysis.training import fit_tokens, lora_params, training_flops_per_token, training_memory
from pagedlm.cli import main
from pagedlm.config import ModelConfig
from pagedlm.model.registry import build_model
from pagedlm.train.lora import add_lora
from tests.helpers import hf_tiny


def test_counts_match_the_training_model(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = build_model(cfg, torch.float32, trainable=True)
    total = sum(p.numel() for p in model.parameters())
    m = training_memory(cfg, tokens=64)
    assert m["weights"] == 4 * total and m["gradients"] == 4 * total
    # AdamW's state after one step: two fp32 moments per parameter
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert m["optimizer"] == moments
    add_lora(model, r=4, alpha=8)
    assert lora_params(cfg, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero_stages_and_checkpointing_shrink_memory(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    base = training_memory(cfg, 512, world=4)
    z = [training_memory(cfg, 512, world=4, zero=s) for s in (1, 2, 3)]
    assert z[0]["optimizer"] == base["optimizer"] / 4 and z[0]["gradients"] == base["gradients"]
    assert z[1]["gradients"] == base["gradients"] / 4 and z[2]["weights"] == base["weights"] / 4
    ck = training_memory(cfg, 512, checkpointing=True)
    assert ck["activations"] < base["activations"]
    budget = base["total"]
    assert fit_tokens(cfg, budget) == 512 or abs(fit_tokens(cfg, budget) - 512) <= 1
    assert fit_tokens(cfg, budget, checkpointing=True) > 512
    f = training_flops_per_token(cfg, 128)
    n = sum(p.numel() for n_, p in build_model(cfg, torch.float32).named_parameters()
            if n_.endswith("proj.weight") or n_ == "lm_head.weight")
    assert f["6N"] == 6 * n and f["total"] > f["6N"]


def test_inspect_train_cli(tmp_path, capsys):
    hf_tiny("llama").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--train", "--seq", "128", "--ranks", "2", "--memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "Training (128 tokens per micro-batch" in out and "ckpt zero-3" in out and "6N =" in out
