"""docs/sixth-session.png: the sixth session's ratios (2-core Sapphire Rapids Xeon with AMX, bf16),
each measured in one run against its anchor on that machine, with each issue's target; and the
compile time of the decode buckets 16-64 as one dynamic package against one package each.

    python benchmarks/plot_sixth_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, ratio, target): docs/benchmarks.md's sixth-session tables.
ROWS = [
    ("prefill 512\nvs llama-bench (24)", 3.89, 2.0),
    ("decode b1\nvs llama-bench (24)", 1.31, 1.5),
    ("48 requests warm\nvs transformers (22)", 1.92, 3.0),
    ("48 requests cold\nvs transformers (22)", 1.23, 1.5),
    ("serve 32 streams\nvs llama-server (23)", 2.79, 3.0),
]
# (choice, compile s): bench_dynamic_batch.py, float32, kernel path.
COMPILE = [("16, 32, 64:\none package each", 59.2 + 49.7 + 49.0), ("16-64:\none dynamic package", 65.3)]


def main() -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    xs = range(len(ROWS))
    ax.bar(list(xs), [r[1] for r in ROWS], 0.6, color="tab:blue")
    for x, r in zip(xs, ROWS):
        ax.plot([x - 0.4, x + 0.4], [r[2], r[2]], "k--", lw=1)
        ax.text(x, r[1] + 0.05, f"{r[1]:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [r[0] for r in ROWS], fontsize=8)
    ax.set_ylabel("ratio to the anchor (one run each)")
    ax.set_title("pagedlm, 2-core Xeon (AMX, AVX512-BF16), bf16, SmolLM2 Q4_1\n(dashed: the issue's target)",
                 fontsize=9)
    bx.bar([0, 1], [c[1] for c in COMPILE], 0.6, color=["tab:gray", "tab:green"])
    bx.set_xticks([0, 1], [c[0] for c in COMPILE], fontsize=8)
    bx.set_ylabel("compile s (buckets 16-64)")
    bx.set_title("fewer, cheaper compiles (22)", fontsize=9)
    fig.tight_layout()
    fig.savefig("docs/sixth-session.png", dpi=110)


if __name__ == "__main__":
    main()
