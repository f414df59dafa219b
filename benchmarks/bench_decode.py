"""Batch-1 and batch-4 decode and 512-token prefill: pagedlm (each quantization, compiled and
eager) vs llama.cpp's C++ ``llama-bench`` vs transformers bf16, one run, same machine, same GGUF.

    python benchmarks/bench_decode.py [--llama-bench /tmp/llama-bin/llama-bench] \
        [--llama-cpp-python /path/to/python-with-llama_cpp] [--decode 128] [--prompt-len 512] \
        [--repeats 3] [--only auto] [--json out.json] [--plot docs/decode.png]

llama.cpp is measured with its own C++ tools, built from the sources vendored in the
llama-cpp-python sdist by ``/work/shared/tools/llama-build`` (benchmark only; pagedlm never
depends on it): ``llama-bench -p 512 -n 128`` (pp512, tg128) and, when ``llama-batched-bench``
sits beside it, batch-4 decode (``-npl 4``, S_TG). llama-cpp-python, when given, is a second
column (``Llama.eval`` one token at a time).

Decode: tokens/s over 128 greedy tokens after a 16-token prompt (pagedlm: through
``LLM.generate``, every engine cost included); batch 4: four such requests at once, generated
tokens / time from the last first token to the last finish. Prefill: a 512-token prompt (pagedlm:
TTFT of a max_tokens=1 request). Best of ``--repeats``. Compilation (pagedlm) happens before
timing and is reported apart.

Roofline for decode: copy bandwidth (measured here, ``pagedlm.bench.copy_bandwidth_gbps``) /
bytes a step reads (``pagedlm.bench.decode_step_bytes``: every weight the step multiplies with,
as stored for the decode kernels); llama.cpp: the GGUF's tensor bytes.
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
from benchmarks.common import machine, random_prompt  # noqa: E402
from pagedlm.bench import copy_bandwidth_gbps, decode_step_bytes  # noqa: E402

CONFIGS = [  # (label, dtype, quantization, enforce_eager)
    ("pagedlm bf16 (none), compiled", "bfloat16", "none", False),
    ("pagedlm auto (int4 + int8 head), eager", "auto", "auto", True),
    ("pagedlm auto (int4 + int8 head), compiled", "auto", "auto", False),
    ("pagedlm int8, compiled", "auto", "int8", False),
    ("pagedlm int4 (head too), compiled", "auto", "int4", False),
]


def bench_pagedlm(path, dtype, quantization, eager, prompt, n_decode, repeats) -> dict:
    from pagedlm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(path, dtype=dtype, quantization=quantization, enforce_eager=eager, kv_cache_memory=256 << 20,
              enable_prefix_caching=False, max_num_seqs=4)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.engine.warmup()
    llm.generate({"prompt_token_ids": prompt[:32]}, SamplingParams(max_tokens=8), use_tqdm=False)
    compile_s = time.perf_counter() - t
    prefill, decode, decode4 = [], [], []
    greedy = SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True)
    for _ in range(repeats):
        o = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
        prefill.append(o.metrics.ttft)
        o = llm.generate({"prompt_token_ids": prompt[:16]}, greedy, use_tqdm=False)[0]
        decode.append(o.metrics.decode_tokens_per_s)
        outs = llm.generate([{"prompt_token_ids": prompt[16 * i:16 * i + 16]} for i in range(4)], greedy,
                            use_tqdm=False)
        start = max(o.metrics.first_token_time for o in outs)
        end = max(o.metrics.finished_time for o in outs)
        decode4.append(sum(o.metrics.num_generated_tokens - 1 for o in outs) / (end - start))
    return {"prefill_tok_s": len(prompt) / min(prefill), "decode_tok_s": max(decode),
            "decode4_tok_s": max(decode4), "load_s": load_s,
            "compile_s": compile_s, "bytes_per_token": decode_step_bytes(llm.engine.runner.model),
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


def bench_llama_bench(binary: str, path: str, prompt_len: int, n_decode: int, repeats: int, threads: int) -> dict | None:
    """llama.cpp's C++ llama-bench (pp<prompt_len>, tg<n_decode>, batch 1) and, if built beside
    it, llama-batched-bench for batch-4 decode. Best of the repetitions, as for pagedlm."""
    r = subprocess.run([binary, "-m", path, "-p", str(prompt_len), "-n", str(n_decode), "-t", str(threads),
                        "-r", str(repeats), "-o", "json"], capture_output=True, text=True)
    if r.returncode != 0:
        print("llama-bench failed:", r.stderr[-2000:], file=sys.stderr)
        return None
    runs = json.loads(r.stdout)
    out = {"version": f"{runs[0].get('build_commit', '?')} ({runs[0].get('build_number', '?')})"}
    for run in runs:
        best = max(run["samples_ts"]) if run.get("samples_ts") else run["avg_ts"]
        if run["n_prompt"] and not run["n_gen"]:
            out["prefill_tok_s"] = best
        elif run["n_gen"] and not run["n_prompt"]:
            out["decode_tok_s"] = best
    batched = os.path.join(os.path.dirname(binary), "llama-batched-bench")
    if os.path.exists(batched):
        best4 = 0.0
        for _ in range(repeats):
            b = subprocess.run([batched, "-m", path, "-c", "2048", "-b", "2048", "-ub", "512", "-npp", "16",
                                "-ntg", str(n_decode), "-npl", "4", "-t", str(threads), "--output-format", "jsonl"],
                               capture_output=True, text=True)
            for line in b.stdout.splitlines():
                if line.startswith("{") and '"speed_tg"' in line:
                    best4 = max(best4, json.loads(line)["speed_tg"])
        if best4:
            out["decode4_tok_s"] = best4
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
    ap.add_argument("--llama-bench", default="/tmp/llama-bin/llama-bench",
                    help="llama.cpp's llama-bench binary (built by /work/shared/tools/llama-build)")
    ap.add_argument("--llama-cpp-python", default=None, help="a python with llama_cpp installed (second column)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="run only the pagedlm configurations whose label contains TEXT (repeatable)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    from pagedlm.engine.engine import default_model_path

    path = args.model or default_model_path()
    prompt = random_prompt(args.prompt_len)
    bw = copy_bandwidth_gbps()
    rows = []
    threads = torch.get_num_threads()
    llama_runs = []
    if args.llama_bench and os.path.exists(args.llama_bench):  # before and after pagedlm: best of both
        llama_runs.append(bench_llama_bench(args.llama_bench, path, args.prompt_len, args.decode, args.repeats,
                                            threads))
    for label, dtype, quant, eager in CONFIGS:
        if args.only and not any(t in label for t in args.only):
            continue
        r = bench_pagedlm(path, dtype, quant, eager, prompt, args.decode, args.repeats)
        rows.append({"engine": label, **r})
        print(f"{label}: {r}", flush=True)
    if llama_runs:
        llama_runs.append(bench_llama_bench(args.llama_bench, path, args.prompt_len, args.decode, args.repeats,
                                            threads))
        done = [r for r in llama_runs if r]
        if done:
            best = {k: max(r.get(k, 0) for r in done) for k in ("prefill_tok_s", "decode_tok_s", "decode4_tok_s")}
            rows.append({"engine": f"llama.cpp llama-bench {done[0]['version']} (Q4_1 + Q8_0 head)",
                         **done[0], **best, "runs": done})
            print(rows[-1], flush=True)
    if args.llama_cpp_python:
        r = bench_llama_cpp(args.llama_cpp_python, path, prompt, args.decode, args.repeats)
        if r:
            rows.append({"engine": f"llama-cpp-python {r['version']} (Q4_1 + Q8_0 head)", **r})
            print(rows[-1], flush=True)
    if not args.no_transformers:
        rows.append({"engine": "transformers bf16", **bench_transformers(path, prompt, args.decode, args.repeats)})
        print(rows[-1], flush=True)
    llama = next((r for r in rows if r["engine"].startswith("llama.cpp")), None)
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}; copy bandwidth {bw:.1f} GB/s")

    def vs(r: dict, key: str) -> str:
        return f"{r[key] / llama[key]:.2f}x" if llama and r.get(key) and llama.get(key) else "-"

    print(f"| engine | decode b1 tok/s | vs llama-bench | % roofline | decode b4 tok/s | vs llama | "
          f"prefill {args.prompt_len} tok/s | vs llama-bench |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        roof = bw * 1e9 / r["bytes_per_token"] if r.get("bytes_per_token") else None
        r["roofline_decode_tok_s"] = roof
        pct = f"{100 * r['decode_tok_s'] / roof:.0f}%" if roof else "-"
        d4 = f"{r['decode4_tok_s']:.1f}" if r.get("decode4_tok_s") else "-"
        print(f"| {r['engine']} | {r['decode_tok_s']:.1f} | {vs(r, 'decode_tok_s')} | {pct} | {d4} | "
              f"{vs(r, 'decode4_tok_s')} | {r['prefill_tok_s']:.0f} | {vs(r, 'prefill_tok_s')} |")
    report = {"machine": machine(), "cpu_flags": cpu_flags(), "bandwidth_GBps": bw, "prompt_len": args.prompt_len,
              "decode_tokens": args.decode, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
        names = [r["engine"] for r in rows]
        for ax, key, title in ((axes[0], "decode_tok_s", "batch-1 decode, tokens/s"),
                               (axes[1], "decode4_tok_s", "batch-4 decode, tokens/s"),
                               (axes[2], "prefill_tok_s", f"prefill of {args.prompt_len} tokens, tokens/s")):
            vals = [r.get(key) or 0 for r in rows]
            colors = ["tab:blue" if n.startswith("pagedlm") else "tab:orange" if n.startswith("llama")
                      else "tab:gray" for n in names]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(title)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.0f}", va="center")
        axes[1].set_yticklabels([])
        axes[2].set_yticklabels([])
        fig.suptitle(f"SmolLM2-135M Q4_1 GGUF, {threads} threads, CPU flags: {cpu_flags()}, copy {bw:.1f} GB/s")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
