"""CLI: ``pagedlm finetune``, ``pagedlm pretrain``, ``pagedlm train-tokenizer`` (docs/training.md).

Under torchrun (WORLD_SIZE > 1) each rank runs the command: gloo on CPU, NCCL on CUDA; DDP
averages gradients and ZeroRedundancyOptimizer keeps each rank's share of the AdamW state.
Rank 0 alone writes logs, checkpoints and outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any


def _add_loop_args(p: argparse.ArgumentParser, lr: float, seq_len: int, steps: int) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch per rank (default: 4)")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="rows per optimizer step over all ranks and accumulation steps; sets --batch-size "
                        "(must divide by ranks x --grad-accum)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per row (default: {seq_len})")
    g.add_argument("--no-pack", action="store_true", help="one example per row (padded) instead of packing")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (default: 10)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 = off (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and split (default: 0)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 autocast (fast only with native bf16: GPUs, AVX512-BF16/AMX CPUs)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward (less memory, ~1/3 more compute)")
    g = p.add_argument_group("evaluation, logs and checkpoints")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data (default: 0.05)")
    g.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: never)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default: 2)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT|latest",
                   help="continue a run from a checkpoint directory (or the latest in --output)")
    g.add_argument("--samples", type=int, default=3, help="held-out prompts answered at the end (default: 3)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA (or full) fine-tuning on chat / prompt-completion / text JSONL",
                       description="Fine-tune a model on the same code the engine runs; writes a PEFT adapter "
                                   "directory that 'pagedlm serve --lora-modules' serves (or, with --merge, "
                                   "a merged HF model directory).")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="JSONL files of {messages} | {prompt, completion} | {text}, or 'builtin' "
                        "(a generated instruction set; default)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    p.add_argument("--output", "-o", required=True, help="output directory (adapter, log, plot, checkpoints)")
    p.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha; scale = alpha / r (default: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    p.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names (q_proj,v_proj,...) or all-linear (default)")
    p.add_argument("--merge", action="store_true", help="write the base model with the adapter merged (HF dir)")
    p.add_argument("--show-masks", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="print N examples with the trained tokens in [[ ]] and exit")
    _add_loop_args(p, lr=2e-4, seq_len=512, steps=100)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("pretrain", help="train a small Llama from random initialisation on text",
                       description="Pretrain a Llama-family model from scratch on text files; writes an HF "
                                   "directory that 'pagedlm generate' and 'serve' run.")
    p.add_argument("--data", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--output", "-o", required=True, help="output directory (model, log, plot, checkpoints)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: train a BPE on --data)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one (default: 4096)")
    p.add_argument("--config", default=None, help="JSON of LlamaConfig fields (overrides the size flags)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=704)
    _add_loop_args(p, lr=3e-3, seq_len=256, steps=200)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files",
                       description="Byte-level BPE (tokenizers library) with special tokens and a ChatML chat "
                                   "template, saved as tokenizer.json + config that the engine loads.")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    p.add_argument("--special-tokens", default=None,
                   help="comma-separated (default: <|endoftext|>,<|im_start|>,<|im_end|>)")
    p.add_argument("--no-chat-template", action="store_true", help="do not set the ChatML template")
    p.set_defaults(func=cmd_train_tokenizer)


# ---- shared ------------------------------------------------------------------------------------

def _init_distributed() -> tuple[int, int]:
    """(rank, world); joins the torchrun group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _train_config(args: argparse.Namespace, world: int, extra: dict[str, Any]):
    from pagedlm.train.loop import TrainConfig

    if args.dtype == "bfloat16":
        import torch

        from pagedlm.model.layers.matmul import cpu_has_native_bf16

        if not torch.cuda.is_available() and not cpu_has_native_bf16():
            print("warning: this CPU has no native bf16 matmuls (AVX512-BF16 / AMX): bfloat16 autocast is "
                  "emulated and slower than float32", file=sys.stderr)
    batch = args.batch_size
    if args.global_batch_size is not None:
        per = world * args.grad_accum
        if args.global_batch_size < 1 or args.global_batch_size % per:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} rank(s) x "
                             f"{args.grad_accum} accumulation step(s)")
        batch = args.global_batch_size // per
    return TrainConfig(out_dir=args.output, steps=args.steps, batch_size=batch, grad_accum=args.grad_accum,
                       seq_len=args.seq_len, pack=not args.no_pack, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm, seed=args.seed, dtype=args.dtype,
                       eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last,
                       progress=not args.no_progress, extra=extra)


def _rows_digest(rows) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(json.dumps([r.ids, r.labels]).encode())
    return h.hexdigest()[:16]


