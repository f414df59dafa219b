"""``inspect --plot``: memory breakdown per device and KV cache growth with sequence length."""

from __future__ import annotations

from pagedlm.analysis.dtypes import dtype_bytes
from pagedlm.analysis.memory import kv_cache_bytes
from pagedlm.config import ModelConfig


def plot_report(cfg: ModelConfig, report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    mem, opt = report["memory"], report["options"]
    gib = 2**30
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    worst = max(range(len(mem["weights_per_device"])),
                key=lambda i: mem["weights_per_device"][i] + mem["kv_bytes_batch_seq_per_device"][i])
    parts = {"weights": mem["weights_per_device"][worst],
             f"KV (batch {opt['batch']} x {opt['seq']})": mem["kv_bytes_batch_seq_per_device"][worst],
             "activations": mem["activation_peak"]["total"]}
    bottom = 0.0
    for label, v in parts.items():
        ax1.bar(["per device"], [v / gib], bottom=[bottom / gib], label=f"{label}: {v / gib:.2f} GiB")
        bottom += v
    ax1.axhline(mem["device_memory"] / gib, color="k", linestyle="--", label="device memory")
    ax1.set_ylabel("GiB")
    ax1.set_title(f"Memory per device ({opt['dtype']}, tp {opt['tp']} pp {opt['pp']} ep {opt['ep']})")
    ax1.legend(fontsize=8)
    kb = dtype_bytes(opt["kv_dtype"])
    top = max(opt["seq"] * 2, 1024)
    xs = [int(top * k / 64) or 1 for k in range(65)]
    for batch in sorted({1, opt["batch"]}):
        ax2.plot(xs, [kv_cache_bytes(cfg, batch, x, kb) / gib for x in xs], label=f"batch {batch}")
    ax2.set_xlabel("sequence length (tokens)")
    ax2.set_ylabel("KV cache, GiB (all devices)")
    ax2.set_title(f"KV cache growth ({opt['kv_dtype']})")
    ax2.legend(fontsize=8)
    fig.suptitle(report["source"] or cfg.architecture)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
