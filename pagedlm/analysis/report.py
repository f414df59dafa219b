"""Everything ``pagedlm inspect`` reports, as one dict (``--json``) and as plain text tables."""

from __future__ import annotations

from dataclasses import dataclass

from pagedlm.analysis import flops as fl
from pagedlm.analysis.comm import collectives_per_step
from pagedlm.analysis.dtypes import WEIGHT_TABLE_DTYPES, canonical, dtype_bytes
from pagedlm.analysis.hardware import Hardware
from pagedlm.analysis.layout import stage_layers, validate_layout
from pagedlm.analysis.memory import (
    activation_peak_bytes,
    kv_bytes_per_token_layer,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    max_seq_in_budget,
    weights_per_stage,
)
from pagedlm.analysis.params import count_parameters
from pagedlm.analysis.roofline import decode_roofline, max_memory_bound_batch, prefill_roofline
from pagedlm.config import ModelConfig


@dataclass(frozen=True)
class Options:
    dtype: str = "bf16"
    kv_dtype: str | None = None
    batch: int = 1
    seq: int = 2048
    chunk: int | None = None  # prefill chunk for the activation estimate; default min(seq, 2048)
    tp: int = 1
    pp: int = 1
    ep: int = 1
    gpus: int | None = None


def build_report(cfg: ModelConfig, hw: Hardware, opt: Options, source: str = "") -> dict:
    for name in ("batch", "seq"):
        v = getattr(opt, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v!r}")
    validate_layout(cfg, opt.tp, opt.pp, opt.ep)
    per_replica = opt.tp * opt.pp * opt.ep
    gpus = opt.gpus if opt.gpus is not None else per_replica
    if gpus < 1 or gpus % per_replica:
        raise ValueError(f"--gpus {gpus} is not a multiple of tp*pp*ep = {per_replica}")
    wb = dtype_bytes(opt.dtype)
    kv_dtype = opt.kv_dtype or opt.dtype
    kb = dtype_bytes(kv_dtype)
    b, s = opt.batch, opt.seq
    chunk = opt.chunk or min(s, 2048)
    p = count_parameters(cfg)
    devices = opt.tp * opt.ep

    # ---- parameters -------------------------------------------------------------------
    groups = []  # consecutive identical layers, shown once
    for la in p.layers:
        if groups and groups[-1]["key"] == (la.kind, la.shape_key()):
            groups[-1]["last"] = la.index
        else:
            groups.append({"key": (la.kind, la.shape_key()), "first": la.index, "last": la.index,
                           "kind": la.kind, "attention": la.attention, "mlp": la.mlp, "experts": la.experts,
                           "shared_experts": la.shared_experts, "router": la.router, "norms": la.norms,
                           "total": la.total, "active": la.active})
    for g in groups:
        del g["key"]

    # ---- memory -----------------------------------------------------------------------
    stages = weights_per_stage(cfg, wb, opt.tp, opt.pp, opt.ep, p)
    stage_ranges = stage_layers(cfg.num_hidden_layers, opt.pp)
    kv_tok_dev = [sum(kv_bytes_per_token_layer(cfg, i, kb, opt.tp) for i in r) for r in stage_ranges]
    kv_batch_dev = [kv_cache_bytes(cfg, b, s, kb, r, opt.tp) for r in stage_ranges]
    act = activation_peak_bytes(cfg, chunk, wb, opt.tp, num_sampled=b)
    worst = max(range(opt.pp), key=lambda i: stages[i] + kv_batch_dev[i])
    budget = hw.memory_bytes - stages[worst] - act["total"]
    # Tokens that fit: scale the model-wide KV by the worst stage's share of it (per device).
    share = kv_tok_dev[worst] / kv_cache_bytes_per_token(cfg, kb)
    fit_one = max_seq_in_budget(cfg, budget / share, kb, 1) if budget > 0 else 0
    fit_batch = max_seq_in_budget(cfg, budget / share, kb, b) if budget > 0 else 0
    memory = {
        "weights": {d: p.total * dtype_bytes(d) for d in dict.fromkeys((*WEIGHT_TABLE_DTYPES, canonical(opt.dtype)))},
        "weights_per_device": stages,
        "kv_dtype": canonical(kv_dtype),
        "kv_bytes_per_token": kv_cache_bytes_per_token(cfg, kb),
        "kv_bytes_per_token_per_device": kv_tok_dev,
        "kv_bytes_batch_seq": kv_cache_bytes(cfg, b, s, kb),
        "kv_bytes_batch_seq_per_device": kv_batch_dev,
        "sliding_window": cfg.sliding_window,
        "sliding_layers": sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)),
        "activation_chunk_tokens": chunk,
        "activation_peak": act,
        "device_memory": hw.memory_bytes,
        "kv_budget_per_device": max(budget, 0.0),
        "max_seq_single_sequence": fit_one,
        "max_seq_at_batch": fit_batch,
        "total_per_device": stages[worst] + kv_batch_dev[worst] + act["total"],
        "fits": stages[worst] + kv_batch_dev[worst] + act["total"] <= hw.memory_bytes,
    }

    # ---- FLOPs and roofline ---------------------------------------------------------------
    pre = fl.prefill_flops(cfg, b, s)
    dec = fl.decode_flops(cfg, s)
    exact_train = fl.training_forward_flops_exact(cfg, b, s)
    flops = {
        "prefill": pre.to_dict(),
        "decode_per_token": dec.to_dict(),
        "per_token_2N": 2 * fl.matmul_weights_per_token(cfg) + 2 * cfg.hidden_size * cfg.vocab_size,
        "training_forward_exact": exact_train.to_dict(),
        "training_forward_seeds_formula": fl.seeds_training_forward_flops(cfg, b, s),
        "seeds_softmax_term": fl.seeds_softmax_flops(cfg, b, s),
    }
    roof = {
        "hardware": {"name": hw.name, "peak_flops": hw.peak_flops, "bandwidth": hw.bandwidth,
                     "memory_bytes": hw.memory_bytes, "ridge_flops_per_byte": hw.ridge},
        "devices_per_step": devices,
        "prefill": prefill_roofline(cfg, hw, b, s, wb, kb, devices, p),
        "decode_batch1": decode_roofline(cfg, hw, 1, s, wb, kb, devices, p),
        "decode": decode_roofline(cfg, hw, b, s, wb, kb, devices, p),
        "max_memory_bound_batch": max_memory_bound_batch(cfg, hw, s, wb, kb, devices, p),
    }

    # ---- communication (one decode step of the batch, and one prefill step) ---------------
    comm_decode = collectives_per_step(cfg, opt.tp, opt.pp, opt.ep, num_tokens=b, dtype_bytes=int(max(wb, 1)),
                                       num_sampled=b)
    comm_prefill = collectives_per_step(cfg, opt.tp, opt.pp, opt.ep, num_tokens=b * s,
                                        dtype_bytes=int(max(wb, 1)), num_sampled=b)
    return {
        "source": source,
        "model": {"architecture": cfg.architecture, "family": cfg.family, "runnable": cfg.runnable,
                  "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "intermediate_size": cfg.intermediate_size, "experts": cfg.num_experts,
                  "experts_per_token": cfg.num_experts_per_tok,
                  "max_position_embeddings": cfg.max_position_embeddings},
        "options": {"dtype": canonical(opt.dtype), "kv_dtype": canonical(kv_dtype), "batch": b, "seq": s,
                    "tp": opt.tp, "pp": opt.pp, "ep": opt.ep, "gpus": gpus,
                    "replicas": gpus // per_replica},
        "parameters": {**p.to_dict(), "layer_groups": groups},
        "memory": memory,
        "flops": flops,
        "roofline": roof,
        "communication": {"decode_step": comm_decode.to_dict(), "prefill_step": comm_prefill.to_dict()},
        "warnings": ([f"--seq {s} exceeds max_position_embeddings ({cfg.max_position_embeddings})"]
                     if s > cfg.max_position_embeddings else []),
    }


# ---- text -------------------------------------------------------------------------------------
def _n(x: float) -> str:
    return f"{int(round(x)):,}"


def _si(x: float, unit: str = "") -> str:
    for k, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= k:
            return f"{x / k:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(x: float) -> str:
    for k, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= k:
            return f"{x / k:.2f} {suffix}"
    return f"{x:.0f} B"


def _secs(x: float) -> str:
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _table(rows: list[tuple[str, ...]], title: str) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title, "-" * len(title)]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_report(r: dict) -> str:
    m, o, pa, mem = r["model"], r["options"], r["parameters"], r["memory"]
    out = [f"{r['source'] or m['architecture']}: {m['architecture']} ({m['family']}"
           f"{'' if m['runnable'] else ', analysis only'}), {m['layers']} layers, hidden {m['hidden_size']}, "
           f"heads {m['heads']}/{m['kv_heads']} kv, head_dim {m['head_dim']}, vocab {m['vocab_size']:,}"
           + (f", {m['experts']} experts top-{m['experts_per_token']}" if m["experts"] else ""),
           f"options: dtype {o['dtype']}, kv {o['kv_dtype']}, batch {o['batch']}, seq {o['seq']}, "
           f"tp {o['tp']} pp {o['pp']} ep {o['ep']}, gpus {o['gpus']}", ""]
    total = pa["total"]
    rows = [("component", "parameters", "share")]
    for k, v in pa["breakdown"].items():
        if v or k in ("embedding", "attention", "lm_head"):
            label = k + (" (tied to embedding)" if k == "lm_head" and pa["tied_embeddings"] else "")
            rows.append((label, _n(v), f"{100 * v / total:.2f}%"))
    rows.append(("total", _n(total), "100%"))
    if pa["active"] != total:
        rows.append(("active per token", _n(pa["active"]), f"{100 * pa['active'] / total:.2f}%"))
    rows.append(("non-embedding", _n(pa["non_embedding"]), f"{100 * pa['non_embedding'] / total:.2f}%"))
    out += [_table(rows, "Parameters"), ""]
    rows = [("layers", "kind", "attention", "mlp", "experts", "shared", "router", "norms", "per layer", "active")]
    for g in pa["layer_groups"]:
        span = f"{g['first']}" if g["first"] == g["last"] else f"{g['first']}-{g['last']}"
        rows.append((span, g["kind"], _n(g["attention"]), _n(g["mlp"]), _n(g["experts"]),
                     _n(g["shared_experts"]), _n(g["router"]), _n(g["norms"]), _n(g["total"]), _n(g["active"])))
    out += [_table(rows, "Per layer"), ""]

    rows = [("item", "bytes", "")]
    for d, v in mem["weights"].items():
        rows.append((f"weights at {d}", _n(v), _bytes(v)))
    for i, v in enumerate(mem["weights_per_device"]):
        rows.append((f"weights per device, stage {i}", _n(v), _bytes(v)))
    rows.append((f"KV per token ({mem['kv_dtype']}, all layers)", _n(mem["kv_bytes_per_token"]),
                 _bytes(mem["kv_bytes_per_token"])))
    if o["tp"] > 1 or o["pp"] > 1:
        rows.append(("KV per token per device", _n(max(mem["kv_bytes_per_token_per_device"])),
                     _bytes(max(mem["kv_bytes_per_token_per_device"]))))
    rows.append((f"KV for batch {o['batch']} x seq {o['seq']}", _n(mem["kv_bytes_batch_seq"]),
                 _bytes(mem["kv_bytes_batch_seq"])))
    if mem["sliding_layers"]:
        rows.append((f"  ({mem['sliding_layers']} sliding layers hold <= {mem['sliding_window']} tokens)", "", ""))
    rows.append((f"activation peak, {mem['activation_chunk_tokens']}-token chunk",
                 _n(mem["activation_peak"]["total"]), _bytes(mem["activation_peak"]["total"])))
    rows.append(("device memory", _n(mem["device_memory"]), _bytes(mem["device_memory"])))
    rows.append(("left for KV per device", _n(mem["kv_budget_per_device"]), _bytes(mem["kv_budget_per_device"])))
    for label, v in (("max tokens, one sequence", mem["max_seq_single_sequence"]),
                     (f"max seq at batch {o['batch']}", mem["max_seq_at_batch"])):
        rows.append((label, "unbounded" if v is None else _n(v), ""))
    rows.append(("fits (weights + KV + activations)", "yes" if mem["fits"] else "NO", ""))
    out += [_table(rows, "Memory"), ""]

    f = r["flops"]
    rows = [("FLOPs", "matmul", "attention", "total")]
    rows.append((f"prefill, batch {o['batch']} x {o['seq']} tokens", _si(f["prefill"]["matmul"]),
                 _si(f["prefill"]["attention"]), _si(f["prefill"]["total"])))
    rows.append((f"decode, per token at {o['seq']} keys", _si(f["decode_per_token"]["matmul"]),
                 _si(f["decode_per_token"]["attention"]), _si(f["decode_per_token"]["total"])))
    rows.append(("training forward (all logits, full s^2)", _si(f["training_forward_exact"]["matmul"]),
                 _si(f["training_forward_exact"]["attention"]), _si(f["training_forward_exact"]["total"])))
    rows.append(("  notes' formula (incl. 3bs^2n softmax)", "", "", _si(f["training_forward_seeds_formula"])))
    out += [_table(rows, "Compute"), "  (2 FLOPs per weight per token; attention = QK^T + PV, causal, "
            "windows and GQA exact)", ""]

    ro = r["roofline"]
    hw = ro["hardware"]
    rows = [("step", "FLOPs", "bytes", "FLOP/B", "bound", "time")]
    for label, k in ((f"prefill {o['batch']} x {o['seq']}", "prefill"), ("decode, batch 1", "decode_batch1"),
                     (f"decode, batch {o['batch']}", "decode")):
        x = ro[k]
        rows.append((label, _si(x["flops"]), _bytes(x["bytes"]), f"{x['intensity']:.1f}", x["bound"],
                     _secs(x["time_s"])))
    mb = ro["max_memory_bound_batch"]
    out += [_table(rows, f"Roofline on {ro['devices_per_step']} x {hw['name']} ({_si(hw['peak_flops'], 'FLOP/s')}, "
                   f"{_si(hw['bandwidth'], 'B/s')}, ridge {hw['ridge_flops_per_byte']:.0f} FLOP/B)"),
            f"  decode tokens/s at batch {o['batch']}: {ro['decode']['tokens_per_s']:.1f}; "
            f"decode stays memory-bound up to batch "
            f"{'(never compute-bound)' if mb is None else mb} at {o['seq']} keys", ""]

    for label, key in (("decode step", "decode_step"), ("prefill step", "prefill_step")):
        c = r["communication"][key]
        rows = [("collective", "group", "calls", "payload bytes", "sent/device", "formula")]
        for x in c["collectives"]:
            rows.append((f"{x['purpose']} [{x['kind']}]", x["group"], _n(x["calls"]), _n(x["payload_bytes"]),
                         _bytes(x["sent_bytes"]), x["formula"]))
        title = f"Communication, one {label} ({c['num_tokens']} tokens, tp {o['tp']} pp {o['pp']} ep {o['ep']})"
        if len(rows) == 1:
            out += [title, "-" * len(title), "  none (single device)", ""]
            continue
        out += [_table(rows, title),
                f"  sent per token per device (busiest stage): {_bytes(c['sent_bytes_per_token_per_device'])}", ""]
    out += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(out).rstrip() + "\n"
