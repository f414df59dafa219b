"""The arithmetic of training a model (``pagedlm inspect --train``), from its config, no torch.

Memory per rank (bytes per parameter as in the ZeRO paper, fp32 AdamW moments):

    float32:           weights 4 + gradients 4 + AdamW m, v 8                  = 16 B / trained param
    bf16 mixed:        weights 2 + gradients 2 + fp32 master 4 + m, v 8         = 16 B / trained param
    LoRA:              frozen weights (dtype) + 16 B per adapter parameter
    ZeRO-1 / 2 / 3 over N ranks: optimizer state / N; + gradients / N; + weights / N

Activations kept for backward, per token and layer (elements; attention scores never stored: a
fused SDPA kernel keeps only its output and a log-sum-exp per head):
``5 h + 3 q + 3 kv + 5 i`` (Llama: norm inputs and outputs, q/k/v before and after RoPE,
attention output, residuals; gate|up, act(gate), act(gate) * up, down's input). Plus fp32 logits
of the trained tokens, twice (logits and their gradient). With activation checkpointing only each
layer's input (``h``) is kept, and one layer's activations live again during its recomputation.

FLOPs per trained token: ``6 N`` (forward 2N, backward 4N; N = parameters a token multiplies by,
the output head included) plus attention, 3x its forward (``Q K^T`` and ``P V`` over the causal
context); ``8 N`` with checkpointing (one more forward). LoRA still runs the full backward
through activations (4N -> ~4N) but skips the frozen weights' gradients (2N): ~``4 N``.
"""

from __future__ import annotations

from pagedlm.analysis.flops import forward_flops, matmul_weights_per_token
from pagedlm.analysis.params import count_parameters
from pagedlm.config import ModelConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_params(cfg: ModelConfig, r: int) -> int:
    """Adapter parameters of rank ``r`` on every linear layer of every decoder layer."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    return cfg.num_hidden_layers * per_layer


def activation_elems_per_token_layer(cfg: ModelConfig) -> int:
    return 5 * cfg.hidden_size + 3 * cfg.q_size + 3 * cfg.kv_size + 5 * cfg.intermediate_size


def training_memory(cfg: ModelConfig, tokens: int, dtype: str = "float32", lora_r: int = 0,
                    checkpointing: bool = False, world: int = 1, zero: int = 0,
                    trained_fraction: float = 1.0) -> dict[str, float]:
    """Bytes per rank of one training micro-batch of ``tokens`` tokens."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero!r}")
    if world < 1:
        raise ValueError(f"ranks must be positive, got {world!r}")
    total = count_parameters(cfg).total
    wb = 2 if dtype in ("bfloat16", "bf16") else 4
    if lora_r:
        trained = lora_params(cfg, lora_r)
        weights, grads, opt = total * wb + trained * 4, trained * 4, trained * 8
    else:
        trained = total
        master = 4 if wb == 2 else 0
        weights, grads, opt = total * wb, total * wb, total * (8 + master)
    if zero >= 1:
        opt /= world
    if zero >= 2:
        grads /= world
    if zero >= 3:
        weights /= world
    act_b = wb  # activations in the compute dtype
    per_layer = activation_elems_per_token_layer(cfg) * tokens * act_b
    layers = cfg.num_hidden_layers
    if checkpointing:
        acts = layers * cfg.hidden_size * tokens * act_b + per_layer
    else:
        acts = layers * per_layer
    logits = 2 * 4 * cfg.vocab_size * tokens * trained_fraction
    return {"weights": weights, "gradients": grads, "optimizer": opt, "activations": acts, "logits": logits,
            "total": weights + grads + opt + acts + logits, "trained_params": trained}


def training_flops_per_token(cfg: ModelConfig, seq: int, checkpointing: bool = False,
                             lora: bool = False) -> dict[str, float]:
    """FLOPs per trained token at sequence length ``seq`` (every position trained)."""
    n = matmul_weights_per_token(cfg) + cfg.hidden_size * cfg.vocab_size
    fwd = forward_flops(cfg, seq, 0, logits_tokens=seq)
    attn_fwd = fwd.attention / seq
    passes = (3 if not lora else 2) + (1 if checkpointing else 0)  # in units of one forward
    return {"N": n, "6N": 6 * n, "matmul": passes * 2 * n, "attention": passes * attn_fwd,
            "total": passes * (2 * n + attn_fwd)}


def fit_tokens(cfg: ModelConfig, memory: float, **kw) -> int:
    """The largest micro-batch (tokens) whose training memory fits ``memory`` bytes per rank (0: not
    even the states fit)."""
    lo, hi = 0, 1
    while training_memory(cfg, hi, **kw)["total"] <= memory and hi < 1 << 30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if training_memory(cfg, mid, **kw)["total"] <= memory:
            lo = mid
        else:
            hi = mid
    return lo


def training_report(cfg: ModelConfig, batch: int, seq: int, dtype: str, lora_r: int, world: int,
                    memory: float | None) -> dict:
    tokens = batch * seq
    rows = {}
    for ckpt in (False, True):
        for zero in (0, 1, 2, 3):
            if zero and world == 1:
                continue
            m = training_memory(cfg, tokens, dtype, lora_r, ckpt, world, zero)
            key = f"{'ckpt' if ckpt else 'no-ckpt'} zero-{zero}"
            rows[key] = {**m, "fit_tokens": fit_tokens(cfg, memory, dtype=dtype, lora_r=lora_r, checkpointing=ckpt,
                                                         world=world, zero=zero) if memory else None}
    return {"tokens": tokens, "dtype": dtype, "lora_r": lora_r, "world": world, "memory": memory,
            "memory_per_rank": rows,
            "flops_per_token": training_flops_per_token(cfg, seq, lora=bool(lora_r)),
            "flops_per_token_ckpt": training_flops_per_token(cfg, seq, checkpointing=True, lora=bool(lora_r))}


def format_training(r: dict) -> str:
    gib = 1024 ** 3
    lines = [f"\nTraining ({r['tokens']} tokens per micro-batch, {r['dtype']}, "
             f"{'LoRA r=' + str(r['lora_r']) if r['lora_r'] else 'full'}, {r['world']} rank(s)); GiB per rank"]
    head = f"  {'':22}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'logits':>9}{'total':>9}"
    if r["memory"]:
        head += f"{'fit tokens':>12}"
    lines.append(head)
    for k, m in r["memory_per_rank"].items():
        row = f"  {k:22}" + "".join(f"{m[c] / gib:9.3f}" for c in ("weights", "gradients", "optimizer",
                                                                      "activations", "logits", "total"))
        if r["memory"]:
            row += f"{m['fit_tokens']:12d}"
        lines.append(row)
    f, fc = r["flops_per_token"], r["flops_per_token_ckpt"]
    lines.append(f"  FLOPs per trained token: 6N = {f['6N'] / 1e9:.3f} G (N = {f['N'] / 1e6:.1f}M multiplied "
                 f"weights); this setup incl. attention {f['total'] / 1e9:.3f} G, with checkpointing {fc['total'] / 1e9:.3f} G")
    return "\n".join(lines) + "\n"
