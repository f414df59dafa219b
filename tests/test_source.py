"""ModelSource: a model path resolved once and its GGUF file parsed once per process, shared by
the config, the quantization plan, the weight walk, the tokenizer, and every engine (draft
model, replicas) that names the same file."""

from __future__ import annotations

import os
import shutil

import pytest

from pagedlm.config import ModelConfig
from pagedlm.errors import ModelLoadError
from pagedlm.loader import gguf as gguf_mod
from pagedlm.loader.source import ModelSource, default_model_path, resolve_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    from tests.test_gguf import _tiny, write_gguf

    path = tmp_path_factory.mktemp("src") / "tiny-qwen2.gguf"
    write_gguf("qwen2", _tiny("qwen2"), path)
    return str(path)


@pytest.fixture()
def count_opens(monkeypatch):
    ModelSource.forget_all()
    opened: list[str] = []
    real = gguf_mod.GGUFFile.__init__

    def counting(self, path):
        opened.append(os.fspath(path))
        real(self, path)

    monkeypatch.setattr(gguf_mod.GGUFFile, "__init__", counting)
    yield opened
    ModelSource.forget_all()


def test_one_source_per_file(tiny_gguf, count_opens, tmp_path):
    a = ModelSource.open(tiny_gguf)
    assert ModelSource.open(tiny_gguf) is a and ModelSource.open(a) is a
    assert a.is_gguf and a.weights_path == tiny_gguf
    assert a.config == ModelConfig.from_pretrained(tiny_gguf)  # (from_pretrained opens it on its own)
    types = a.tensor_types()
    assert types["model.layers.0.self_attn.q_proj.weight"] == "F32"
    assert count_opens == [tiny_gguf, tiny_gguf]
    # A folder holding exactly one .gguf file resolves to it.
    d = tmp_path / "folder"
    d.mkdir()
    shutil.copy(tiny_gguf, d / "m.gguf")
    b = ModelSource.open(str(d))
    assert b.path == str(d) and b.weights_path == str(d / "m.gguf") and b is not a
    assert resolve_model(str(d))[1:] == (str(d / "m.gguf"), b.config)
    # The file changed: a new source, not the stale one.
    os.utime(tiny_gguf, ns=(0, os.stat(tiny_gguf).st_mtime_ns + 1_000_000))
    assert ModelSource.open(tiny_gguf) is not a


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ModelSource.open(str(tmp_path / "nope"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        ModelSource.open(str(tmp_path / "w.bin"))
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        ModelSource.open(str(tmp_path))
    with pytest.raises(TypeError, match="model must be a path"):
        ModelSource.open(3)
    with pytest.raises(gguf_mod.GGUFFormatError, match="a.gguf"):
        ModelSource.open(str(tmp_path / "a.gguf"))


def test_default_model(smollm2):
    assert default_model_path() == smollm2
    src = ModelSource.open(None)
    assert src.weights_path == smollm2 and src.config.architecture == "LlamaForCausalLM"


def test_engine_opens_the_file_once(tiny_gguf, count_opens):
    """Config, tensor types (quantization auto), weights and tokenizer of an engine, and of a
    second engine on the same file in this process (a data-parallel replica), from one parse."""
    from pagedlm import LLM, SamplingParams

    kw = dict(dtype="float32", num_kv_blocks=16, block_size=4, quantization="auto")
    first = LLM(tiny_gguf, **kw)
    second = LLM(tiny_gguf, **kw)
    assert count_opens == [tiny_gguf]
    assert first.engine.source is second.engine.source
    assert first.engine.tokenizer is second.engine.tokenizer
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert (first.generate(["The quick brown"], params)[0].outputs[0].token_ids
            == second.generate(["The quick brown"], params)[0].outputs[0].token_ids)


def test_hf_directory_source(tiny_llama_dir):
    src = ModelSource.open(tiny_llama_dir)
    assert not src.is_gguf and src.weights_path == tiny_llama_dir
    assert src.tensor_types() == {}
    assert src.config == ModelConfig.from_pretrained(tiny_llama_dir)
    assert src.tokenizer() is not None
    with pytest.raises(ValueError, match="not a GGUF file"):
        _ = src.gguf


def test_failed_tokenizer_prefetch_raises_on_the_callers_thread(tiny_gguf, monkeypatch):
    """A prefetch that fails on its thread is retried by tokenizer(), so the error reaches the
    caller (here a damaged tokenizer: the second try raises the same way)."""
    import pagedlm.tokenizer as tok_mod

    calls = []

    def broken(model_path, weights_path, gguf_file=None):
        calls.append(weights_path)
        raise ValueError(f"cannot convert the tokenizer of {weights_path}")

    monkeypatch.setattr(tok_mod, "load_tokenizer", broken)
    src = ModelSource(tiny_gguf, tiny_gguf)
    src.prefetch_tokenizer()
    with pytest.raises(ValueError, match="cannot convert the tokenizer of .*tiny-qwen2.gguf"):
        src.tokenizer()
    assert calls == [tiny_gguf, tiny_gguf]  # once on the thread, once on the caller's
    monkeypatch.undo()
    assert src.tokenizer() is not None and src.tokenizer() is src.tokenizer()
