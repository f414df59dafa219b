"""Batch-1 decode and 512-token prefill: pagedlm (each quantization, compiled and eager) vs
llama.cpp vs transformers bf16, one run, same machine, same GGUF.

    python benchmarks/bench_decode.py --llama-cpp-python /path/to/python-with-llama_cpp \\
        [--decode 128] [--prompt-len 512] [--repeats 3] [--json out.json] [--plot docs/decode.png]

Decode: tokens/s over 128 greedy tokens after a 16-token prompt (pagedlm: through
``LLM.generate``, every engine cost included; llama.cpp: ``Llama.eval`` one token at a time;
transformers: ``generate``). Prefill: a 512-token prompt (pagedlm: TTFT of a max_tokens=1 request;
llama.cpp: one ``eval`` of the prompt, n_batch 512; transformers: one forward). Best of
``--repeats``. Compilation (pagedlm) happens before timing and is reported apart.

Roofline for decode: memory bandwidth (measured here) / bytes read per token (every weight the
step multiplies with, in the format it is stored in: packed int4 + scales, int8 + scales, bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import machine, measure_bandwidth, random_prompt  # noqa: E402

CONFIGS = [  # (label, dtype, quantization, enforce_eager)
    ("pagedlm bf16 (none), compiled", "bfloat16", "none", False),
    ("pagedlm auto (int4 + int8 head), eager", "auto", "auto", True),
    ("pagedlm auto (int4 + int8 head), compiled", "auto", "auto", False),
    ("pagedlm int8, compiled", "auto", "int8", False),
    ("pagedlm int4 (head too), compiled", "auto", "int4", False),
]


def decode_bytes(model) -> int:
    """Bytes of the weights one decode step reads, as stored for the decode kernels."""
    from pagedlm.model.layers.linear import LinearBase, VocabParallelEmbedding

    total = 0
    for mod in model.modules():
        method = getattr(mod, "quant_method", None) if isinstance(mod, LinearBase) else getattr(mod, "head_method", None)
        if method is None:
            continue
        q = getattr(method, "qweight", None)
        if q is not None:
            total += q.packed.numel() * q.packed.element_size() + q.scales.numel() * q.scales.element_size()
        elif isinstance(mod, LinearBase) or (isinstance(mod, VocabParallelEmbedding) and _is_head(model, mod)):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def _is_head(model, mod) -> bool:
    return mod is getattr(model, "lm_head", None) or (model.config.tie_word_embeddings and
                                                       mod is model.model.embed_tokens)


def bench_pagedlm(path, dtype, quantization, eager, prompt, n_decode, repeats) -> dict:
    from pagedlm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(path, dtype=dtype, quantization=quantization, enforce_eager=eager, kv_cache_memory=256 << 20,
              enable_prefix_caching=False, max_num_seqs=1)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.engine.warmup()
    llm.generate({"prompt_token_ids": prompt[:32]}, SamplingParams(max_tokens=8), use_tqdm=False)
    compile_s = time.perf_counter() - t
    prefill, decode = [], []
    for _ in range(repeats):
        o = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        prefill.append(o.metrics.ttft)
        o = llm.generate({"prompt_token_ids": prompt[:16]},
                         SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True), use_tqdm=False)[0]
        decode.append(o.metrics.decode_tokens_per_s)
    return {"prefill_tok_s": len(prompt) / min(prefill), "decode_tok_s": max(decode), "load_s": load_s,
            "compile_s": compile_s, "bytes_per_token": decode_bytes(llm.engine.runner.model),
            "report": llm.engine.cache_report()}


LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, n_decode, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = json.loads(sys.argv[4])
llm = Llama(path, n_ctx=2048, n_threads=int(sys.argv[5]), n_batch=512, verbose=False)
llm.eval(prompt[:32]); llm.reset()
prefill, decode = [], []
for _ in range(repeats):
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); prefill.append(time.perf_counter() - t)
    llm.reset(); llm.eval(prompt[:16])
    t = time.perf_counter()
    for i in range(n_decode):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])  # greedy, as the others
    decode.append(n_decode / (time.perf_counter() - t))
import llama_cpp
print(json.dumps({"prefill_tok_s": len(prompt) / min(prefill), "decode_tok_s": max(decode),
                  "version": llama_cpp.__version__}))
"""


