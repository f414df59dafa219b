"""The training loop: AdamW, warmup + cosine, gradient accumulation and clipping, eval, logs,
checkpoints with exact resume, and data parallelism (DDP + ZeRO-1) under torchrun.

Batches are a pure function of (seed, step): epoch e shuffles the rows with a generator seeded
``seed + e``, and global micro-batch m takes rows [m * G, (m + 1) * G) of that stream (G: rows per
micro-batch over all ranks; rank r takes its contiguous slice). So the data position of a run is
its step, resume needs nothing else, and 2 ranks see exactly the rows one process would.

The loss of a step is the mean over every trained token of the global batch (all micro-batches,
all ranks): each micro-batch's summed loss is divided by that global count (known in advance:
every rank holds all rows) and multiplied by the world size, because DDP *averages* gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pagedlm.train.data import Row, collate
from pagedlm.train.model import CausalLMLoss, loss_sum

log = logging.getLogger("pagedlm.train")

CKPT_PREFIX = "step-"


@dataclass
class TrainConfig:
    out_dir: str
    steps: int = 100
    batch_size: int = 4  # rows per micro-batch per rank
    grad_accum: int = 1
    seq_len: int = 512
    pack: bool = True
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    dtype: str = "float32"  # or bfloat16: autocast (native bf16 CPUs and GPUs)
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_last: int = 2
    progress: bool = True
    extra: dict = field(default_factory=dict)  # what else identifies the run (model, data, LoRA)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"training dtype must be float32 or bfloat16, got {self.dtype!r}")

    def fingerprint(self, world: int) -> dict:
        """What must agree for a resumed run to continue the same trajectory. Each step's rows
        depend only on rows per step (not on how ranks and accumulation split them), so a run
        may resume on another number of ranks."""
        d = asdict(self)
        for k in ("out_dir", "steps", "eval_every", "save_every", "keep_last", "progress", "batch_size",
                  "grad_accum"):
            d.pop(k)
        d["rows_per_step"] = self.batch_size * self.grad_accum * world
        d.update(d.pop("extra"))  # model, data digest, LoRA settings: named one by one in errors
        d["betas"] = list(d["betas"])
        return d


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at the last step."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class DataPlan:
    """Which rows each rank's micro-batch of each step holds (see the module docstring)."""

    def __init__(self, rows: list[Row], cfg: TrainConfig, world: int):
        self.rows, self.cfg, self.world = rows, cfg, world
        self._perm: dict[int, list[int]] = {}

    def _row(self, g: int) -> Row:
        n = len(self.rows)
        epoch = g // n
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._perm = {epoch: torch.randperm(n, generator=gen).tolist()}
        return self.rows[self._perm[epoch][g % n]]

    def micro(self, step: int, j: int, rank: int) -> list[Row]:
        b = self.cfg.batch_size
        start = ((step * self.cfg.grad_accum + j) * self.world + rank) * b
        return [self._row(start + i) for i in range(b)]

    def targets(self, step: int) -> int:
        """Trained tokens in the global batch of ``step`` (all micro-batches, all ranks)."""
        return sum(sum(lab != -100 for lab in r.labels) for j in range(self.cfg.grad_accum)
                   for rank in range(self.world) for r in self.micro(step, j, rank))


