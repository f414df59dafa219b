"""Multi-node launch under torchrun: ``torchrun --nnodes N --nproc-per-node M ... -m pagedlm serve``.

Every process torchrun starts runs the same command. Rank 0 owns the scheduler, the tokenizer
and the HTTP server, and also runs its own model shard (``TorchrunModelRunner``); the other
ranks run ``run_worker``: a loop that receives each step's packed inputs from rank 0 and runs
their shard. Default layout: TP across the GPUs / processes of a node (``--nproc-per-node``),
PP across nodes, since TP talks every layer and PP once per stage.

Two process groups: the default one (NCCL on CUDA, gloo on CPU) carries activations (TP
collectives, PP send / recv); a gloo group carries the control objects (each step's inputs,
broadcast from rank 0) and the logits back to rank 0 from the last stage's TP rank 0.

Liveness: every rank bumps a counter in the rendezvous store twice a second (``Heartbeat``).
Rank 0 blames a rank whose counter stopped (or whose failure note is in the store) when a
collective fails, and notices a silent one within ``DEAD_AFTER_S`` while idle; the engine then
ends every request with an error naming the rank. Workers exit when rank 0's counter stops,
the store goes away, or their parent (the torchrun agent) dies: no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedlm.distributed.launch import TorchrunEnv
from pagedlm.distributed.layout import ParallelLayout
from pagedlm.distributed.runner import DistributedModelRunner
from pagedlm.distributed.worker import StageExecutor, init_distributed
from pagedlm.engine.model_runner import ModelRunner
from pagedlm.errors import WorkerError
from pagedlm.model.layers.matmul import split_dtype

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
DEAD_AFTER_S = 5.0  # rank 0: a worker silent this long is dead
ORPHAN_AFTER_S = 15.0  # a worker: rank 0 silent this long is gone, exit
CONTROL_TIMEOUT = timedelta(days=30)  # workers wait on the control group while the server idles


# ---- liveness ------------------------------------------------------------------------------
class Heartbeat:
    """Bumps this rank's counter in the store and watches other ranks' counters."""

    def __init__(self, env: TorchrunEnv, watch: list[int], on_dead, dead_after_s: float):
        # A connection of its own: the heartbeat thread never waits behind the main thread.
        client = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=30))
        self.store = dist.PrefixStore("pagedlm/liveness", client)
        self.rank, self.watch, self.on_dead, self.dead_after_s = env.rank, list(watch), on_dead, dead_after_s
        self.parent = os.getppid()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pagedlm-heartbeat", daemon=True)
        self.thread.start()

    def counters(self, ranks) -> dict[int, int]:
        return {r: int(self.store.add(f"hb/{r}", 0)) for r in ranks}

    def failure_note(self, rank: int) -> str | None:
        key = f"failed/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def note_failure(self, message: str) -> None:
        try:
            self.store.set(f"failed/{self.rank}", message)
        except Exception:  # noqa: BLE001 - the store is gone too; rank 0 will see the silence
            pass

    def _run(self) -> None:
        last: dict[int, tuple[int, float]] = {}
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                now = time.monotonic()
                for r, v in self.counters(self.watch).items():
                    if r not in last or last[r][0] != v:
                        last[r] = (v, now)
                    elif now - last[r][1] > self.dead_after_s:
                        self.watch.remove(r)
                        self.on_dead(r, f"stopped answering (no heartbeat for {now - last[r][1]:.1f} s)")
            except Exception as e:  # noqa: BLE001 - the store (hosted with rank 0) is gone
                self.on_dead(0, f"the rendezvous store is unreachable ({type(e).__name__})")
                return
            if os.getppid() != self.parent:
                self.on_dead(-1, "the torchrun agent (parent process) is gone")
                return

    def stop(self) -> None:
        self.stopped.set()


# ---- one rank's model shard ----------------------------------------------------------------
class RankNode:
    """This process's part: process groups, the model shard, the stage executor."""

    def __init__(self, env: TorchrunEnv, layout, model_path: str, cfg, dtype, device: str, quantization: str,
                 timeout_s: float):
        self.env, self.layout = env, layout
        backend = "gloo"
        if device.startswith("cuda"):
            device = f"cuda:{env.local_rank}"
            torch.cuda.set_device(device)
            backend = "nccl"
        # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT, or else rank 0 does (as
        # torch.distributed's own env:// rendezvous decides).
        host = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=host,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        self.store = store
        store = dist.PrefixStore(f"pagedlm/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        self.state = init_distributed(env.rank, layout, store, backend, timeout_s)
        # Control objects go over gloo even on CUDA (pickled objects live in host memory).
        self.ctrl = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.runner = ModelRunner(model_path, cfg, dtype, device, quantization=quantization, parallel=self.state,
                                  **layout.stage_kwargs(cfg, self.state.pp_rank))
        self.executor = StageExecutor(self.runner, layout, self.state, cfg)
        mine = torch.tensor([self.runner.kv_bytes_per_token()], dtype=torch.long)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.ctrl)  # the cache budget is per rank
        self.kv_bytes_per_token = int(mine.item())

    def broadcast(self, obj=None):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]


