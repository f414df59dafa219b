"""Offline throughput on a mixed-length workload: pagedlm vs transformers vs llama.cpp, one run.

    python benchmarks/bench_throughput.py [--requests 64] [--sweep 8,32,64,128] [--json out.json]
        [--llama-cpp-python /path/to/python-with-llama_cpp]

Workload: N requests, prompt lengths uniform in [32, 256], output lengths uniform in [32, 256],
random token ids, ignore_eos, fixed seed (the same list for every engine). Counted tokens are the
requested ones only: a static batch that runs to its longest output and pads its shortest
prompt gets no credit for the padding or the surplus tokens.

- pagedlm: all requests submitted at once, continuous batching (LLMEngine.step loop).
- transformers: ``generate`` as its users run it: one left-padded static batch of all requests,
  greedy, run to the longest output (min_new_tokens = max_new_tokens = longest), same dtype.
- llama.cpp (llama-cpp-python, same GGUF, Q4_1 weights): its low-level batch API with one
  sequence id per request, all requests decoded in parallel (n_seq_max = N), run in a separate
  process because it lives in another venv (it is compiled from source).

The compute roofline: 2 x parameters FLOPs per token at the matmul GFLOP/s of the chosen dtype
measured in the same run (attention FLOPs are left out, which flatters the fraction slightly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import load_hf_gguf, machine, measure_matmul  # noqa: E402
from pagedlm.bench import BenchConfig, check_report, make_workload, run_workload  # noqa: E402


def bench_pagedlm(path: str, work, dtype: str, cold: bool = False) -> dict:
    """Warm (default): every decode bucket compiled before timing (reported apart: compile_s).
    Cold: the engine's first call, as a new user meets it (run with an empty cache root): no
    warmup, whatever is not built yet runs eagerly while the builders work in the background."""
    from pagedlm.engine.engine import EngineConfig, LLMEngine

    t = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=path, dtype=dtype, max_num_seqs=min(256, len(work)),
                                 max_num_batched_tokens=2048))
    load_s = time.perf_counter() - t
    compile_s = 0.0
    if not cold:
        t = time.perf_counter()
        eng.warmup()
        run_workload(eng, [(w[0][:16], 4) for w in work[:4]], tag="warm")
        compile_s = time.perf_counter() - t
    r = run_workload(eng, work)
    r["load_s"] = load_s
    if eng.runner.compiled is not None:
        r["buckets_after"] = {str(k): v for k, v in eng.runner.compiled.states().items()}
    check_report(r)  # a failed request or a missing token fails the benchmark (exit non-zero)
    r["params"] = sum(p.numel() for p in eng.runner.model.parameters())
    r["preemptions"] = eng.get_metrics()["num_preemptions"]
    r["compile_s"] = compile_s
    return r


def bench_hf(path: str, work, dtype: torch.dtype) -> dict:
    model = load_hf_gguf(path, dtype)
    longest_in = max(len(p) for p, _ in work)
    longest_out = max(n for _, n in work)
    pad = 0
    ids = torch.full((len(work), longest_in), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(work):
        ids[i, longest_in - len(p):] = torch.tensor(p)
        mask[i, longest_in - len(p):] = 1
    with torch.no_grad():
        model.generate(ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=2, do_sample=False,
                       pad_token_id=pad)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=longest_out, min_new_tokens=longest_out,
                       do_sample=False, pad_token_id=pad)
        wall = time.perf_counter() - t
    n_in = sum(len(p) for p, _ in work)
    n_out = sum(n for _, n in work)
    return {"wall_s": wall, "output_tokens_per_s": n_out / wall, "total_tokens_per_s": (n_in + n_out) / wall}


LLAMA_CPP_SCRIPT = r"""
import json, sys, time
import llama_cpp as L
path, work = sys.argv[1], json.load(open(sys.argv[2]))
n = len(work)
ctx_tokens = sum(len(p) + o for p, o in work) + 64 * n
params = L.llama_model_default_params()
model = L.llama_model_load_from_file(path.encode(), params)
cp = L.llama_context_default_params()
cp.n_ctx = ctx_tokens; cp.n_batch = 2048; cp.n_ubatch = 512; cp.n_seq_max = n
cp.n_threads = cp.n_threads_batch = int(sys.argv[3])
ctx = L.llama_init_from_model(model, cp)
vocab = L.llama_model_get_vocab(model)
n_vocab = L.llama_vocab_n_tokens(vocab)
batch = L.llama_batch_init(2048, 0, n)
def run(batch_items):
    # batch_items: list of (token, pos, seq, want_logits); returns {seq: next greedy token}
    out = {}
    for s in range(0, len(batch_items), 2048):
        chunk = batch_items[s:s + 2048]
        batch.n_tokens = len(chunk)
        for i, (tok, pos, seq, logits) in enumerate(chunk):
            batch.token[i] = tok; batch.pos[i] = pos; batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq; batch.logits[i] = logits
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        for i, (tok, pos, seq, logits) in enumerate(chunk):
            if logits:
                row = L.llama_get_logits_ith(ctx, i)
                best = max(range(n_vocab), key=lambda j: row[j])
                out[seq] = best
    return out