def _run(trainer, args: argparse.Namespace) -> list[dict]:
    from pagedlm.train.loop import list_checkpoints

    if args.resume:
        path = args.resume
        if path == "latest":
            found = list_checkpoints(trainer.checkpoint_dir())
            if not found:
                raise ValueError(f"--resume latest: no checkpoint under {trainer.checkpoint_dir()!r}")
            path = found[-1]
        trainer.load_checkpoint(path)
        print(f"resumed from {path} at step {trainer.step}", file=sys.stderr)
    history = trainer.fit()
    if trainer.rank == 0 and history:
        from pagedlm.train.loop import plot_losses

        with open(trainer.log_path, encoding="utf-8") as f:
            full = [json.loads(line) for line in f if line.strip()]
        plot_losses(full, os.path.join(args.output, "loss.png"), os.path.basename(os.path.abspath(args.output)))
    return history


def _summary(history: list[dict]) -> str:
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    history = [h for h in history if "loss" in h]
    tps = sum(h["tokens_per_s"] for h in history) / max(len(history), 1)
    return (f"steps {history[0]['step']}-{history[-1]['step']}: loss {history[0]['loss']:.4f} -> "
            f"{history[-1]['loss']:.4f}" + (f", held-out {ev[-1]:.4f}" if ev else "") + f", {tps:.0f} tokens/s")


# ---- finetune ----------------------------------------------------------------------------------

def load_examples(data: list[str], tokenizer) -> list:
    from pagedlm.train.builtin_data import builtin_records
    from pagedlm.train.data import encode_record, read_records

    records = []
    for d in data:
        records += builtin_records() if d == "builtin" else read_records(d)
    return [encode_record(tokenizer, r) for r in records]


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from pagedlm.loader.source import resolve_model
    from pagedlm.model.registry import load_model
    from pagedlm.tokenizer import load_tokenizer
    from pagedlm.train.data import make_rows, show_masks, split
    from pagedlm.train.loop import Trainer
    from pagedlm.train.lora import add_lora, merge_lora, save_adapter
    from pagedlm.train.model import make_trainable

    model_path, weights, cfg = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path, weights)
    if tokenizer is None:
        raise ValueError(f"model {model_path!r} has no tokenizer to encode the training data with")
    examples = load_examples(args.data, tokenizer)
    if args.show_masks:
        for ex in examples[: args.show_masks]:
            print(show_masks(tokenizer, ex))
            print("-" * 60)
        print(f"{len(examples)} examples; [[ ]] marks the tokens the loss is taken on")
        return 0
    rank, world = _init_distributed()
    if args.eval_data:
        train_ex, eval_ex = examples, load_examples([args.eval_data], tokenizer)
    else:
        train_ex, eval_ex = split(examples, args.eval_fraction, args.seed)
    rows = make_rows(train_ex, args.seq_len, not args.no_pack)
    eval_rows = make_rows(eval_ex, args.seq_len, not args.no_pack)
    model = make_trainable(load_model(weights, cfg, torch.float32, quantization="none"),
                           checkpointing=args.activation_checkpointing)
    torch.manual_seed(args.seed)
    lora = None
    if not args.full:
        targets = add_lora(model, args.lora_r, args.lora_alpha, args.target_modules, args.lora_dropout)
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": targets}
    extra = {"model": os.path.abspath(weights), "data": _rows_digest(rows), "lora": lora}
    trainer = Trainer(model, _train_config(args, world, extra), rows, eval_rows)
    n_train = sum(p.numel() for p in trainer.params)
    if rank == 0:
        print(f"{len(rows)} training rows ({len(train_ex)} examples), {len(eval_rows)} held-out rows; "
              f"{n_train:,} trainable parameters", file=sys.stderr)
    history = _run(trainer, args)
    if rank != 0:
        return 0
    if history:
        print(_summary(history), file=sys.stderr)
    if args.merge or args.full:
        from pagedlm.train.export import hf_config_for, save_hf

        if lora is not None:
            merge_lora(model)
        save_hf(model, args.output, hf_config_for(model_path, weights), tokenizer)
        print(f"wrote HF model directory {args.output}", file=sys.stderr)
        serve_model, lora_dir = args.output, None
    else:
        save_adapter(model, args.output, os.path.abspath(weights))
        print(f"wrote PEFT adapter {args.output} (serve: pagedlm serve --model {weights} "
              f"--lora-modules trained={args.output})", file=sys.stderr)
        serve_model, lora_dir = weights, args.output
    if args.samples:
        _print_samples(serve_model, lora_dir, args.lora_r, eval_ex[: args.samples], tokenizer)
    return 0


