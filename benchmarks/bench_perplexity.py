"""What quantization costs: perplexity on the shipped public-domain text, pagedlm per quantization
vs llama.cpp on the same GGUF, the same token ids and the same windows.

    python benchmarks/bench_perplexity.py --llama-cpp-python /path/to/python-with-llama_cpp

pagedlm: ``pagedlm.perplexity`` (windows of 512 tokens every 256; each token scored once).
llama.cpp: llama-cpp-python with ``logits_all``, the same windows over the same token ids (our
tokenization, so both score exactly the same tokens), its Q4_1 / Q8_0 weights as in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                    "public_domain_en.txt")

LLAMA_SCRIPT = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, ctx, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.load(open(sys.argv[4]))
llm = Llama(path, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=int(sys.argv[5]), verbose=False)
total, count, scored_to, start = 0.0, 0, 1, 0
while scored_to < len(ids):
    window = ids[start:start + ctx]
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    for i in range(max(1, scored_to - start), len(window)):
        total -= logp[i - 1, window[i]]
        count += 1
    scored_to = start + len(window)
    start += stride
    if start + ctx > len(ids):
        start = max(0, len(ids) - ctx)
print(json.dumps({"ppl": math.exp(total / count), "tokens": count}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--file", default=TEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--llama-cpp-python", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from pagedlm import LLM
    from pagedlm.engine.engine import default_model_path
    from pagedlm.perplexity import perplexity

    path = args.model or default_model_path()
    text = open(args.file, encoding="utf-8").read()
    rows, ref_top1, ids = [], None, None
    for dtype, quant in (("float32", "none"), ("float32", "auto"), ("bfloat16", "none"), ("bfloat16", "auto"),
                         ("bfloat16", "int8"), ("bfloat16", "int4")):
        llm = LLM(path, dtype=dtype, quantization=quant, enforce_eager=True, kv_cache_memory=128 << 20)
        ids = llm.engine.encode(text) if ids is None else ids
        r = perplexity(llm.engine, ids, args.ctx, args.stride)
        ref_top1 = r.top1 if ref_top1 is None else ref_top1
        agree = sum(a == b for a, b in zip(ref_top1, r.top1)) / len(ref_top1)
        rows.append({"engine": f"pagedlm {dtype} {quant}", "ppl": r.ppl, "tokens": r.num_tokens,
                     "top1_agreement_vs_fp32": agree, "tokens_per_s": r.tokens_per_s})
        print(rows[-1], flush=True)
    if args.llama_cpp_python:
        with tempfile.TemporaryDirectory() as tmp:
            script, idf = os.path.join(tmp, "ppl.py"), os.path.join(tmp, "ids.json")
            open(script, "w").write(LLAMA_SCRIPT)
            json.dump(ids, open(idf, "w"))
            r = subprocess.run([args.llama_cpp_python, script, path, str(args.ctx), str(args.stride), idf,
                                str(torch.get_num_threads())], capture_output=True, text=True)
        if r.returncode == 0:
            out = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"engine": "llama.cpp (Q4_1 + Q8_0, as in the file)", "ppl": out["ppl"],
                         "tokens": out["tokens"]})
        else:
            print("llama.cpp failed:", r.stderr[-2000:], file=sys.stderr)
    base = rows[0]["ppl"]
    llama = next((r["ppl"] for r in rows if r["engine"].startswith("llama.cpp")), None)
    print(f"{'engine':42} {'PPL':>8} {'vs fp32':>8} {'vs llama.cpp':>12} {'top-1 = fp32':>12}")
    for r in rows:
        vs_l = f"{100 * (r['ppl'] / llama - 1):+.2f}%" if llama else "-"
        agree = f"{100 * r['top1_agreement_vs_fp32']:.1f}%" if "top1_agreement_vs_fp32" in r else "-"
        print(f"{r['engine']:42} {r['ppl']:8.3f} {100 * (r['ppl'] / base - 1):+7.2f}% {vs_l:>12} {agree:>12}")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