class TorchrunModelRunner(DistributedModelRunner):
    """Rank 0's ModelRunner over the torchrun ranks: DistributedModelRunner's packing (``prepare``,
    EP groups included), its own transport (broadcast over the control group instead of pipes),
    and rank 0's own shard run in-process."""

    def __init__(self, model_path: str, cfg, dtype, device: str, layout: ParallelLayout, env: TorchrunEnv,
                 quantization: str = "none", timeout_s: float = 120.0):
        layout.validate(cfg)  # not DistributedModelRunner.__init__: it would spawn ranks
        self.cfg, self.model_dtype, self.layout, self.env = cfg, dtype, layout, env
        self.weight_dtype, self.compute_dtype = split_dtype(dtype, device)
        self.device = torch.device("cpu")  # where batches are packed
        self.block_size = 0
        self.kv_caches = []
        self.timeout_s = timeout_s
        self.supports_prefix_caching = layout.ep == 1
        self.failure = None  # a WorkerError once a rank is known dead
        self.node = RankNode(env, layout, model_path, cfg, dtype, device, quantization, timeout_s)
        self._kv_per_token = self.node.kv_bytes_per_token
        self.heartbeat = Heartbeat(env, list(range(1, env.world_size)), self._on_dead, DEAD_AFTER_S)
        self.alive = True
        self._status = {"broken": False}  # shared with the finalizer (which must not hold self)
        self._finalizer = weakref.finalize(self, _stop_ranks, self.node, self.heartbeat, self._status)
        log.info("torchrun: rank 0 of %d (tp=%d pp=%d ep=%d)", env.world_size, layout.tp, layout.pp, layout.ep)

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    def _on_dead(self, rank: int, message: str) -> None:
        if self.failure is None and rank > 0:
            self.failure = WorkerError(rank, message)
            log.error("%s", self.failure)

    def _blame(self, error: BaseException):
        """The WorkerError for a failed step: a rank that left a note, else one whose heartbeat
        stopped (counters watched for a few beats), else rank 0 itself."""
        if self.failure is not None:
            return self.failure
        hb, ranks = self.heartbeat, range(1, self.env.world_size)
        try:
            for r in ranks:
                note = hb.failure_note(r)
                if note:
                    return WorkerError(r, f"failed: {note}")
            before = hb.counters(ranks)
            time.sleep(4 * HEARTBEAT_S)
            after = hb.counters(ranks)
            dead = [r for r in ranks if after[r] == before[r]]
        except Exception:  # noqa: BLE001
            dead = []
        if dead:
            return WorkerError(dead[0], f"died (no heartbeat; the step failed with {type(error).__name__}: {error})")
        return WorkerError(0, f"failed in a step: {type(error).__name__}: {error}")

    def _call(self, cmd: str, arg=None):
        if self.failure is not None:
            raise self.failure
        if not self.alive:
            raise RuntimeError("the torchrun model runner is shut down")
        self.node.broadcast((cmd, arg))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._guarded(lambda: (self._call("kv_cache", (num_blocks, block_size)),
                               self.node.runner.allocate_kv_cache(num_blocks, block_size)))

    def clear_blocks(self, block_ids: list[int]) -> None:
        if block_ids:
            self._guarded(lambda: (self._call("clear_blocks", list(block_ids)),
                                   self.node.runner.clear_blocks(block_ids)))

    def execute(self, inputs):
        return self._guarded(lambda: self._execute(inputs))

    def _guarded(self, fn):
        try:
            return fn()
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001 - the group is broken: no rank can go on
            self._status["broken"] = True
            self.failure = self._blame(e)
            raise self.failure from e

    def _execute(self, inputs):
        self._call("step", inputs.parts)
        local = self.node.executor.step(inputs.parts)
        outs = []
        for e, r in enumerate(self.layout.output_ranks()):
            rows = len(inputs.parts[e][3])
            if not rows:
                continue
            if r == 0:
                outs.append(local)
            else:
                t = torch.empty(rows, self.cfg.vocab_size, dtype=torch.float32)
                dist.recv(t, src=r, group=self.node.ctrl)
                outs.append(t)
        if not inputs.logit_rows:
            return None
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def collective_stats(self):
        raise NotImplementedError("collective counters are reported by spawned ranks only")

    reset_collective_stats = collective_stats

    def shutdown(self) -> None:
        self.alive = False
        self._finalizer()


