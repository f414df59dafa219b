"""One model rank: joins the process group, builds its shard of the model, then serves commands
from the engine over a pipe (allocate the KV cache, run a step, report counters, stop).

The engine process (``DistributedModelRunner``) owns the scheduler and sends every rank the
same packed batch; ranks exchange activations only through ``pagedlm.distributed.comm``.
Any exception is sent back as ``("error", traceback)`` so the engine can name the rank.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedlm.distributed import comm
from pagedlm.distributed.layout import ParallelLayout
from pagedlm.distributed.state import ParallelState


def init_distributed(rank: int, layout: ParallelLayout, store, backend: str, timeout_s: float) -> ParallelState:
    """Join the default process group and create this layout's TP and EP groups (every rank
    creates every group, in the same order, as torch.distributed requires)."""
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=layout.world_size, timeout=timeout)
    pp_rank, ep_rank, tp_rank = layout.coords(rank)
    tp_group = ep_group = None
    for ranks in layout.tp_groups():
        g = dist.new_group(ranks, timeout=timeout) if layout.tp > 1 else None
        if rank in ranks:
            tp_group = g
    for ranks in layout.ep_groups():
        g = dist.new_group(ranks, timeout=timeout) if layout.ep > 1 else None
        if rank in ranks:
            ep_group = g
    state = ParallelState(tp_rank=tp_rank, tp_size=layout.tp, tp_group=tp_group, pp_rank=pp_rank, pp_size=layout.pp,
                          ep_rank=ep_rank, ep_size=layout.ep, ep_group=ep_group)
    return state


def _to_device(part, device: torch.device):
    input_ids, positions, meta, logit_rows = part
    if device.type == "cpu":
        return part
    meta.slot_mapping = meta.slot_mapping.to(device)
    if meta.decode_block_tables is not None:
        meta.decode_block_tables = meta.decode_block_tables.to(device)
        meta.decode_context_lens = meta.decode_context_lens.to(device)
    for seg in meta.prefills:
        seg.block_table = seg.block_table.to(device)
    return input_ids.to(device), positions.to(device), meta, logit_rows


class StageExecutor:
    """Runs this rank's part of one step: receive hidden states from the previous stage, run the
    stage's layers, send them on (or compute the logits on the last stage)."""

    def __init__(self, runner, layout: ParallelLayout, state: ParallelState, cfg):
        self.runner, self.layout, self.state, self.cfg = runner, layout, state, cfg
        self.rank = layout.rank_of(state.pp_rank, state.ep_rank, state.tp_rank)
        self.stride = layout.ep * layout.tp  # rank distance between neighbouring stages

    @torch.inference_mode()
    def step(self, parts) -> torch.Tensor | None:
        st, model, dev = self.state, self.runner.model, self.runner.device
        input_ids, positions, meta, logit_rows = _to_device(parts[st.ep_rank], dev)
        hidden = None
        if st.pp_rank > 0:
            hidden = torch.empty(len(input_ids), self.cfg.hidden_size, dtype=self.runner.compute_dtype, device=dev)
            comm.recv(hidden, self.rank - self.stride)
        hidden = model(input_ids, positions, meta, hidden=hidden)
        if st.pp_rank < st.pp_size - 1:
            comm.send(hidden, self.rank + self.stride)
            return None
        if not logit_rows:
            return None
        rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        logits = model.compute_logits(hidden[rows]).float()  # TP: all ranks join the gather
        return logits.cpu() if st.tp_rank == 0 else None


def worker_main(rank: int, layout: ParallelLayout, master_addr: str, master_port: int, backend: str,
                model_path: str, cfg, dtype: torch.dtype, device: str, conn, timeout_s: float, threads: int) -> None:
    """Entry point of a spawned rank."""
    from pagedlm.engine.model_runner import ModelRunner

    try:
        torch.set_num_threads(threads)
        if device.startswith("cuda"):
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=timeout_s))
        state = init_distributed(rank, layout, store, backend, timeout_s)
        runner = ModelRunner(model_path, cfg, dtype, device, parallel=state, **layout.stage_kwargs(cfg, state.pp_rank))
        executor = StageExecutor(runner, layout, state, cfg)
        conn.send(("ready", runner.kv_bytes_per_token()))
    except BaseException:
        _report(conn)
        return
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except EOFError:
                return  # the engine is gone
            if cmd == "stop":
                conn.send(("ok", None))
                return
            if cmd == "step":
                out = executor.step(arg)
            elif cmd == "kv_cache":
                runner.allocate_kv_cache(*arg)
                out = None
            elif cmd == "clear_blocks":
                runner.clear_blocks(arg)
                out = None
            elif cmd == "stats":
                out = {"rank": rank, "counters": comm.snapshot()}
            elif cmd == "reset_stats":
                comm.reset_counters()
                out = None
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", out))
    except BaseException:
        _report(conn)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group after a peer died; nothing to free
                pass


def _report(conn) -> None:
    try:
        conn.send(("error", traceback.format_exc()))
    except (BrokenPipeError, OSError):
        pass  # the engine is gone
    finally:
        os._exit(1)
