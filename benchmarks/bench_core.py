"""Batch-1 speed of pagedlm vs transformers on SmolLM2-135M, float32 and bfloat16, one run.

    python benchmarks/bench_core.py [--prompt-len 512] [--decode 128] [--json out.json]

Prefill: time to process a 512-token prompt (pagedlm: TTFT of a max_tokens=1 request; transformers:
one forward pass). Decode: tokens/s over 128 greedy tokens at batch 1 (transformers: ``generate``
as its users call it, min_new_tokens so both sides produce exactly 128). The machine's memory
bandwidth and bf16 matmul GFLOP/s are measured in the same run: batch-1 decode reads every
weight once per token, so it cannot beat bandwidth / weight bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import load_hf_gguf, machine, measure_bandwidth, measure_matmul, random_prompt  # noqa: E402


def bench_pagedlm(path: str, dtype: str, prompt: list[int], n_decode: int, repeats: int) -> dict:
    from pagedlm import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, kv_cache_memory=256 << 20, enable_prefix_caching=False)
    llm.generate({"prompt_token_ids": prompt[:32]}, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        o = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        prefill.append(o.metrics.ttft)
        o = llm.generate({"prompt_token_ids": prompt[:16]},
                         SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True), use_tqdm=False)[0]
        decode.append(o.metrics.decode_tokens_per_s)
    params = sum(p.numel() for p in llm.engine.runner.model.parameters())
    return {"prefill_s": min(prefill), "decode_tok_s": max(decode), "params": params}


def bench_hf(path: str, dtype: torch.dtype, prompt: list[int], n_decode: int, repeats: int) -> dict:
    model = load_hf_gguf(path, dtype)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :32])  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - t)
            short = ids[:, :16]
            mask = torch.ones_like(short)
            t = time.perf_counter()
            model.generate(short, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(short, attention_mask=mask, max_new_tokens=n_decode, min_new_tokens=n_decode,
                           do_sample=False)
            tn = time.perf_counter() - t
            decode.append((n_decode - 1) / (tn - t1))
    return {"prefill_s": min(prefill), "decode_tok_s": max(decode)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: the SmolLM2 GGUF)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pagedlm.engine.engine import default_model_path

    path = args.model or default_model_path()
    prompt = random_prompt(args.prompt_len)
    bw = measure_bandwidth()
    gflops = measure_matmul(torch.bfloat16, n=1024)
    gflops32 = measure_matmul(torch.float32, n=1024)
    rows = []
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ours = bench_pagedlm(path, name, prompt, args.decode, args.repeats)
        hf = bench_hf(path, dt, prompt, args.decode, args.repeats)
        weight_bytes = ours["params"] * (4 if dt == torch.float32 else 2)
        rows.append({
            "dtype": name,
            "pagedlm_prefill_tok_s": args.prompt_len / ours["prefill_s"],
            "hf_prefill_tok_s": args.prompt_len / hf["prefill_s"],
            "pagedlm_decode_tok_s": ours["decode_tok_s"], "hf_decode_tok_s": hf["decode_tok_s"],
            "decode_ratio": ours["decode_tok_s"] / hf["decode_tok_s"],
            "prefill_ratio": hf["prefill_s"] / ours["prefill_s"],
            "roofline_decode_tok_s": bw * 1e9 / weight_bytes,
        })
    report = {"machine": machine(), "bandwidth_GBps": bw, "bf16_matmul_GFLOPs": gflops,
              "fp32_matmul_GFLOPs": gflops32,
              "prompt_len": args.prompt_len, "decode_tokens": args.decode, "rows": rows}
    print(f"machine: {report['machine']}; memory bandwidth {bw:.1f} GB/s; matmul bf16 {gflops:.1f} GFLOP/s, "
          f"fp32 {gflops32:.1f} GFLOP/s")
    print(f"{'dtype':9} {'prefill tok/s (ours / HF / ratio)':36} {'decode tok/s (ours / HF / ratio)':34} roofline")
    for r in rows:
        print(f"{r['dtype']:9} {r['pagedlm_prefill_tok_s']:8.0f} / {r['hf_prefill_tok_s']:6.0f} / "
              f"{r['prefill_ratio']:4.2f}x{'':10} {r['pagedlm_decode_tok_s']:6.1f} / {r['hf_decode_tok_s']:5.1f} / "
              f"{r['decode_ratio']:4.2f}x{'':9} {r['roofline_decode_tok_s']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
