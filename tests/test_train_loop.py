"""The training loop: exact resume, a mismatched resume refused without losing a checkpoint,
LoRA that learns, and bad LoRA settings."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from pagedlm.train.data import Example, make_rows
from pagedlm.train.loop import TrainConfig, Trainer, list_checkpoints
from pagedlm.train.lora import add_lora
from pagedlm.train.model import make_trainable
from tests.helpers import hf_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_tiny("llama").save_pretrained(path)
    return str(path)


def rows_for(vocab: int, n: int = 24, seq_len: int = 32):
    g = torch.Generator().manual_seed(3)
    exs = []
    for _ in range(n):
        k = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(0, vocab, (k,), generator=g).tolist()
        exs.append(Example(ids, [False] * 3 + [True] * (k - 3)))
    return make_rows(exs, seq_len, pack=True)


def lora_model(path: str, seed: int = 0):
    cfg = ModelConfig.from_pretrained(path)
    model = make_trainable(load_model(path, cfg, torch.float32))
    torch.manual_seed(seed)
    add_lora(model, r=4, alpha=8, targets="all-linear")
    return model


def cfg_for(out: str, **kw) -> TrainConfig:
    base = dict(out_dir=out, steps=6, batch_size=2, grad_accum=2, seq_len=32, lr=1e-2, warmup_steps=2,
                save_every=2, keep_last=2, progress=False, extra={"model": "tiny"})
    return TrainConfig(**{**base, **kw})


def test_resume_equals_uninterrupted(tiny_dir, tmp_path):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    rows = rows_for(cfg.vocab_size)
    full = Trainer(lora_model(tiny_dir), cfg_for(str(tmp_path / "a")), rows, rows[:3]).fit()
    ckpts = list_checkpoints(str(tmp_path / "a" / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == ["step-000002", "step-000004"]  # keep_last=2
    assert full[-1]["loss"] < full[0]["loss"]  # it learns

    # "Interrupted" after step 4: a new process, a fresh model, the step-4 checkpoint.
    t = Trainer(lora_model(tiny_dir, seed=123), cfg_for(str(tmp_path / "a")), rows, rows[:3])
    t.load_checkpoint(ckpts[-1])
    resumed = t.fit()
    assert [r["step"] for r in resumed] == [5, 6]
    for a, b in zip(full[4:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
    assert full[-1]["eval_loss"] == resumed[-1]["eval_loss"]
    with open(tmp_path / "a" / "log.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log continues, no duplicates


def test_resume_from_mismatched_run_is_refused_and_keeps_checkpoint(tiny_dir, tmp_path):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    rows = rows_for(cfg.vocab_size)
    Trainer(lora_model(tiny_dir), cfg_for(str(tmp_path), steps=2), rows).fit()
    Trainer(lora_model(tiny_dir), cfg_for(str(tmp_path), steps=4, save_every=2), rows).fit()
    ckpt = list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    before = sorted(os.listdir(ckpt))
    t = Trainer(lora_model(tiny_dir), cfg_for(str(tmp_path), steps=4, lr=5e-3), rows)
    with pytest.raises(ValueError, match=r"lr=0.01.*lr=0.005"):
        t.load_checkpoint(ckpt)
    assert sorted(os.listdir(ckpt)) == before


def test_bad_lora_settings(tiny_dir):
    model = make_trainable(load_model(tiny_dir, ModelConfig.from_pretrained(tiny_dir), torch.float32))
    with pytest.raises(ValueError, match=r"unknown LoRA target module 'qkv'.*q_proj"):
        add_lora(model, 4, 8, targets="q_proj,qkv")
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        add_lora(model, 0, 8)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        TrainConfig(out_dir="x", batch_size=0)
