"""docs/tenth-session.png: the tenth session on a 2-core Sapphire Rapids Xeon (bf16): batch-1
decode against llama-bench with its share of the memory roofline per run, the first process
from an empty HOME per build, and a batch-1 token's int8 head and int4 matmuls before and after.

    python benchmarks/plot_tenth_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# docs/benchmarks.md, tenth session: bench_decode.py runs (label, ratio vs llama-bench, % of roofline)
DECODE = [("24c3439\n02:12", 1.57, 62), ("3393ac5\n02:26", 1.72, 72), ("9879a97\nrun 1", 1.88, 77),
          ("9879a97\nrun 2", 1.88, 71), ("96bcb80\nrun 1", 2.00, 80), ("96bcb80\nrun 2", 2.21, 85),
          ("96bcb80\nrun 3", 1.92, 69)]
# first_use.sh: (label, 1st process s, 3rd process s)
FIRST = [("24c3439\n02:09", 8.73, 2.61), ("3393ac5\n02:18", 6.56, 2.63), ("9879a97\n02:47", 6.48, 2.70),
         ("96bcb80\n03:29", 7.52, 3.02)]
# profile_step.py, ms a token, (24c3439, 96bcb80) in one run each pair (03:23)
PROFILE = [("int4 matmuls", 3.79, 3.59), ("int8 head", 1.99, 1.00), ("attention", 0.39, 0.47)]


def main() -> None:
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.5, 1.0, 0.9]})
    bars = ax.bar(range(len(DECODE)), [d[1] for d in DECODE], color="tab:orange")
    for b, (_, _, roof) in zip(bars, DECODE):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.03, f"{roof}%", ha="center", fontsize=8,
                color="tab:green" if roof >= 70 else "tab:red")
    ax.axhline(1.5, color="tab:red", ls="--", label="target 1.5x (and 70% roofline, the labels)")
    ax.set_xticks(range(len(DECODE)), [d[0] for d in DECODE], fontsize=7)
    ax.set_ylabel("batch-1 decode: pagedlm / llama-bench tg128")
    ax.set_ylim(0, 2.5)
    ax.legend(fontsize=7, loc="lower right")
    xs = range(len(FIRST))
    bx.bar([x - 0.2 for x in xs], [f[1] for f in FIRST], width=0.4, color="tab:blue", label="1st process (empty HOME)")
    bx.bar([x + 0.2 for x in xs], [f[2] for f in FIRST], width=0.4, color="tab:cyan",
           label="after the background work")
    bx.axhline(10, color="tab:red", ls="--", label="target 10 s")
    bx.axhline(5, color="tab:pink", ls=":", label="target 5 s")
    bx.set_xticks(list(xs), [f[0] for f in FIRST], fontsize=7)
    bx.set_ylabel("pagedlm generate, launch to exit, s")
    bx.legend(fontsize=7, loc="upper right")
    bx.set_ylim(0, 12)
    xs = range(len(PROFILE))
    cx.bar([x - 0.2 for x in xs], [p[1] for p in PROFILE], width=0.4, color="tab:gray", label="24c3439 (ninth)")
    cx.bar([x + 0.2 for x in xs], [p[2] for p in PROFILE], width=0.4, color="tab:green", label="96bcb80")
    cx.set_xticks(list(xs), [p[0] for p in PROFILE], fontsize=8)
    cx.set_ylabel("batch-1 token, torch profiler, ms")
    cx.legend(fontsize=7)
    fig.suptitle("Tenth session, 2-core Sapphire Rapids, SmolLM2 Q4_1, bf16 (docs/benchmarks.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(__file__.rsplit("/benchmarks/", 1)[0] + "/docs/tenth-session.png", dpi=110)


if __name__ == "__main__":
    main()