def _print_samples(model: str, lora_dir: str | None, rank: int, examples: list, tokenizer) -> None:
    """Greedy answers to held-out prompts through the engine (with the adapter, as served)."""
    from pagedlm import LLM, SamplingParams
    from pagedlm.lora import LoRARequest

    prompts = []
    for ex in examples:
        first = ex.train.index(True) if True in ex.train else len(ex.ids)
        prompts.append({"prompt_token_ids": ex.ids[:first]})
    kw: dict[str, Any] = {"enforce_eager": True, "quantization": "none"}
    if lora_dir:
        kw.update(enable_lora=True, max_lora_rank=max(16, rank))
    llm = LLM(model=model, dtype="float32", **kw)
    req = LoRARequest("trained", 1, lora_dir) if lora_dir else None
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0), use_tqdm=False, lora_request=req)
    for p, o in zip(prompts, outs):
        print("prompt:", tokenizer.decode(p["prompt_token_ids"], skip_special_tokens=False).strip()[-160:])
        print("answer:", o.outputs[0].text.strip())
        print("-" * 60)


# ---- pretrain ----------------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from pagedlm.config import ModelConfig
    from pagedlm.model.registry import build_model
    from pagedlm.train.data import chunk_text, make_rows, split
    from pagedlm.train.loop import Trainer
    from pagedlm.train.model import set_checkpointing
    from pagedlm.train.tokenizer import train_bpe

    rank, world = _init_distributed()
    tok_dir = args.tokenizer or os.path.join(args.output, "tokenizer")
    if args.tokenizer is None and (rank == 0 and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))):
        train_bpe(args.data, args.vocab_size).save_pretrained(tok_dir)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ids: list[int] = []
    for path in args.data:
        if not os.path.isfile(path):
            raise ValueError(f"training data file {path!r} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tokenizer(f.read(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train_ex, eval_ex = split(chunk_text(ids, args.seq_len), args.eval_fraction, args.seed)
    hf = llama_config(args, tokenizer)
    cfg = ModelConfig.from_hf(hf)
    torch.manual_seed(args.seed)
    model = build_model(cfg, torch.float32, trainable=True)
    set_checkpointing(model, args.activation_checkpointing)
    rows, eval_rows = make_rows(train_ex, args.seq_len, False), make_rows(eval_ex, args.seq_len, False)
    args.no_pack = True  # full-length chunks: nothing to pack
    n = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, _train_config(args, world, {"config": hf, "data": _rows_digest(rows)}), rows, eval_rows)
    if rank == 0:
        print(f"{n / 1e6:.2f}M parameters; {len(ids):,} tokens: {len(rows)} training rows of {args.seq_len}, "
              f"{len(eval_rows)} held-out", file=sys.stderr)
    history = _run(trainer, args)
    if rank != 0:
        return 0
    from pagedlm.train.export import save_hf

    save_hf(model, args.output, hf, tokenizer)
    if history:
        print(_summary(history), file=sys.stderr)
    print(f"wrote HF model directory {args.output} (pagedlm generate --model {args.output} 'Once')", file=sys.stderr)
    if args.samples:
        from pagedlm import LLM, SamplingParams

        llm = LLM(model=args.output, dtype="float32", enforce_eager=True)
        for ex in eval_ex[: args.samples]:
            prompt = tokenizer.decode(ex.ids[:16])
            out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)[0]
            print(f"{prompt!r} -> {out.outputs[0].text!r}")
    return 0


def llama_config(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """config.json of the model to pretrain: the size flags, or a JSON file of LlamaConfig fields."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                              intermediate_size=args.intermediate_size, max_position_embeddings=args.seq_len,
                              tie_word_embeddings=True, rope_theta=10000.0)
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            kw.update(json.load(f))
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise ValueError(f"hidden size {kw['hidden_size']} is not divisible by {kw['num_attention_heads']} heads")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise ValueError(f"{kw['num_attention_heads']} heads are not divisible by {kw['num_key_value_heads']} KV heads")
    kw.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    d = LlamaConfig(**kw).to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    for k in ("_name_or_path", "transformers_version"):
        d.pop(k, None)
    return d


# ---- train-tokenizer ---------------------------------------------------------------------------

def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from pagedlm.train.tokenizer import CHATML, train_bpe

    specials = [s.strip() for s in args.special_tokens.split(",") if s.strip()] if args.special_tokens else None
    tok = train_bpe(args.files, args.vocab_size, specials, None if args.no_chat_template else CHATML)
    tok.save_pretrained(args.output)
    print(f"wrote {args.output}: {len(tok)} tokens (byte-level BPE), EOS {tok.eos_token!r}", file=sys.stderr)
    return 0
