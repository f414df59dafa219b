"""LoRA overhead: decode tok/s of a batch with 0, 1 and 4 adapters in it, SmolLM2-135M.

    python benchmarks/bench_lora.py [--batch 8] [--decode 64] [--ranks 8,16] [--repeats 3] [--json out.json]

Adapters are random PEFT directories (rank r, lora_alpha 2r, all seven projections of every
layer: q, k, v, o, gate, up, down), written to a temp directory. Each engine loads the shipped
GGUF with its defaults (``auto`` quantization, compiled decode step) and ``--max-loras 4
--max-lora-rank r``. A batch of ``--batch`` requests (16-token prompts) is prefilled, then only
the decode steps are timed: tokens decoded / seconds, best of ``--repeats``.

Rows: LoRA off (the baseline); LoRA on with no adapter in the batch (must equal the baseline:
the compiled decode step is kept); every request on one adapter; requests spread over four
adapters. Decode steps with an adapter run the compiled LoRA graph of their bucket (every slot
computed); an eager baseline (``--enforce-eager``, no adapter) is also shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import machine  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(path: str, cfg, rank: int, seed: int) -> str:
    """A PEFT adapter directory with random A and B for every projection of every layer."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for m in MODULES:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            fan_in, fan_out = shapes[m]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}, f)
    return path


def decode_tok_s(eng, loras: list, prompt_len: int, n_decode: int) -> float:
    """Decode tokens per second of one batch (prefill steps not timed)."""
    from pagedlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i, lora in enumerate(loras):
        ids = torch.randint(100, 40000, (prompt_len,), generator=g).tolist()
        eng.add_request(f"r{time.perf_counter_ns()}-{i}", None, params, prompt_token_ids=ids, lora_request=lora)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.live_sequences()):
        eng.step()
    before = eng.stats["decode_tokens"]
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return (eng.stats["decode_tokens"] - before) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the shipped SmolLM2 GGUF")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pagedlm.engine.engine import EngineConfig, LLMEngine, resolve_model

    cfg = resolve_model(args.model)[2]
    common = dict(model=args.model, kv_cache_memory=256 << 20, max_num_seqs=args.batch, enable_prefix_caching=False)
    tmp = tempfile.mkdtemp(prefix="bench_lora_")
    rows = []

    def run(label: str, eng, loras: list) -> None:
        decode_tok_s(eng, loras, args.prompt_len, 8)  # warm-up (compiles the decode bucket once)
        best = max(decode_tok_s(eng, loras, args.prompt_len, args.decode) for _ in range(args.repeats))
        rows.append({"config": label, "decode_tok_s": best})
        print(f"{label:50s} {best:8.1f} tok/s", flush=True)

    b = args.batch
    eng = LLMEngine(EngineConfig(**common))
    run("LoRA off, compiled (baseline)", eng, [None] * b)
    del eng
    eng = LLMEngine(EngineConfig(**common, enforce_eager=True))
    run("LoRA off, --enforce-eager", eng, [None] * b)
    del eng
    for rank in (int(r) for r in args.ranks.split(",")):
        mods = {f"r{rank}-{i}": write_random_adapter(os.path.join(tmp, f"r{rank}-{i}"), cfg, rank, seed=i)
                for i in range(4)}
        eng = LLMEngine(EngineConfig(**common, lora_modules=mods, max_loras=4, max_lora_rank=rank))
        reqs = list(eng.lora_requests.values())
        run(f"rank {rank}: LoRA on, 0 adapters in the batch", eng, [None] * b)
        run(f"rank {rank}: 1 adapter (all {b} requests)", eng, [reqs[0]] * b)
        run(f"rank {rank}: 4 adapters ({b // 4} requests each)", eng, [reqs[i % 4] for i in range(b)])
        del eng
    report = {"machine": machine(), "batch": b, "decode": args.decode, "rows": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
