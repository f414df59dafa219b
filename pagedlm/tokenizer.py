"""Tokenizer loading (HF directory or GGUF metadata), chat templates, incremental detokenizing.

Tokenizers come from ``transformers``: pagedlm writes no BPE. Building a fast tokenizer from a
GGUF vocabulary takes seconds (half a minute for Gemma's 262k tokens), so the converted
tokenizer is kept in the cache (``pagedlm.cache``, kind ``tokenizers``), keyed by the file's
identity and the pagedlm / transformers / tokenizers versions that built it, and reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _tokenizer_key(weights_path: str) -> str:
    import tokenizers
    import transformers

    from pagedlm import __version__
    from pagedlm.cache import entry_name, file_key, key

    k = key("tokenizer", file_key(weights_path), __version__, transformers.__version__, tokenizers.__version__)
    return entry_name(os.path.basename(weights_path), k)


def _load_cached(path: Path):
    from transformers import AutoTokenizer

    # A folder without tokenizer.json (deleted, never finished) would otherwise load as some
    # other tokenizer class or fail obscurely: refuse it so the cache rebuilds it.
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer.json'} is missing")
    return AutoTokenizer.from_pretrained(str(path))


def load_tokenizer(model_path: str, weights_path: str):
    """The tokenizer for a model, or None when the model ships none (token-id prompts only)."""
    from transformers import AutoTokenizer

    if weights_path.endswith(".gguf"):
        from pagedlm.cache import cached_entry

        def build(into: Path):
            tok = AutoTokenizer.from_pretrained(os.path.dirname(weights_path) or ".",
                                                gguf_file=os.path.basename(weights_path))
            tok.save_pretrained(str(into))
            return tok

        return cached_entry("tokenizers", _tokenizer_key(weights_path), _load_cached, build,
                            what=f"tokenizer of {os.path.basename(weights_path)}")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(model_path) and any(os.path.isfile(os.path.join(model_path, n)) for n in names):
        return AutoTokenizer.from_pretrained(model_path)
    return None


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None) -> str:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so chat messages cannot be rendered")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


class IncrementalDetokenizer:
    """Emits text as tokens arrive, never splitting a UTF-8 character: text that decodes to a
    trailing replacement character is held back until the next token completes it. Decodes only
    a short window of recent tokens per step (prefix/read offsets, as vLLM does)."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # Start from a few prompt tokens so the first output token decodes with its leading space.
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is left, even an incomplete character."""
        full = self._decode(self.ids[self.prefix_offset:])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
