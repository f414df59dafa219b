"""DistributedModelRunner: the ModelRunner interface over spawned model ranks.

The engine process keeps the scheduler, the block manager and sampling. Each step it packs the
batch exactly as the single-process ``ModelRunner`` does and sends it to every rank over a pipe
(the step's "broadcast"); TP rank 0 of the last stage of each EP replica sends the logits back.
The ranks themselves talk through torch.distributed (gloo on CPU, NCCL on CUDA).

Faults never hang the engine: every wait polls the ranks' process sentinels, so a rank that dies
(or fails while loading) raises ``WorkerError`` naming it within a poll interval, and the other
ranks are stopped. Collectives carry the process group's timeout as a second line of defence.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from datetime import timedelta
from multiprocessing.connection import wait

import torch

from pagedlm.config import ModelConfig
from pagedlm.distributed.layout import ParallelLayout
from pagedlm.engine.model_runner import ModelRunner, StepInputs
from pagedlm.engine.scheduler import SchedulerOutput
from pagedlm.errors import WorkerError

__all__ = ["DistributedModelRunner", "WorkerError"]

log = logging.getLogger(__name__)


class _Workers:
    """The spawned processes and their pipes; owned through a weakref.finalize so they go away
    with the runner."""

    def __init__(self, procs, conns):
        self.procs, self.conns = procs, conns
        self.alive = True

    def stop(self, graceful: bool = True) -> None:
        if not self.alive:
            return
        self.alive = False
        if graceful:
            for c in self.conns:
                try:
                    c.send(("stop", None))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for c in self.conns:
            c.close()


class DistributedModelRunner(ModelRunner):
    """``ModelRunnerBase`` over spawned ranks (it reuses ``ModelRunner.prepare`` to pack batches)."""

    poll_interval = 0.2

    def __init__(self, model_path: str, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                 layout: ParallelLayout | None = None, master_addr: str = "127.0.0.1", master_port: int = 0,
                 timeout_s: float = 300.0, start_timeout_s: float = 600.0):
        layout = layout or ParallelLayout()
        layout.validate(cfg)  # before any process starts
        if device.startswith("cuda") and torch.cuda.device_count() < 1:
            raise ValueError(f"device {device!r} asked for, but no CUDA device is visible")
        from pagedlm.model.layers.matmul import split_dtype

        self.cfg, self.model_dtype, self.layout = cfg, dtype, layout  # model_dtype: what each rank builds
        self.weight_dtype, self.compute_dtype = split_dtype(dtype, device)  # as each rank's ModelRunner
        self.device = torch.device("cpu")  # where batches are packed; ranks move them to their device
        self.block_size = 0
        self.kv_caches = []
        self.timeout_s = timeout_s
        # EP replicas hold different sequences, each with its own KV cache: a cached prefix
        # computed on one replica is not on another, so prefix caching is off under EP.
        self.supports_prefix_caching = layout.ep == 1
        self._workers = self._spawn(model_path, device, master_addr, master_port, start_timeout_s)
        self._finalizer = weakref.finalize(self, self._workers.stop)

    # ---- processes -----------------------------------------------------------------------
    def _spawn(self, model_path, device, master_addr, master_port, start_timeout_s) -> _Workers:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        from pagedlm.distributed.worker import worker_main

        world = self.layout.world_size
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # The engine hosts the rendezvous store; port 0 picks a free one, so several engines can
        # share a host.
        self._store = dist.TCPStore(master_addr, master_port, world_size=world + 1, is_master=True,
                                    wait_for_workers=False, timeout=timedelta(seconds=self.timeout_s))
        port = self._store.port
        threads = max(1, (os.cpu_count() or 1) // world)
        # A fork server with torch and pagedlm preloaded starts ranks in a fraction of a second
        # (spawn re-imports torch in each); it is as safe as spawn, since the server itself is a
        # fresh single-threaded process. Platforms without it fall back to spawn.
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "torch.distributed", "pagedlm.distributed.worker",
                                        "pagedlm.engine.model_runner"])
        else:
            ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, name=f"pagedlm-rank{rank}", daemon=True,
                            args=(rank, self.layout, master_addr, port, backend, model_path, self.cfg, self.model_dtype,
                                  device, child, self.timeout_s, threads))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        workers = _Workers(procs, conns)
        self._workers = workers
        try:
            ready = self._gather(range(world), start_timeout_s, "during start-up")
        except BaseException:
            workers.stop(graceful=False)
            raise
        self._kv_per_token = max(ready.values())
        log.info("started %d ranks (tp=%d pp=%d ep=%d, %s)", world, self.layout.tp, self.layout.pp, self.layout.ep,
                 backend)
        return workers

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._workers.procs]

    def _gather(self, ranks, timeout_s: float, what: str) -> dict[int, object]:
        """Wait for one reply from each of ``ranks``; raise WorkerError on a dead or failing rank."""
        w = self._workers
        pending = set(ranks)
        replies: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        by_handle = {}
        for r in pending:
            by_handle[w.conns[r]] = r
            by_handle[w.procs[r].sentinel] = r
        while pending:
            handles = [w.conns[r] for r in pending] + [w.procs[r].sentinel for r in pending]
            ready = wait(handles, timeout=min(self.poll_interval, max(0.0, deadline - time.monotonic())))
            for h in ready:
                r = by_handle[h]
                if r not in pending:
                    continue
                conn = w.conns[r]
                if h is conn or conn.poll():
                    try:
                        status, payload = conn.recv()
                    except (EOFError, OSError):
                        self._fail(r, f"died {what} (exit code {self._exitcode(r)})")
                    if status == "error":
                        self._fail_error(r, payload, what)
                    replies[r] = payload
                    pending.discard(r)
                else:
                    self._fail(r, f"died {what} (exit code {self._exitcode(r)})")
            if pending and time.monotonic() > deadline:
                self._fail(min(pending), f"did not answer within {timeout_s:.0f} s {what}")
        return replies

    def _exitcode(self, rank: int):
        p = self._workers.procs[rank]
        p.join(1.0)
        return p.exitcode

    def _fail(self, rank: int, message: str):
        self._workers.stop(graceful=False)
        raise WorkerError(rank, message)

    def _fail_error(self, rank: int, tb: str, what: str):
        # A rank whose peer died fails in its next collective; blame the dead peer if there is one.
        time.sleep(0.5)
        for r, p in enumerate(self._workers.procs):
            if r != rank and not p.is_alive() and p.exitcode not in (0, 1):
                self._fail(r, f"died {what} (exit code {p.exitcode}); rank {rank} then failed: "
                              f"{tb.strip().splitlines()[-1]}")
        last = tb.strip().splitlines()[-1] if tb.strip() else "unknown error"
        self._workers.stop(graceful=False)
        err = WorkerError(rank, f"failed {what}: {last}")
        err.remote_traceback = tb
        raise err

    def _call(self, cmd: str, arg=None, timeout_s: float | None = None) -> dict[int, object]:
        if not self._workers.alive:
            raise RuntimeError("the distributed model runner is shut down (a rank failed or shutdown() was called)")
        for r, c in enumerate(self._workers.conns):
            try:
                c.send((cmd, arg))
            except (BrokenPipeError, OSError):
                self._fail(r, f"died (exit code {self._exitcode(r)})")
        return self._gather(range(self.layout.world_size), timeout_s or self.timeout_s, f"in {cmd!r}")

    def shutdown(self) -> None:
        self._finalizer()

    # ---- ModelRunner interface -------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token on the busiest rank (the cache budget is per rank)."""
        return self._kv_per_token

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._call("kv_cache", (num_blocks, block_size))

    def clear_blocks(self, block_ids: list[int]) -> None:
        if block_ids:
            self._call("clear_blocks", list(block_ids))

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        ep = self.layout.ep
        if ep == 1:
            inputs = super().prepare(out)
            inputs.parts = [_wire(inputs)]
            return inputs
        # EP: each sequence stays on one replica (its KV lives there); new ones go to the replica
        # with the fewest tokens this step.
        groups: list[list] = [[] for _ in range(ep)]
        load = [0] * ep
        for seq, n in out.scheduled:
            r = seq.ep_rank
            if r is None or seq.num_computed_tokens == 0:
                r = seq.ep_rank = min(range(ep), key=load.__getitem__)
            groups[r].append((seq, n))
            load[r] += n
        subs = [super(DistributedModelRunner, self).prepare(SchedulerOutput(scheduled=g)) for g in groups]
        logit_rows, samples, prompt_rows, off = [], [], [], 0
        for s in subs:
            samples += [(seq, i + off) for seq, i in s.samples]
            prompt_rows += [(seq, first + off, n, start) for seq, first, n, start in s.prompt_rows]
            logit_rows += [off + i for i in range(len(s.logit_rows))]
            off += len(s.logit_rows)
        merged = StepInputs(torch.cat([s.input_ids for s in subs]), torch.cat([s.positions for s in subs]),
                            subs[0].meta, logit_rows, samples, prompt_rows)
        merged.parts = [_wire(s) for s in subs]
        return merged

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        replies = self._call("step", inputs.parts)
        outs = [replies[r] for r in self.layout.output_ranks()]
        outs = [o for o in outs if o is not None]
        if not inputs.logit_rows:
            return None
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # ---- counters --------------------------------------------------------------------------
    def collective_stats(self) -> dict[int, dict]:
        """Per rank: ``{kind: {"calls", "bytes", "seconds"}}`` since the last reset."""
        return {r: v["counters"] for r, v in self._call("stats").items()}

    def reset_collective_stats(self) -> None:
        self._call("reset_stats")


def _wire(inputs: StepInputs):
    """What a rank needs of a step (no Sequence objects): ids, positions, metadata, logit rows."""
    return inputs.input_ids, inputs.positions, inputs.meta, inputs.logit_rows