t0 = time.perf_counter()
items = []
for s, (p, o) in enumerate(work):
    items += [(tok, i, s, i == len(p) - 1) for i, tok in enumerate(p)]
nxt = run(items)
pos = {s: len(p) for s, (p, o) in enumerate(work)}
left = {s: o - 1 for s, (p, o) in enumerate(work)}
while any(v > 0 for v in left.values()):
    items = [(nxt[s], pos[s], s, True) for s in left if left[s] > 0]
    for _, _, s, _ in items:
        pos[s] += 1; left[s] -= 1
    nxt.update(run(items))
wall = time.perf_counter() - t0
n_in = sum(len(p) for p, o in work); n_out = sum(o for p, o in work)
print(json.dumps({"wall_s": wall, "output_tokens_per_s": n_out / wall, "total_tokens_per_s": (n_in + n_out) / wall}))
"""


def bench_llama_cpp(python: str, path: str, work, tmpdir: str) -> dict | None:
    wf = os.path.join(tmpdir, "work.json")
    sf = os.path.join(tmpdir, "llama_cpp_bench.py")
    with open(wf, "w") as f:
        json.dump(work, f)
    with open(sf, "w") as f:
        f.write(LLAMA_CPP_SCRIPT)
    r = subprocess.run([python, sf, path, wf, str(torch.get_num_threads())], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        print("llama.cpp failed:", r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--sweep", default="", help="comma-separated request counts for the scaling plot")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--dtype", default="auto", help="pagedlm and transformers dtype (default: auto, "
                    "which is float32 on CPUs without native bf16)")
    ap.add_argument("--llama-cpp-python", default=None, help="a python with llama_cpp installed")
    ap.add_argument("--cold", action="store_true", help="the first call with empty caches: a fresh cache "
                    "root (PAGEDLM_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR) and no warmup; builders left "
                    "running are stopped at exit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of throughput vs number of requests")
    args = ap.parse_args()
    if args.cold:
        root = tempfile.mkdtemp(prefix="pagedlm-cold-")
        os.environ["PAGEDLM_CACHE_DIR"] = os.path.join(root, "pagedlm")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
        print(f"cold: cache root {root}")
    from pagedlm.engine.engine import default_model_path
    from pagedlm.model.registry import resolve_dtype

    path = args.model or default_model_path()
    dtype = resolve_dtype(args.dtype)
    gflops = measure_matmul(dtype, n=1024)
    counts = [int(c) for c in args.sweep.split(",") if c] or [args.requests]
    rows = []
    tmp = tempfile.mkdtemp()
    for n in counts:
        work = make_workload(BenchConfig(num_requests=n, input_len=(32, 256), output_len=(32, 256), seed=0), 49152)
        # Cold: transformers first, so that the builders pagedlm leaves at idle priority do not
        # share the machine with it.
        hf = bench_hf(path, work, dtype) if args.cold and not args.no_hf else None
        ours = bench_pagedlm(path, work, args.dtype, cold=args.cold)
        row = {"requests": n, "pagedlm": ours}
        if not args.no_hf:
            row["transformers"] = hf or bench_hf(path, work, dtype)
        if args.llama_cpp_python:
            row["llama.cpp"] = bench_llama_cpp(args.llama_cpp_python, path, work, tmp)
        flops_per_token = 2 * ours["params"]
        row["roofline_tok_s"] = gflops * 1e9 / flops_per_token
        row["pagedlm_fraction_of_roofline"] = ours["total_tokens_per_s"] / row["roofline_tok_s"]
        rows.append(row)
        print(f"requests={n}{' (cold)' if args.cold else ''}: pagedlm {ours['total_tokens_per_s']:.0f} total "
              f"tok/s ({ours['output_tokens_per_s']:.0f} out, {ours['wall_s']:.1f} s; load {ours['load_s']:.1f} s, "
              f"longest stall {ours['itl_max_ms']:.0f} ms; compile before timing {ours['compile_s']:.0f} s; buckets after {ours.get('buckets_after')})", end="")
        for other in ("transformers", "llama.cpp"):
            if row.get(other):
                o = row[other]
                print(f"; {other} {o['total_tokens_per_s']:.0f} tok/s ({o['wall_s']:.1f} s, "
                      f"pagedlm {ours['total_tokens_per_s'] / o['total_tokens_per_s']:.2f}x)", end="")
        print(f"; roofline {row['roofline_tok_s']:.0f} tok/s -> {row['pagedlm_fraction_of_roofline']:.0%}")
    report = {"machine": machine(), "cold": args.cold, "dtype": str(dtype), "matmul_GFLOPs": gflops, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot and len(rows) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["requests"] for r in rows]
        for name in ("pagedlm", "transformers", "llama.cpp"):
            ys = [r[name]["total_tokens_per_s"] if r.get(name) else None for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("requests (prompt 32-256, output 32-256 tokens)")
        ax.set_ylabel("total tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_title(f"SmolLM2-135M throughput (pagedlm/transformers {str(dtype)[6:]}, llama.cpp Q4_1), 2 threads")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
