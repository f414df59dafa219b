"""Communication per step under TP=2 and EP=2: the engine's collective counters (calls, payload
bytes, seconds inside collectives) against ``pagedlm.analysis.comm``'s prediction, on random
small Llama and Mixtral models (no download), gloo on CPU.

    .venv/bin/python -m benchmarks.bench_parallel [--decode-steps 8] [--prompts 8] [--prompt-len 64]

Prints a markdown table (the one in docs/parallel.md). Step time is the engine's wall time for
the step (schedule, pack, send to ranks, forward, logits back, sample).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from pagedlm import LLM, SamplingParams
from pagedlm.analysis import collectives_per_step

SIZE = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=1024)


def make_model(kind: str, path: str) -> str:
    import transformers as T

    torch.manual_seed(0)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**SIZE, intermediate_size=1408))
    else:
        model = T.MixtralForCausalLM(T.MixtralConfig(**SIZE, intermediate_size=704, num_local_experts=8,
                                                     num_experts_per_tok=2))
    model.save_pretrained(path)
    return path


def measure(llm: LLM, steps: int) -> list[dict]:
    """Per engine step: tokens per EP part, per-rank counters, wall time."""
    eng, runner = llm.engine, llm.engine.runner
    seen: list = []
    prepare = runner.prepare
    runner.prepare = lambda s: seen.append(prepare(s)) or seen[-1]
    out = []
    try:
        for _ in range(steps):
            seen.clear()
            runner.reset_collective_stats()
            t0 = time.perf_counter()
            eng.step()
            wall = time.perf_counter() - t0
            parts = [(len(p[0]), len(p[3])) for p in seen[0].parts]
            out.append({"parts": parts, "stats": runner.collective_stats(), "wall": wall})
    finally:
        del runner.prepare
    return out


def summarise(llm: LLM, rec: dict, tp: int, ep: int) -> dict:
    """Engine vs analysis, summed over the ranks of one TP group (TP) or over the EP ranks (EP)."""
    cfg, lay = llm.engine.model_config, llm.engine.runner.layout
    ranks = [0] if ep == 1 else [lay.rank_of(0, e, 0) for e in range(ep)]
    calls = nbytes = secs = pcalls = pbytes = 0
    for r in ranks:
        _, e, _ = lay.coords(r)
        tokens, sampled = rec["parts"][e]
        pred = collectives_per_step(cfg, tp=tp, ep=ep, num_tokens=max(tokens, 1), num_sampled=sampled,
                                    dtype_bytes=4).by_kind(0)
        pcalls += sum(t.calls for t in pred.values())
        pbytes += sum(t.payload_bytes for t in pred.values())
        for v in rec["stats"][r].values():
            calls += v["calls"]
            nbytes += v["bytes"]
            secs += v["seconds"]
    n = len(ranks)
    return {"tokens": "/".join(str(p[0]) for p in rec["parts"]), "calls": calls // n, "pcalls": pcalls // n,
            "bytes": nbytes, "pbytes": pbytes, "secs": secs / n, "wall": rec["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="torch threads of the single-process baseline (each of 2 ranks gets cpu_count // 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sp = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 8000 + 1 for j in range(args.prompt_len)]}
               for i in range(args.prompts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, layout in (("llama", {}), ("llama", {"tensor_parallel_size": 2}),
                             ("mixtral", {}), ("mixtral", {"expert_parallel_size": 2})):
            path = os.path.join(tmp, kind)
            if not os.path.isdir(path):
                make_model(kind, path)
            llm = LLM(path, dtype="float32", num_kv_blocks=256, max_num_batched_tokens=4096, **layout)
            tp, ep = layout.get("tensor_parallel_size", 1), layout.get("expert_parallel_size", 1)
            try:
                for i, p in enumerate(prompts):
                    llm.engine.add_request(f"r{i}", None, sp, prompt_token_ids=p["prompt_token_ids"])
                if tp * ep == 1:  # single process: step times only
                    recs = []
                    for _ in range(1 + args.decode_steps):
                        t0 = time.perf_counter()
                        llm.engine.step()
                        recs.append(time.perf_counter() - t0)
                    rows.append((kind, "single", "prefill", "-", recs[0], None))
                    rows.append((kind, "single", "decode", "-", sum(recs[1:]) / args.decode_steps, None))
                    continue
                recs = measure(llm, 1 + args.decode_steps)
                name = f"TP={tp}" if tp > 1 else f"EP={ep}"
                rows.append((kind, name, "prefill", None, None, summarise(llm, recs[0], tp, ep)))
                dec = [summarise(llm, r, tp, ep) for r in recs[1:]]
                avg = {k: (sum(d[k] for d in dec) / len(dec) if k != "tokens" else dec[0]["tokens"]) for k in dec[0]}
                rows.append((kind, name, "decode (mean)", None, None, avg))
            finally:
                llm.engine.shutdown()
    print("| model | layout | step | tokens (per EP rank) | collective calls / rank: engine (predicted) "
          "| payload bytes: engine (predicted) | s in collectives / rank | step wall s | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, name, step, _, wall, s in rows:
        if s is None:
            print(f"| {kind} | {name} | {step} | {args.prompts * args.prompt_len if step == 'prefill' else args.prompts}"
                  f" | - | - | - | {wall:.4f} | - |")
            continue
        print(f"| {kind} | {name} | {step} | {s['tokens']} | {s['calls']:.0f} ({s['pcalls']:.0f}) "
              f"| {s['bytes']:,.0f} ({s['pbytes']:,.0f}) | {s['secs']:.4f} | {s['wall']:.4f} "
              f"| {s['secs'] / s['wall']:.0%} |")


if __name__ == "__main__":
    main()