def _stop_ranks(node: RankNode, heartbeat: Heartbeat, status: dict) -> None:
    """Tell the workers to exit (they also exit by themselves once rank 0 goes silent). After a
    failure the group is broken: no broadcast (it could wait on a hung rank)."""
    heartbeat.stop()
    if not status["broken"]:
        try:
            node.broadcast(("stop", None))
        except Exception:  # noqa: BLE001 - a rank died: the others notice rank 0's silence
            pass
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


# ---- the other ranks -----------------------------------------------------------------------
def run_worker(engine_kwargs: dict, env: TorchrunEnv) -> int:
    """Ranks 1..N-1: build this rank's shard, then run every step rank 0 broadcasts."""
    from pagedlm.engine.engine import EngineConfig
    from pagedlm.loader.source import ModelSource
    from pagedlm.model.registry import resolve_dtype

    # The drain is rank 0's: a worker leaves when rank 0 says stop (or goes silent).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = EngineConfig(**engine_kwargs)
    # Opened once in this rank: the config here and the weights in RankNode's ModelRunner come
    # from the same reader (ModelSource.open hands back this source for the same file).
    source = ModelSource.open(config.model)
    weights, cfg = source.weights_path, source.config
    layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size, config.expert_parallel_size)
    layout.validate(cfg)
    timeout_s = config.extra.get("distributed", {}).get("timeout_s", 120.0)
    dtype = resolve_dtype(config.dtype, config.device)
    node = RankNode(env, layout, weights, cfg, dtype, config.device, config.quantization, timeout_s)

    def orphaned(rank: int, message: str) -> None:
        log.error("rank %d: %s; exiting", env.rank, message if rank != 0 else f"rank 0 {message}")
        os._exit(1)

    heartbeat = Heartbeat(env, [0], orphaned, ORPHAN_AFTER_S)
    output = env.rank in layout.output_ranks()
    try:
        while True:
            cmd, arg = node.broadcast()
            if cmd == "stop":
                break
            if cmd == "kv_cache":
                node.runner.allocate_kv_cache(*arg)
            elif cmd == "clear_blocks":
                node.runner.clear_blocks(arg)
            elif cmd == "step":
                logits = node.executor.step(arg)
                if output and logits is not None:
                    dist.send(logits.contiguous(), dst=0, group=node.ctrl)
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception as e:  # noqa: BLE001 - leave a note naming the cause, then exit non-zero
        heartbeat.note_failure(f"{type(e).__name__}: {e}")
        log.error("rank %d failed:\n%s", env.rank, traceback.format_exc())
        os._exit(1)
    heartbeat.stop()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0
