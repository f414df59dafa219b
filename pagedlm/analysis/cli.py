"""``pagedlm inspect MODEL_OR_CONFIG``: LLM arithmetic from a config, instantly, without torch."""

from __future__ import annotations

import argparse
import json
import sys

from pagedlm.analysis.hardware import HARDWARE, parse_hardware
from pagedlm.analysis.report import Options, build_report, format_report
from pagedlm.config import ModelConfig

_DTYPE_FROM_TORCH = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="parameters, memory, FLOPs, roofline and communication of a model, from its config",
        description="Exact LLM arithmetic from a model config (HF config.json, a model directory or a "
                    "GGUF file): parameters by component, weights and KV cache memory, FLOPs, a roofline "
                    "estimate and the collectives of a TP/PP/EP layout. Pure Python, no torch.",
    )
    p.add_argument("model", metavar="MODEL_OR_CONFIG", help="model directory, config.json or .gguf file")
    p.add_argument("--dtype", default=None, help="weight dtype (default: the config's torch_dtype, else bf16)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length / context (default 2048)")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk for the activation estimate (default min(seq, 2048))")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
    p.add_argument("--gpus", type=int, default=None, help="devices in all (default tp*pp*ep)")
    p.add_argument("--hardware", default="h100",
                   help=f"{'|'.join(HARDWARE)}|custom:FLOPS,BANDWIDTH[,MEMORY_GB] (default h100)")
    p.add_argument("--memory", type=float, default=None, help="device memory in GB (overrides --hardware's)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="write a picture (memory breakdown, KV cache growth); needs matplotlib")
    g = p.add_argument_group("training (--train)")
    g.add_argument("--train", action="store_true",
                   help="add training memory per rank (weights, grads, AdamW, activations with and without "
                        "checkpointing, ZeRO-1/2/3) and FLOPs per token; --batch x --seq tokens per micro-batch")
    g.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"], help="training precision")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on every linear layer (0: full training)")
    g.add_argument("--ranks", type=int, default=1, help="data-parallel ranks for ZeRO (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = ModelConfig.from_pretrained(args.model)
    hw = parse_hardware(args.hardware, args.memory)
    dtype = args.dtype or _DTYPE_FROM_TORCH.get(str(cfg.torch_dtype or "").replace("torch.", ""), "bf16")
    opt = Options(dtype=dtype, kv_dtype=args.kv_dtype, batch=args.batch, seq=args.seq, chunk=args.chunk,
                  tp=args.tp, pp=args.pp, ep=args.ep, gpus=args.gpus)
    report = build_report(cfg, hw, opt, source=args.model)
    if args.plot:
        from pagedlm.analysis.plot import plot_report

        plot_report(cfg, report, args.plot)
    if args.train:
        from pagedlm.analysis.training import training_report

        mem = args.memory * 1e9 if args.memory else None
        report["training"] = training_report(cfg, args.batch, args.seq, args.train_dtype, args.lora_r, args.ranks, mem)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report))
        if args.train:
            from pagedlm.analysis.training import format_training

            sys.stdout.write(format_training(report["training"]))
        if args.plot:
            sys.stdout.write(f"plot written to {args.plot}\n")
    return 0