class Trainer:
    """Trains ``model``'s parameters that require grad on ``rows``. ``on_save(model, dir)`` writes
    what a checkpoint holds beside the trainable tensors (the adapter, for LoRA)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, rows: list[Row], eval_rows: list[Row] | None = None):
        import torch.distributed as dist

        self.cfg, self.rows, self.eval_rows = cfg, rows, eval_rows or []
        if not rows:
            raise ValueError("no training rows: the data has no example with a trained token")
        self.model = model
        self.dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.dist else 0
        self.world = dist.get_world_size() if self.dist else 1
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        torch.manual_seed(cfg.seed)
        if self.dist:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(CausalLMLoss(model), find_unused_parameters=False)
            # ZeRO-1: each rank keeps the AdamW moments of its shard of the parameters only.
            self.opt = ZeroRedundancyOptimizer(self.params, optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                               betas=cfg.betas, weight_decay=cfg.weight_decay)
        else:
            self.ddp = CausalLMLoss(model)
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.plan = DataPlan(rows, cfg, self.world)
        self.step = 0
        self.tokens_seen = 0
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.history: list[dict] = []

    # ---- one step ------------------------------------------------------------------------------
    def _autocast(self):
        on = self.cfg.dtype == "bfloat16"
        return torch.autocast(next(self.model.parameters()).device.type, dtype=torch.bfloat16, enabled=on)

    def train_step(self) -> dict:
        import contextlib

        cfg = self.cfg
        t0 = time.perf_counter()
        total = self.plan.targets(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss_acc = torch.zeros(())
        tokens = 0
        for j in range(cfg.grad_accum):
            rows = self.plan.micro(self.step, j, self.rank)
            batch = collate(rows, cfg.pack, cfg.seq_len if cfg.pack else None)
            tokens += sum(len(r.ids) for r in rows)
            sync = j == cfg.grad_accum - 1 or not self.dist
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx, self._autocast():
                s = self.ddp(batch)
                (s * (self.world / max(total, 1))).backward()
            loss_acc += s.detach().float()
        if self.dist:
            import torch.distributed as dist

            t = torch.tensor([float(loss_acc), float(tokens)])
            dist.all_reduce(t)
            loss_acc, tokens = t[0], int(t[1])
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": float(loss_acc) / max(total, 1), "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / dt, "tokens_seen": self.tokens_seen}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_rows:
            return None
        was = self.model.training
        self.model.eval()
        s, n = 0.0, 0
        b = self.cfg.batch_size
        for i in range(0, len(self.eval_rows), b):
            batch = collate(self.eval_rows[i:i + b], self.cfg.pack, None)
            with self._autocast():
                s += float(loss_sum(self.model, batch))
            n += batch.num_targets
        self.model.train(was)
        return s / max(n, 1)

    # ---- the run -------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        bar = None
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            self._truncate_log()
            if cfg.progress:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        if self.step == 0 and cfg.eval_every and self.eval_rows:
            # the starting point of the held-out curve: what training is measured against
            rec0 = {"step": 0, "eval_loss": self.evaluate()}
            self.history.append(rec0)
            if self.rank == 0:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec0) + "\n")
        while self.step < cfg.steps:
            rec = self.train_step()
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                ev = self.evaluate()
                if ev is not None:
                    rec["eval_loss"] = ev
            self.history.append(rec)
            if self.rank == 0:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.history

    def _truncate_log(self) -> None:
        """On resume, the log keeps only the steps the checkpoint had done."""
        if not os.path.isfile(self.log_path):
            return
        with open(self.log_path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        if self.step == 0:
            keep = []  # a fresh run in a used directory starts a fresh log
        with open(self.log_path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> str:
        """Write ``checkpoints/step-N`` atomically (a temporary directory renamed into place), then
        drop the oldest beyond ``keep_last``. ZeRO's partitioned optimizer state is consolidated
        on rank 0 first, so a checkpoint resumes on any number of ranks."""
        from safetensors.torch import save_file

        if self.dist:
            self.opt.consolidate_state_dict(to=0)
        path = os.path.join(self.checkpoint_dir(), f"{CKPT_PREFIX}{self.step:06d}")
        if self.rank == 0:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_file(self.trainable_state(), os.path.join(tmp, "trainable.safetensors"))
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                       os.path.join(tmp, "optimizer.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "tokens_seen": self.tokens_seen,
                           "fingerprint": self.cfg.fingerprint(self.world)}, f, indent=1)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
            for old in list_checkpoints(self.checkpoint_dir())[:-self.cfg.keep_last]:
                shutil.rmtree(old)
        if self.dist:
            import torch.distributed as dist

            dist.barrier()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint; ValueError (the checkpoint untouched) when it belongs to another run."""
        from safetensors.torch import load_file

        state_file = os.path.join(path, "trainer_state.json")
        if not os.path.isfile(state_file):
            raise ValueError(f"{path!r} is not a pagedlm training checkpoint (no trainer_state.json)")
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        ours, theirs = self.cfg.fingerprint(self.world), state["fingerprint"]
        for k in sorted(set(ours) | set(theirs)):
            if ours.get(k) != theirs.get(k):
                raise ValueError(f"cannot resume from {path!r}: it was trained with {k}={theirs.get(k)!r}, "
                                 f"this run has {k}={ours.get(k)!r}")
        if state["step"] > self.cfg.steps:
            raise ValueError(f"cannot resume from {path!r}: it is at step {state['step']}, past steps={self.cfg.steps}")
        tensors = load_file(os.path.join(path, "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
        self.opt.load_state_dict(opt["optimizer"])
        self.sched.load_state_dict(opt["scheduler"])
        torch.set_rng_state(opt["torch_rng"])
        random.setstate(_as_tuple(opt["python_rng"]))
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints (not ``.tmp``), oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.startswith(CKPT_PREFIX) and not n.endswith(".tmp"))
    return [os.path.join(directory, n) for n in names]


def plot_losses(history: list[dict], path: str, title: str = "") -> None:
    """Train loss per step and eval loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [h for h in history if "loss" in h]
    ax.plot([h["step"] for h in tr], [h["loss"] for h in tr], label="train", lw=1)
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
