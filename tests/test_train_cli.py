"""The training commands end to end on tiny models: train-tokenizer output in the engine,
pretrain -> generate, finetune -> adapter in the engine, and bad input -> a message naming the
value and a non-zero exit (never a traceback)."""

from __future__ import annotations

import json
import os

import pytest

from pagedlm.cli import main
from tests.helpers import CORPUS, save_tiny


@pytest.fixture
def corpus(tmp_path) -> str:
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(CORPUS * 3))
    return str(p)


def test_train_tokenizer_loads_in_engine_and_round_trips(tmp_path, corpus, capsys):
    out = str(tmp_path / "tok")
    assert main(["train-tokenizer", corpus, "--output", out, "--vocab-size", "400"]) == 0
    from pagedlm.tokenizer import load_tokenizer

    tok = load_tokenizer(out, out)  # the engine's own loading path
    text = "Paged attention: café, naïve, 日本語 🙂 — and words never seen: zyxwv."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == 400 and len(ids) < len(text.encode())  # merges were learned
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_pretrain_writes_a_model_generate_runs(tmp_path, corpus, capsys):
    out = str(tmp_path / "pre")
    args = ["pretrain", "--data", corpus, "--output", out, "--vocab-size", "320", "--hidden-size", "32",
            "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64", "--seq-len", "32",
            "--steps", "6", "--batch-size", "4", "--warmup-steps", "1", "--samples", "1", "--no-progress"]
    assert main(args) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == list(range(1, 7)) and "eval_loss" in log[-1]
    assert log[-1]["loss"] < log[0]["loss"]
    capsys.readouterr()
    assert main(["generate", "The quick", "--model", out, "--max-tokens", "4", "--enforce-eager"]) == 0


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = save_tiny("llama", str(root / "m"))
    data = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Hello {i}"}, {"role": "assistant", "content": "Fine."}]}
            for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model, str(data)


def test_finetune_writes_an_adapter_the_engine_serves(tiny_chat, tmp_path, capsys):
    model, data = tiny_chat
    out = str(tmp_path / "ad")
    args = ["finetune", "--model", model, "--data", data, "--output", out, "--steps", "3", "--batch-size", "2",
            "--seq-len", "64", "--lora-r", "4", "--save-every", "2", "--samples", "1", "--no-progress"]
    assert main(args) == 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000002"))
    assert "answer:" in capsys.readouterr().out  # samples came from the engine with the adapter
    capsys.readouterr()
    assert main(["generate", "Hello", "--model", model, "--lora-modules", f"t={out}", "--max-tokens", "3",
                 "--enforce-eager", "--quantization", "none"]) == 0


@pytest.mark.parametrize("extra, line, message", [
    ([], '{"messages": [{"role": "user", "content": "hi"}]}', "chat has no assistant turn"),
    ([], '{"messages": [', "chat.jsonl:2: malformed JSON"),
    (["--target-modules", "q_proj,wq"], None, "unknown LoRA target module 'wq'"),
    (["--global-batch-size", "3", "--grad-accum", "2"], None, "--global-batch-size 3 is not divisible"),
    (["--lora-r", "0"], None, "LoRA rank must be a positive integer, got 0"),
])
def test_finetune_bad_input(tiny_chat, tmp_path, capsys, extra, line, message):
    model, data = tiny_chat
    path = str(tmp_path / "chat.jsonl")
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    with open(path, "w") as f:
        f.write(good + "\n" + (line or good) + "\n")
    rc = main(["finetune", "--model", model, "--data", path, "--output", str(tmp_path / "o"), "--steps", "1",
               "--no-progress", "--samples", "0", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_resume_from_another_run_keeps_its_checkpoint(tiny_chat, tmp_path, capsys):
    model, data = tiny_chat
    out = str(tmp_path / "r")
    base = ["finetune", "--model", model, "--data", data, "--output", out, "--batch-size", "2", "--seq-len", "64",
            "--save-every", "2", "--samples", "0", "--no-progress"]
    assert main(base + ["--steps", "3"]) == 0
    ckpts = os.listdir(os.path.join(out, "checkpoints"))
    assert main(base + ["--steps", "4", "--lora-r", "8", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "it was trained with lora={'r': 16" in err and "this run has lora={'r': 8" in err, err
    assert os.listdir(os.path.join(out, "checkpoints")) == ckpts


@pytest.mark.parametrize("mode", ["--merge", "--full"])
def test_finetune_merge_and_full_write_an_hf_dir_generate_runs(tiny_chat, tmp_path, capsys, mode):
    model, data = tiny_chat
    out = str(tmp_path / "hf")
    assert main(["finetune", "--model", model, "--data", data, "--output", out, "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--lr", "1e-2", "--samples", "0", "--no-progress", mode]) == 0
    import torch
    import transformers as T

    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        tuned = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        base = T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(ids).logits
    assert (tuned - base).abs().max() > 1e-4  # the written weights are the trained ones
    assert main(["generate", "Hello", "--model", out, "--max-tokens", "3", "--enforce-eager"]) == 0
