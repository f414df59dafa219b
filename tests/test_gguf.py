"""GGUF files of every supported family, written as llama.cpp's ``convert_hf_to_gguf.py`` lays
them out, load to the HF original's logits (float32, F32 tensors: no quantization in the way).

What the converter does, per family (and what our loader must undo):

* Llama, Mistral, Mixtral (its ``LlamaModel``): q/k rows (weights and biases) permuted so each
  head's two rope halves interleave; arch ``llama`` (Mixtral with ``expert_count`` and its experts
  stacked into 3-D ``ffn_{gate,up,down}_exps`` tensors, router ``ffn_gate_inp``). The sliding
  window is not written (llama.cpp runs ``llama`` without one), so the Mistral here has none.
* Qwen2 (q/k/v biases), Qwen3 (q/k norms): arch ``qwen2`` / ``qwen3``, rows *not* permuted.
* Gemma 3: arch ``gemma3``, not permuted, every RMSNorm weight stored as ``1 + w``, tied head,
  a global layer every 6th (llama.cpp's fixed pattern), softmax scale from head_dim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagedlm.config import ModelConfig
from pagedlm.model.registry import load_model
from tests.helpers import hf_tiny, train_tokenizer
from tests.test_models import assert_close, run_pagedlm

gguf = pytest.importorskip("gguf")

# HF module name (after "model.layers.N.") -> GGUF tensor name (after "blk.N."), as llama.cpp's
# tensor map; Gemma 3's norms differ (below).
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3": "gemma3"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rows of each head from (2, d/2) to (d/2, 2) order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(kind: str, hf) -> dict[str, torch.Tensor]:
    """The HF model's tensors under GGUF names, transformed as the converter transforms them."""
    c = hf.config
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.state_dict().items():
        t = t.detach().float().clone()
        if name in _TOP:
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            gname = _TOP[name]
        else:
            _, _, n, rest = name.split(".", 3)  # model.layers.N.rest
            if rest == "mlp.experts.gate_up_proj":  # (experts, 2 * inter, hidden) in memory
                gate, up = t.chunk(2, dim=1)
                out[f"blk.{n}.ffn_gate_exps.weight"], out[f"blk.{n}.ffn_up_exps.weight"] = gate, up
                continue
            if rest == "mlp.experts.down_proj":
                out[f"blk.{n}.ffn_down_exps.weight"] = t
                continue
            module, kind_ = rest.rsplit(".", 1)
            table = {**_LAYER, **_GEMMA_NORMS} if kind == "gemma3" else _LAYER
            gname = f"blk.{n}.{table[module]}.{kind_}"
            if GGUF_ARCH[kind] == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads
                t = llama_cpp_permute(t, heads)
        if kind == "gemma3" and name.endswith("norm.weight"):
            t = t + 1  # the converter stores Gemma's (1 + w)
        out[gname] = t
    return out


def write_gguf(kind: str, hf, path) -> None:
    """A GGUF file of ``hf`` with the metadata keys llama.cpp's converter writes for its family,
    and a gpt2-style BPE vocabulary (padded to the model's vocab size, as the converter pads)."""
    c, cfg = hf.config, ModelConfig.from_hf(hf.config.to_dict())
    arch = GGUF_ARCH[kind]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if getattr(c, "head_dim", None):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if kind == "mixtral":
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if kind == "gemma3":
        w.add_sliding_window(c.sliding_window)
    tok = train_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), c.vocab_size)]
    special = set(tok.all_special_tokens)
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab]
    types += [gguf.TokenType.UNUSED] * (c.vocab_size - len(vocab))
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    for name, t in _gguf_tensors(kind, hf).items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(kind: str):
    if kind == "mistral":
        return hf_tiny("mistral", sliding_window=None)
    if kind == "gemma3":  # six layers: llama.cpp's pattern makes layer 5 the global one
        return hf_tiny("gemma3", num_hidden_layers=6, query_pre_attn_scalar=16,
                       layer_types=["sliding_attention"] * 5 + ["full_attention"])
    if kind == "mixtral":
        from tests.test_moe import hf_tiny_moe

        return hf_tiny_moe("mixtral")
    return hf_tiny(kind)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral"])
def test_gguf_logits_match_hf_original(kind, tmp_path):
    hf = _tiny(kind)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(kind, hf, path)
    cfg = ModelConfig.from_pretrained(str(path))
    assert cfg.gguf_qk_permuted == (GGUF_ARCH[kind] == "llama")
    assert cfg.is_moe == (kind == "mixtral")
    _assert_logits_match(hf, path, cfg, length=20)


def _assert_logits_match(hf, path, cfg: ModelConfig, length: int) -> None:
    """Float32 logits of a prefill of half the tokens, then one decode step per token."""
    model = load_model(str(path), cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert_close(run_pagedlm(model, ids, prefill=length // 2 + 1), ref)


def test_gguf_qkv_bias_is_permuted_for_llama(tmp_path):
    """Llama with attention_bias: the converter permutes the q/k biases too; the loader finds the
    biases from the tensor names."""
    hf = hf_tiny("llama", attention_bias=True)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path / "llama-bias.gguf"
    write_gguf("llama", hf, path)
    cfg = ModelConfig.from_pretrained(str(path))
    assert cfg.attention_bias and cfg.o_proj_bias  # from the bias tensors: no metadata key says so
    _assert_logits_match(hf, path, cfg, length=12)


def test_gguf_engine_greedy_matches_hf(tmp_path):
    """End to end on a GGUF file (tokenizer from its metadata): greedy text equals the HF original's."""
    from pagedlm import LLM, SamplingParams

    hf = _tiny("qwen2")
    path = tmp_path / "qwen2.gguf"
    write_gguf("qwen2", hf, path)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32, block_size=4)
    prompt = "The quick brown fox"
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    ids = torch.tensor([llm.engine.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, ids.shape[1]:]
    assert out.outputs[0].token_ids == ref.tolist()