def bench_llama_cpp(python, path, prompt, n_decode, repeats) -> dict | None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LLAMA_SCRIPT)
    r = subprocess.run([python, f.name, path, str(n_decode), str(repeats), json.dumps(prompt),
                        str(torch.get_num_threads())], capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        print("llama.cpp failed:", r.stderr[-2000:], file=sys.stderr)
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    from gguf import GGUFReader

    # llama.cpp reads every tensor once per token (the tied Q8_0 embedding as the output head).
    out["bytes_per_token"] = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    return out


def bench_transformers(path, prompt, n_decode, repeats) -> dict:
    from benchmarks.bench_core import bench_hf

    r = bench_hf(path, torch.bfloat16, prompt, n_decode, repeats)
    return {"prefill_tok_s": len(prompt) / r["prefill_s"], "decode_tok_s": r["decode_tok_s"]}


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return " ".join(f for f in keep if f in flags) or "no avx2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: the SmolLM2 GGUF)")
    ap.add_argument("--llama-cpp-python", default=None, help="a python with llama_cpp installed")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    from pagedlm.engine.engine import default_model_path

    path = args.model or default_model_path()
    prompt = random_prompt(args.prompt_len)
    bw = measure_bandwidth()
    rows = []
    for label, dtype, quant, eager in CONFIGS:
        r = bench_pagedlm(path, dtype, quant, eager, prompt, args.decode, args.repeats)
        rows.append({"engine": label, **r})
        print(f"{label}: {r}", flush=True)
    if args.llama_cpp_python:
        r = bench_llama_cpp(args.llama_cpp_python, path, prompt, args.decode, args.repeats)
        if r:
            rows.append({"engine": f"llama.cpp {r['version']} (Q4_1 + Q8_0 head)", **r})
            print(rows[-1], flush=True)
    if not args.no_transformers:
        rows.append({"engine": "transformers bf16", **bench_transformers(path, prompt, args.decode, args.repeats)})
        print(rows[-1], flush=True)
    llama = next((r for r in rows if r["engine"].startswith("llama.cpp")), None)
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}; memory bandwidth {bw:.1f} GB/s")
    print(f"{'engine':46} {'decode tok/s':>12} {'vs llama.cpp':>12} {'% roofline':>10} {'prefill tok/s':>13} "
          f"{'vs llama.cpp':>12}")
    for r in rows:
        roof = bw * 1e9 / r["bytes_per_token"] if r.get("bytes_per_token") else None
        r["roofline_decode_tok_s"] = roof
        dl = f"{r['decode_tok_s'] / llama['decode_tok_s']:.2f}x" if llama else "-"
        pl = f"{r['prefill_tok_s'] / llama['prefill_tok_s']:.2f}x" if llama else "-"
        pct = f"{100 * r['decode_tok_s'] / roof:.0f}%" if roof else "-"
        print(f"{r['engine']:46} {r['decode_tok_s']:12.1f} {dl:>12} {pct:>10} {r['prefill_tok_s']:13.0f} {pl:>12}")
    report = {"machine": machine(), "cpu_flags": cpu_flags(), "bandwidth_GBps": bw, "prompt_len": args.prompt_len,
              "decode_tokens": args.decode, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        names = [r["engine"] for r in rows]
        for ax, key, title in ((axes[0], "decode_tok_s", "batch-1 decode, tokens/s"),
                               (axes[1], "prefill_tok_s", f"prefill of {args.prompt_len} tokens, tokens/s")):
            vals = [r[key] for r in rows]
            colors = ["tab:blue" if n.startswith("pagedlm") else "tab:orange" if n.startswith("llama")
                      else "tab:gray" for n in names]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(title)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.0f}", va="center")
        axes[1].set_yticklabels([])
        fig.suptitle(f"SmolLM2-135M Q4_1 GGUF, {torch.get_num_threads()} threads, CPU flags: {cpu_flags()}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
