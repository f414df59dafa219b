"""docs/ninth-session.png: the ninth session on a 2-core Sapphire Rapids Xeon (bf16): the offline
throughput ratio against transformers (warm and cold) per build, batch-1 decode against
llama-bench with its share of the memory roofline, and the decode attention kernel before and
after its AVX512-BF16 path.

    python benchmarks/plot_ninth_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# docs/benchmarks.md, ninth session.
WARM = [("ca6e1c6\n(eighth session)", [2.75, 2.78], 1.55), ("d938f32\ndense x as it is,\ndpbf16 attention", [3.39, 3.29], None),
        ("c97b43c\nkernels return\nx's dtype", [3.24, 3.40], 1.70)]
# bench_decode.py runs: (label, ratio vs llama-bench, % of roofline)
DECODE = [("d938f32", 1.40, 65), ("c97b43c\nrun 1", 1.75, 73), ("c97b43c\nrun 2", 1.58, 65), ("c97b43c\nrun 3", 1.81, 67)]
# bench_attention.py, one run, old (1ea40b6) then new (d938f32), ms for 30 layers (first pair of runs)
ATTN = [("1 x 300", 1.21, 0.92), ("8 x 300", 4.66, 3.40), ("32 x 128", 7.85, 5.79), ("48 x 180", 19.49, 15.73),
        ("48 x 300", 34.07, 27.90)]


def main() -> None:
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.1, 1.1, 1.2]})
    for i, (_, runs, cold) in enumerate(WARM):
        ax.scatter([i] * len(runs), runs, color="tab:blue", zorder=3, label="warm" if i == 0 else None)
        if cold is not None:
            ax.scatter([i], [cold], color="tab:purple", marker="s", zorder=3, label="cold" if i == 0 else None)
    ax.axhline(3.0, color="tab:red", ls="--", label="warm target (3x)")
    ax.axhline(1.5, color="tab:pink", ls=":", label="cold target (1.5x)")
    ax.set_xticks(range(len(WARM)), [w[0] for w in WARM], fontsize=8)
    ax.set_ylabel("48 requests: pagedlm / transformers")
    ax.set_ylim(1.0, 3.6)
    ax.legend(fontsize=7, loc="lower right")
    bars = bx.bar(range(len(DECODE)), [d[1] for d in DECODE], color="tab:orange")
    for b, (_, _, roof) in zip(bars, DECODE):
        bx.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02, f"{roof}% roofline", ha="center", fontsize=7)
    bx.axhline(1.5, color="tab:red", ls="--", label="issue 24 target (1.5x)")
    bx.set_xticks(range(len(DECODE)), [d[0] for d in DECODE], fontsize=8)
    bx.set_ylabel("batch-1 decode: pagedlm / llama-bench tg128")
    bx.set_ylim(0, 2.1)
    bx.legend(fontsize=7, loc="lower right")
    xs = range(len(ATTN))
    cx.bar([x - 0.2 for x in xs], [a[1] for a in ATTN], width=0.4, label="float path (1ea40b6)", color="tab:gray")
    cx.bar([x + 0.2 for x in xs], [a[2] for a in ATTN], width=0.4, label="vdpbf16ps path (d938f32)", color="tab:green")
    cx.set_xticks(list(xs), [a[0] for a in ATTN], fontsize=8)
    cx.set_xlabel("rows x keys")
    cx.set_ylabel("decode attention, 30 layers, ms")
    cx.set_yscale("log")
    cx.legend(fontsize=7)
    fig.suptitle("Ninth session, 2-core Sapphire Rapids, SmolLM2 Q4_1, bf16 (docs/benchmarks.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(__file__.rsplit("/benchmarks/", 1)[0] + "/docs/ninth-session.png", dpi=110)


if __name__ == "__main__":
    main()
