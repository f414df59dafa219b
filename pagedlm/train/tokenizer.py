"""``pagedlm train-tokenizer``: a byte-level BPE (GPT-2 / Llama 3 style: every byte is a token, so
nothing is ever unknown) trained with the ``tokenizers`` library, saved as tokenizer.json +
tokenizer_config.json (with a ChatML template) that the engine and transformers load."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _lines(files: Iterable[str]) -> Iterator[str]:
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer training file {path!r} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def train_bpe(files: list[str], vocab_size: int, special_tokens: list[str] | None = None,
              chat_template: str | None = CHATML, min_frequency: int = 2):
    """A fast tokenizer (transformers' ``PreTrainedTokenizerFast``): BOS/pad ``<|endoftext|>``, EOS
    ``<|im_end|>`` (the end of a chat turn) unless other special tokens are given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens or DEFAULT_SPECIALS)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab size must be at least 256 bytes + {len(specials)} special tokens, got {vocab_size!r}")
    if not files:
        raise ValueError("no training files given")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_lines(files), trainer)
    eos = "<|im_end|>" if "<|im_end|>" in specials else specials[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=eos, pad_token=specials[0])
    if chat_template:
        fast.chat_template = chat_template
    return fast
