"""GGUF header reading without torch: metadata as plain Python values and the tensor names."""

from __future__ import annotations

import os
from typing import Any


class GGUFFormatError(ValueError):
    """A file that is not a readable GGUF file; the message names the path."""


def open_gguf(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file does not exist: {path!r}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/IndexError/struct errors on bad files
        raise GGUFFormatError(f"{path!r} is not a valid GGUF file ({type(e).__name__}: {e})") from e


def field_value(field: Any) -> Any:
    value = field.contents()
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def read_gguf_metadata(path: str) -> tuple[dict[str, Any], list[str]]:
    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = field_value(f)
        except Exception as e:
            raise GGUFFormatError(f"{path!r}: cannot read metadata key {key!r}: {e}") from e
    return meta, [t.name for t in reader.tensors]
