"""GGUF files, read once over a memory map: header, metadata, tensor index; big arrays lazily.

The format (ggml's ``docs/gguf.md``; versions 2 and 3, little-endian):

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to ``general.alignment`` (default 32), then the tensor data (offsets relative to it)

where a string is a u64 byte length then UTF-8 bytes, and an array value is an element type
u32, a u64 count, then the elements. ``gguf.GGUFReader`` builds a numpy object per array
element in Python, which for a 49k-token vocabulary takes seconds; here the header walk only
steps over the lengths of string arrays, numeric arrays become one ``numpy.frombuffer`` each,
and any array is decoded on first access. Tensor data are numpy views of the map (no copy).

Values are what ``gguf.GGUFReader``'s ``field.contents()`` gives (``tests/test_gguf_reader.py``
compares every key and tensor of the shipped files): Python scalars, ``str``, lists of either
(an array of arrays as one flat list, as that reader gives it), plus its three pseudo-keys
``GGUF.version``, ``GGUF.tensor_count`` and ``GGUF.kv_count``. This module imports nothing
from pagedlm: config, loader and layers may all use it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class GGUFFormatError(ValueError):
    """A file that is not a readable GGUF file; the message names the path."""


MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value types.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    UINT8: (struct.Struct("<B"), np.dtype("<u1")), INT8: (struct.Struct("<b"), np.dtype("<i1")),
    UINT16: (struct.Struct("<H"), np.dtype("<u2")), INT16: (struct.Struct("<h"), np.dtype("<i2")),
    UINT32: (struct.Struct("<I"), np.dtype("<u4")), INT32: (struct.Struct("<i"), np.dtype("<i4")),
    FLOAT32: (struct.Struct("<f"), np.dtype("<f4")), BOOL: (struct.Struct("<?"), np.dtype("?")),
    UINT64: (struct.Struct("<Q"), np.dtype("<u8")), INT64: (struct.Struct("<q"), np.dtype("<i8")),
    FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, weights per block, bytes per block), as ggml.h / gguf's
# GGML_QUANT_SIZES (a test checks the two agree).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# Types whose data gguf's reader (and so this one) exposes as typed elements, not raw bytes.
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor index. ``shape`` is in ggml order (innermost dimension first);
    ``data_offset`` is absolute in the file."""

    name: str
    tensor_type: int
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    _file: GGUFFile

    @property
    def data(self) -> np.ndarray:
        """A read-only numpy view of the map, laid out as gguf's reader lays it out: elements
        for F32/F16/F64/I8-I64 in row-major shape (reversed ``shape``), else uint8 bytes with the
        last dimension in bytes (blocks of a quantized row)."""
        return self._file._tensor_view(self)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The shape in PyTorch's (outermost first) order."""
        return tuple(reversed(self.shape))


class _Array:
    """An array value not decoded yet: where its elements start, their type and count."""

    __slots__ = ("offset", "elem_type", "count")

    def __init__(self, offset: int, elem_type: int, count: int):
        self.offset, self.elem_type, self.count = offset, elem_type, count


class GGUFMetadata(Mapping):
    """Metadata keys -> values, in file order; arrays decoded on first access (and kept)."""

    def __init__(self, file: GGUFFile, raw: dict[str, Any]):
        self._file = file
        self._raw = raw

    def __getitem__(self, key: str) -> Any:
        v = self._raw[key]
        if isinstance(v, _Array):
            v = self._raw[key] = self._file._decode_array(v, key)
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def array_length(self, key: str) -> int:
        """The element count of an array value without decoding it."""
        v = self._raw[key]
        if isinstance(v, _Array):
            return v.count
        if not isinstance(v, list):
            raise TypeError(f"GGUF metadata key {key!r} is not an array")
        return len(v)

    def value_type(self, key: str) -> int:
        """The value type of ``key`` (``ARRAY`` for arrays)."""
        return self._file._types[key]


