"""Speculative decoding at batch 1: decode speed-up and acceptance per proposer and workload.

    python benchmarks/bench_spec.py [--max-tokens 128] [--k 3] [--repeats 2]
        [--proposers ngram,ngram_fixed,draft_model] [--workloads repetitive,free,json] [--enforce-eager]
        [--json out.json] [--plot out.png]
    python benchmarks/bench_spec.py --replot out.json --plot out.png    # the plot of a saved run

SmolLM2-135M-Instruct (the default GGUF, quantization auto, compiled decode), one request at a
time, greedy. Three workloads of chat prompts: "repetitive" (the answer copies text of the prompt:
code edits, quoting, summarising a list), "free" (open questions) and "json" (structured
output: a JSON schema constrains the answer, a list of objects whose keys repeat). For each prompt: plain
decoding, n-gram prompt lookup (``ngram``: its adaptive policy verifies up to k proposals, as
many as pay for their rows; ``ngram_fixed``: always all k, as vLLM), and a draft model (the same GGUF: the only model with SmolLM2's
tokenizer here, so it shows the cost of a draft as big as the target, at full acceptance).
Decode tok/s is (generated - 1) / (finish - first token) from the request's metrics; the
speed-up is the ratio of total decode times over each workload's prompts, all on one engine
each, interleaved per prompt (a loaded machine slows every configuration alike). Greedy outputs
are compared token for token with plain decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import machine  # noqa: E402

CODE = '''def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    total = 0
    for x in xs:
        total += (x - m) ** 2
    return total / len(xs)
'''

WORKLOADS = {
    "repetitive": [
        "Rename the function `mean` to `average` everywhere in this code and print the whole code:\n\n" + CODE,
        "Add a docstring to each function of this code and print the whole code:\n\n" + CODE,
        "Repeat the following list exactly, one item per line:\n" + "\n".join(
            f"- {x}" for x in ["apples from the north orchard", "bananas from the south farm", "cherries picked in June",
                               "dates dried in the sun", "elderberries for the syrup", "figs from the old tree",
                               "grapes for the wine", "honeydew melons", "kiwis from the market"]),
        "Copy this paragraph word for word: The paged KV cache stores the keys and values of every "
        "sequence in fixed-size blocks. A block table maps each sequence's positions to its blocks, so "
        "memory is allocated on demand, shared between sequences with a common prefix, and freed as "
        "soon as a sequence finishes. This is what lets a server batch many requests at once.",
        "Translate this JSON into YAML and print it:\n{\"name\": \"pagedlm\", \"version\": \"0.2\", \"features\": "
        "[\"paged kv cache\", \"prefix caching\", \"continuous batching\"], \"license\": \"MIT\"}",
        "Fix the typo in this sentence and repeat it: The quick brown fox jumpps over the lazy dog while the "
        "farmer watches from the porch of the old red barn.",
        "Here is a shopping list: milk, eggs, bread, butter, cheese, tomatoes, onions, garlic, rice, beans. "
        "Write it again sorted alphabetically, one per line.",
        "Convert these functions to use a list comprehension and print the whole code:\n\n"
        "def squares(n):\n    result = []\n    for i in range(n):\n        result.append(i * i)\n    return result\n\n\n"
        "def cubes(n):\n    result = []\n    for i in range(n):\n        result.append(i * i * i)\n    return result\n",
    ],
    "free": [
        "Write a short story about a robot who learns to paint.",
        "What are three good habits for staying healthy? Explain each.",
        "Explain how a rainbow forms.",
        "Give me some advice for my first job interview.",
        "Why is the sky blue?",
        "Write a poem about the sea.",
        "What should I cook for dinner tonight?",
        "Describe your ideal vacation.",
    ],
    # Structured output (constrained by JSON_SCHEMA): the keys of every item repeat.
    "json": [
        "List people with their name, age and city as JSON.",
        "Make up a guest list for a dinner party as JSON: each guest's name, age and city.",
        "Give the names, ages and home cities of ten characters of a novel, as JSON.",
    ],
}
JSON_SCHEMA = {"type": "array", "minItems": 10, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                     "city": {"enum": ["Paris", "London", "Rome"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}}
CONSTRAINTS = {"json": {"json": JSON_SCHEMA}}


def run_prompt(llm, prompt: str, max_tokens: int, constraint: dict | None = None):
    from pagedlm import SamplingParams

    msgs = [{"role": "user", "content": prompt}]
    out = llm.chat(msgs, SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=constraint),
                   use_tqdm=False)[0]
    m = out.metrics
    return out.outputs[0].token_ids, m.decode_time, m.num_generated_tokens, m.spec_decode


def divergence(plain, prompt: str, max_tokens: int, ref: list[int], toks: list[int],
               constraint: dict | None = None) -> str:
    """Where an output first differs from plain decoding's, and how close plain decoding's top
    two candidates were there: a near tie that different row counts in the GEMMs round
    differently (bf16), or a real disagreement."""
    from pagedlm import SamplingParams

    i = next((j for j, (a, b) in enumerate(zip(ref, toks)) if a != b), min(len(ref), len(toks)))
    msgs = [{"role": "user", "content": prompt}]
    out = plain.chat(msgs, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=2,
                                          structured_outputs=constraint), use_tqdm=False)
    lps = out[0].outputs[0].logprobs
    gap = "?"
    if i < len(lps) and len(lps[i]) >= 2:
        top = sorted((v.logprob for v in lps[i].values()), reverse=True)
        gap = f"{top[0] - top[1]:.4f}"
    return f"  differs from plain at token {i} of {len(ref)}: plain's top-2 logprob gap there {gap}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per prompt and configuration (best kept)")
    ap.add_argument("--proposers", default="ngram,ngram_fixed,draft_model",
                    help="comma-separated: ngram, ngram_fixed, draft_model")
    ap.add_argument("--enforce-eager", action="store_true", help="every engine eager (no compiled decode)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="bar chart of the speed-ups (PNG)")
    ap.add_argument("--replot", default=None, help="plot a saved --json run instead of running")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot, encoding="utf-8") as f:
            saved = json.load(f)
        plot(saved["results"], saved["args"], args.plot or args.replot.rsplit(".", 1)[0] + ".png")
        return 0

    from pagedlm import LLM
    from pagedlm.engine.engine import default_model_path

    model = default_model_path()
    ngram = {"method": "ngram", "num_speculative_tokens": args.k,
             "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": 1}
    proposers = {"ngram": ngram, "ngram_fixed": {**ngram, "adaptive": False},
                 "draft_model": {"method": "draft_model", "num_speculative_tokens": args.k, "model": model}}
    configs = {"plain": None}
    for name in args.proposers.split(","):
        if name not in proposers:
            ap.error(f"unknown proposer {name!r}")
        configs[name] = proposers[name]
    engines = {}
    for name, cfg in configs.items():
        t = time.perf_counter()
        llm = LLM(model, kv_cache_memory=256 << 20, max_num_seqs=8, speculative_config=cfg,
                  enforce_eager=args.enforce_eager)
        llm.engine.warmup([1])  # with speculation: also the buckets of 1 + j verification rows, j <= k
        engines[name] = llm
        print(f"{name}: loaded and compiled in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    results = {}
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            ap.error(f"unknown workload {workload!r}")
        prompts = WORKLOADS[workload]
        tot = {name: {"time": 0.0, "tokens": 0, "drafts": 0, "proposed": 0, "accepted": 0, "identical": True}
               for name in configs}
        for prompt in prompts:
            ref = None
            for name, llm in engines.items():
                best = None
                for _ in range(args.repeats):
                    toks, dt, n, spec = run_prompt(llm, prompt, args.max_tokens, CONSTRAINTS.get(workload))
                    best = dt if best is None else min(best, dt)
                t = tot[name]
                t["time"] += best
                t["tokens"] += n - 1
                t["drafts"] += spec.num_drafts
                t["proposed"] += spec.num_draft_tokens
                t["accepted"] += spec.num_accepted_tokens
                if ref is None:
                    ref = toks
                if toks != ref:
                    t["identical"] = False
                    print(divergence(engines["plain"], prompt, args.max_tokens, ref, toks, CONSTRAINTS.get(workload)), file=sys.stderr)
                print(f"{workload:10s} {name:11s} {n - 1} tokens in {best:.2f} s; accepted "
                      f"{spec.num_accepted_tokens}/{spec.num_draft_tokens}", file=sys.stderr)
        base = tot["plain"]["tokens"] / tot["plain"]["time"]
        for t in tot.values():
            t["tok_s"] = t["tokens"] / t["time"]
            t["speedup"] = t["tok_s"] / base
            t["acceptance"] = t["accepted"] / t["proposed"] if t["proposed"] else None
            t["mean_accepted_per_draft"] = t["accepted"] / t["drafts"] if t["drafts"] else None
        results[workload] = tot
    mode = "eager" if args.enforce_eager else "compiled"
    print(f"\nbatch-1 greedy decode, SmolLM2-135M-Instruct Q4_1 (quantization auto, {mode}), k={args.k}, "
          f"{args.max_tokens} tokens, best of {args.repeats}")
    print("| workload | proposer | decode tok/s | speed-up | acceptance | accepted / step | identical greedy |")
    print("|---|---|---:|---:|---:|---:|---|")
    for workload, tot in results.items():
        for name, t in tot.items():
            acc = "-" if t["acceptance"] is None else f"{t['acceptance']:.0%}"
            per = "-" if t["mean_accepted_per_draft"] is None else f"{t['mean_accepted_per_draft']:.2f}"
            print(f"| {workload} | {name} | {t['tok_s']:.1f} | {t['speedup']:.2f}x | {acc} | {per} | "
                  f"{'yes' if t['identical'] else 'NO'} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(results, vars(args), args.plot)
    return 0


def plot(results: dict, args: dict, path: str) -> None:
    """Speed-up over plain decoding per workload (bars per proposer), acceptance on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results)
    names = [n for n in results[workloads[0]] if n != "plain"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(workloads))]
        ys = [results[w][name]["speedup"] for w in workloads]
        bars = ax.bar(xs, ys, width, label=name)
        for b, w in zip(bars, workloads):
            acc = results[w][name]["acceptance"]
            ax.annotate("-" if acc is None else f"{acc:.0%} acc.", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("decode speed-up vs plain (batch 1)")
    ax.set_title(f"SmolLM2-135M Q4_1, greedy, k={args['k']}, {args['max_tokens']} tokens", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
