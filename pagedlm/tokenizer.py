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


class _Field:
    """One metadata key as ``gguf.GGUFReader`` lays it out for transformers' ``_gguf_parse_value``:
    ``parts[i]`` for ``i`` in ``data`` parse to the value's elements under ``types``."""

    __slots__ = ("parts", "data", "types")

    def __init__(self, parts: list, types: list[int]):
        self.parts, self.data, self.types = parts, range(len(parts)), types


class _FastGGUFReader:
    """A stand-in for ``gguf.GGUFReader`` over pagedlm's reader (``pagedlm.loader.gguf``), with
    what transformers' ``load_gguf_checkpoint(return_tensors=False)`` reads: ``fields`` and the
    tensors' names. gguf's reader builds a numpy object per vocabulary entry (~5 s of the ~8 s a
    SmolLM2 tokenizer took to convert); the values are the same (tests/test_gguf_reader.py)."""

    def __init__(self, path_or_file):
        from pagedlm.loader import gguf as g

        f = path_or_file if isinstance(path_or_file, g.GGUFFile) else g.GGUFFile(path_or_file)
        raw = f.metadata._raw
        self.fields: dict[str, _Field] = {}
        for key in f.metadata:
            vtype = f._types.get(key)
            etype = getattr(raw.get(key), "elem_type", None)  # before the array is decoded
            v = f.metadata[key]
            if vtype == g.ARRAY:
                if etype is None:  # decoded before: the element type from the values
                    etype = g.STRING if v and isinstance(v[0], str) else g.FLOAT32 if v and isinstance(v[0], float) else g.INT32
                if etype == g.ARRAY:
                    raise NotImplementedError(f"nested array {key!r}")
                self.fields[key] = _Field([_part(x) for x in v], [g.ARRAY, etype])
            else:
                if vtype is None:  # the reader's pseudo-keys (GGUF.version, ...)
                    vtype = g.STRING if isinstance(v, str) else g.UINT64
                self.fields[key] = _Field([_part(v)], [vtype])
        self.tensors = [_Named(t.name) for t in f.tensors]


class _Named:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _part(v):
    return v.encode() if isinstance(v, str) else (v,)


_READER_LOCK = __import__("threading").Lock()


def _tokenizer_from_gguf(weights_path: str, file=None):
    """transformers' GGUF tokenizer conversion, reading the file with pagedlm's reader (``file``:
    the caller's open ``GGUFFile`` of it, else opened here; gguf's reader when the file holds
    something the stand-in does not lay out)."""
    import gguf
    from transformers import AutoTokenizer

    def convert():
        return AutoTokenizer.from_pretrained(os.path.dirname(weights_path) or ".",
                                             gguf_file=os.path.basename(weights_path))

    with _READER_LOCK:
        real = gguf.GGUFReader
        gguf.GGUFReader = _FastGGUFReader if file is None else (lambda path, *a, **k: _FastGGUFReader(file))
        try:
            return convert()
        except NotImplementedError as e:
            log.debug("tokenizer conversion through gguf's reader: %s", e)
        finally:
            gguf.GGUFReader = real
    return convert()


def load_tokenizer(model_path: str, weights_path: str, gguf_file=None):
    """The tokenizer for a model, or None when the model ships none (token-id prompts only).
    ``gguf_file``: the open ``GGUFFile`` of ``weights_path``, read instead of opening it again."""
    from transformers import AutoTokenizer

    if weights_path.endswith(".gguf"):
        from pagedlm.cache import cached_entry

        def build(into: Path):
            tok = _tokenizer_from_gguf(weights_path, gguf_file)
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