class GGUFFile:
    """A GGUF file opened once: ``metadata`` (a lazy mapping), ``tensors`` (the index, in file
    order) and tensor data as views of one read-only memory map. Raises ``GGUFFormatError``
    naming the path for a file that is not GGUF, is truncated, or is inconsistent."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file does not exist: {self.path!r}")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"{self.path!r} is not a valid GGUF file: {size} bytes, shorter than a header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        self._types: dict[str, int] = {}
        try:
            self._parse()
        except GGUFFormatError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, IndexError) as e:
            raise GGUFFormatError(f"{self.path!r} is not a valid GGUF file ({type(e).__name__}: {e})") from e

    # ---- the header walk -------------------------------------------------------------------
    def _bad(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path!r} is not a valid GGUF file: {what}")

    def _need(self, end: int, what: str) -> None:
        if end > self.size:
            raise self._bad(f"truncated ({what} ends at byte {end}, the file has {self.size})")

    def _string(self, off: int, what: str) -> tuple[str, int]:
        (n,) = _U64.unpack_from(self._mm, off)
        end = off + 8 + n
        self._need(end, what)
        return self._mm[off + 8:end].decode("utf-8"), end

    def _parse(self) -> None:
        mm = self._mm
        if mm[:4] != MAGIC:
            raise self._bad(f"bad magic {bytes(mm[:4])!r} (expected {MAGIC!r})")
        (version,) = _U32.unpack_from(mm, 4)
        if version & 0xFFFF == 0 and version:
            raise self._bad("big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise self._bad(f"GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        self.version = version
        raw: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
        self._types = {"GGUF.version": UINT32, "GGUF.tensor_count": UINT64, "GGUF.kv_count": UINT64}
        off = 24
        for i in range(n_kv):
            self._need(off + 8, f"metadata key {i}")
            key, off = self._string(off, f"metadata key {i}")
            self._need(off + 4, f"the type of {key!r}")
            (vtype,) = _U32.unpack_from(mm, off)
            if key in raw:
                raise self._bad(f"duplicate metadata key {key!r}")
            raw[key], off = self._value(off + 4, vtype, key)
            self._types[key] = vtype
        self.metadata = GGUFMetadata(self, raw)

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in raw:
            if self._types["general.alignment"] != UINT32:
                raise self._bad("general.alignment is not a uint32")
            alignment = raw["general.alignment"]
            if alignment == 0 or alignment & (alignment - 1):
                raise self._bad(f"general.alignment {alignment} is not a power of two")
        self.alignment = alignment

        index = []
        for i in range(n_tensors):
            self._need(off + 8, f"tensor info {i}")
            name, off = self._string(off, f"tensor info {i}")
            self._need(off + 4, f"tensor {name!r}")
            (n_dims,) = _U32.unpack_from(mm, off)
            self._need(off + 4 + 8 * n_dims + 12, f"tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
            ttype, rel = struct.unpack_from("<IQ", mm, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            index.append((name, dims, ttype, rel))
        data_start = off + (-off % alignment)
        self.data_offset = data_start

        tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, ttype, rel in index:
            if name in seen:
                raise self._bad(f"duplicate tensor {name!r}")
            seen.add(name)
            if ttype not in GGML_TYPES:
                raise self._bad(f"tensor {name!r} has unknown ggml type {ttype}")
            tname, block, type_size = GGML_TYPES[ttype]
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block:
                raise self._bad(f"tensor {name!r}: row of {dims[0]} is not whole {tname} blocks of {block}")
            n_bytes = n * type_size // block
            start = data_start + rel
            self._need(start + n_bytes, f"the data of tensor {name!r}")
            tensors.append(GGUFTensor(name, ttype, tname, tuple(dims), n, n_bytes, start, self))
        self.tensors = tensors
        self._by_name = {t.name: t for t in tensors}

    def _value(self, off: int, vtype: int, key: str) -> tuple[Any, int]:
        """(value or _Array, offset after it) for a value of ``vtype`` at ``off``."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            st = scalar[0]
            self._need(off + st.size, f"the value of {key!r}")
            return st.unpack_from(self._mm, off)[0], off + st.size
        if vtype == STRING:
            self._need(off + 8, f"the value of {key!r}")
            return self._string(off, f"the value of {key!r}")
        if vtype == ARRAY:
            self._need(off + 12, f"the array {key!r}")
            elem_type, count = struct.unpack_from("<IQ", self._mm, off)
            start = off + 12
            return _Array(start, elem_type, count), self._skip_array(start, elem_type, count, key)
        raise self._bad(f"metadata key {key!r} has unknown value type {vtype}")

    def _skip_array(self, off: int, elem_type: int, count: int, key: str) -> int:
        """The offset after ``count`` elements of ``elem_type`` at ``off``, reading only lengths."""
        scalar = _SCALARS.get(elem_type)
        if scalar is not None:
            end = off + count * scalar[0].size
            self._need(end, f"the array {key!r}")
            return end
        if elem_type == STRING:
            # One unpack per string: the walk a vocabulary costs before anyone asks for it.
            unpack, mm, size = _U64.unpack_from, self._mm, self.size
            for _ in range(count):
                if off + 8 > size:
                    break
                off += 8 + unpack(mm, off)[0]
            self._need(off, f"the string array {key!r}")
            return off
        if elem_type == ARRAY:
            for _ in range(count):
                self._need(off + 12, f"the array {key!r}")
                inner_type, inner_count = struct.unpack_from("<IQ", self._mm, off)
                off = self._skip_array(off + 12, inner_type, inner_count, key)
            return off
        raise self._bad(f"array {key!r} has unknown element type {elem_type}")

    # ---- lazy parts ------------------------------------------------------------------------
    def _decode_array(self, arr: _Array, key: str) -> list:
        try:
            return self._decode(arr.offset, arr.elem_type, arr.count)[0]
        except UnicodeDecodeError as e:
            raise self._bad(f"the string array {key!r} is not UTF-8 ({e})") from e

    def _decode(self, off: int, elem_type: int, count: int) -> tuple[list, int]:
        scalar = _SCALARS.get(elem_type)
        if scalar is not None:
            dtype = scalar[1]
            arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=off)
            return arr.tolist(), off + count * dtype.itemsize
        if elem_type == STRING:
            unpack, mm = _U64.unpack_from, self._mm
            out = []
            append = out.append
            for _ in range(count):
                n = unpack(mm, off)[0]
                append(mm[off + 8:off + 8 + n].decode("utf-8"))
                off += 8 + n
            return out, off
        # ARRAY of arrays: gguf's reader flattens the leaves into one list; so does this one.
        out = []
        for _ in range(count):
            inner_type, inner_count = struct.unpack_from("<IQ", self._mm, off)
            items, off = self._decode(off + 12, inner_type, inner_count)
            out.extend(items)
        return out, off

    def _tensor_view(self, t: GGUFTensor) -> np.ndarray:
        np_shape = tuple(reversed(t.shape))
        dtype = _ELEMENT_DTYPES.get(t.type_name)
        if dtype is not None:
            arr = np.frombuffer(self._mm, dtype=dtype, count=t.n_elements, offset=t.data_offset)
            return arr.reshape(np_shape)
        _, block, type_size = GGML_TYPES[t.tensor_type]
        byte_shape = (*np_shape[:-1], np_shape[-1] // block * type_size) if np_shape else (t.n_bytes,)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset).reshape(byte_shape)

    # ---- lookups ---------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path!r} has no tensor {name!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and index a GGUF file (``FileNotFoundError`` / ``GGUFFormatError`` naming it)."""
    return GGUFFile(path)


# ---- llama.cpp tensor names -> HF names ------------------------------------------------------
# Here, below the model layers and the weight walk, so that both can ask without importing each
# other (``gguf_to_hf_name`` reads two config flags; it needs no ModelConfig import).

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    # Mixtral (llama.cpp's "llama" with experts): the router and each part of all experts as one
    # 3-D tensor (experts, out, in); ``layers/moe.py`` maps the 3-D forms.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str, cfg: Any) -> str | None:
    """The HF parameter name of a llama.cpp tensor name (None if it has none); ``cfg`` is the
    model's ``ModelConfig`` (``post_norms`` decides what ``ffn_norm`` is)."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if not m:
        return None
    layer, part, kind = m.groups()
    if part.endswith("_exps"):  # 3-D expert tensors carry no ".weight" in their HF-side name
        hf = _GGUF_LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{hf}" if hf is not None and kind == "weight" else None
    if part == "ffn_norm":
        hf = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
    else:
        hf = _GGUF_LAYER_NAMES.get(part)
    if hf is None:
        return None
    return f"model.layers.{layer}.{hf}.{kind}"


def tensor_types(file: GGUFFile, cfg: Any) -> dict[str, str]:
    """HF parameter name (before q/k/v and gate/up fusion) -> the file's ggml type name."""
    out = {}
    for t in file.tensors:
        name = gguf_to_hf_name(t.name, cfg)
        if name is not None:
            out[name] = t.type_name
    return out
