"""Bad input gives a clear error naming the bad value: Python raises, the CLI exits 2."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedlm import LLM, SamplingParams
from pagedlm.cli import main
from pagedlm.config import ConfigError, ModelConfig, UnsupportedArchitectureError
from pagedlm.errors import ModelLoadError
from pagedlm.loader.gguf import GGUFFormatError


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        LLM("/no/such/model")


def test_cli_missing_path(capsys):
    assert main(["generate", "hello", "--model", "/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(str(d), dtype="float32")


def test_garbage_safetensors(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        LLM(str(d), dtype="float32")


def test_truncated_gguf(smollm2, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises((GGUFFormatError, ModelLoadError), match="cut.gguf"):
        LLM(str(bad))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFFormatError, match="junk.gguf"):
        LLM(str(bad))


def test_unknown_architecture(tiny_llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewForCausalLM") as e:
        LLM(str(d))
    assert "LlamaForCausalLM" in str(e.value)  # lists what is supported


def test_missing_and_misshaped_tensors(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    state["model.layers.0.self_attn.extra.weight"] = state["model.norm.weight"].clone()
    save_file(state, d / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        LLM(str(d), dtype="float32")
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value)
    assert "model.layers.0.self_attn.extra.weight" in str(e.value)

    state = load_file(tiny_llama_dir + "/model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
    save_file(state, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.norm.weight.*shape"):
        LLM(str(d), dtype="float32")


def test_config_missing_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_pretrained(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32")


def test_empty_prompt(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_cli_empty_prompt(capsys, tiny_llama_dir):
    assert main(["generate", "  ", "--model", tiny_llama_dir]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"max_tokens": -3}, "max_tokens must be at least 1, got -3"),
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n must be at least 1"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": -1}, "logprobs"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": "hot"}, {"max_tokens": 2.5}, {"stop": 3}, {"seed": "x"},
                                    {"stop_token_ids": ["a"]}])
def test_sampling_params_types(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("argv, match", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
])
def test_cli_bad_sampling(argv, match, capsys, tiny_llama_dir):
    assert main(["generate", "hi", "--model", tiny_llama_dir, *argv]) == 2
    assert match in capsys.readouterr().err


def test_token_ids_outside_vocab(tiny_llm):
    with pytest.raises(ValueError, match="999999"):
        tiny_llm.generate({"prompt_token_ids": [1, 999999]}, use_tqdm=False)


def test_cli_bad_parallel_layout(capsys, tiny_llama_dir):
    assert main(["generate", "hi", "--model", tiny_llama_dir, "--tensor-parallel-size", "3"]) == 2
    assert "3" in capsys.readouterr().err


def test_serve_takes_the_engine_options(capsys, tiny_llama_dir):
    """serve shares generate's engine options (parallel layout included): a bad layout is a clear
    error before anything binds."""
    assert main(["serve", "--model", tiny_llama_dir, "--tensor-parallel-size", "3", "--port", "0"]) == 2
    assert "3" in capsys.readouterr().err


def test_swap_preemption_is_refused_with_the_reason(capsys, tiny_llama_dir):
    from pagedlm.engine.engine import EngineConfig

    with pytest.raises(ValueError, match="KV cache already lives in host memory"):
        EngineConfig(model=tiny_llama_dir, preemption_mode="swap")
    with pytest.raises(ValueError, match="not implemented"):
        EngineConfig(model=tiny_llama_dir, preemption_mode="swap", device="cuda")
    with pytest.raises(ValueError, match="'recompute' or 'swap'"):
        EngineConfig(model=tiny_llama_dir, preemption_mode="page-out")
    assert main(["generate", "hi", "--model", tiny_llama_dir, "--preemption-mode", "swap"]) == 2
    assert "preemption_mode 'swap' makes no sense on CPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--data-parallel-size", "0"], "must be >= 1"),
    (["--shutdown-timeout", "-1"], "must be >= 0"),
    (["--shutdown-timeout", "soon"], "not a number"),
])
def test_serve_bad_replica_and_shutdown_options(argv, match, capsys, tiny_llama_dir):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", tiny_llama_dir, "--port", "0", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err
