"""docs/seventh-session.png: the seventh session's ratios against each anchor (2-core Sapphire
Rapids Xeon with AMX, bf16), beside the sixth session's on the same kind of machine, with each
issue's target; and the int4 kernel's time per row count with and without the tile unit.

    python benchmarks/plot_seventh_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, sixth session, seventh session, target): docs/benchmarks.md's tables of both sessions.
ROWS = [
    ("prefill 512\nvs llama-bench (24)", 3.89, 4.99, 2.0),
    ("decode b1\nvs llama-bench (24)", 1.31, 1.31, 1.5),
    ("48 requests warm\nvs transformers (22)", 1.92, 2.79, 3.0),
    ("48 requests cold\nvs transformers (22)", 1.23, 1.62, 1.5),
    ("serve 1 stream\nvs llama-server (23)", 1.24, 1.58, 1.0),
    ("serve 32 streams\nvs llama-server (23)", 2.79, 3.63, 3.0),
]
# (rows, vector path ms, tile path ms): bench_int4_rows.py, PAGEDLM_AMX=0 and default.
ROWS_MS = [(16, 13.0, 11.0), (32, 18.3, 16.8), (64, 33.8, 30.0), (128, 65.2, 53.0), (256, 138.6, 99.0),
           (512, 279.5, 184.0)]


def main() -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    xs = list(range(len(ROWS)))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in ROWS], 0.4, color="tab:gray", label="sixth session")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in ROWS], 0.4, color="tab:blue", label="seventh session")
    for x, r in zip(xs, ROWS):
        ax.plot([x - 0.45, x + 0.45], [r[3], r[3]], "k--", lw=1)
        ax.text(x + 0.2, r[2] + 0.05, f"{r[2]:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(xs, [r[0] for r in ROWS], fontsize=7)
    ax.set_ylabel("ratio to the anchor (one run each)")
    ax.set_title("pagedlm, 2-core Xeon (AMX, AVX512-BF16), bf16, SmolLM2 Q4_1 (dashed: target)", fontsize=9)
    ax.legend(fontsize=8)
    rows = [r[0] for r in ROWS_MS]
    bx.plot(rows, [r[1] for r in ROWS_MS], "o-", color="tab:gray", label="vector (vpdpbusd)")
    bx.plot(rows, [r[2] for r in ROWS_MS], "o-", color="tab:green", label="tile unit (tdpbsud)")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("rows")
    bx.set_ylabel("ms, 120 int4 layers")
    bx.set_title("int4 kernel, many rows", fontsize=9)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("docs/seventh-session.png", dpi=110)


if __name__ == "__main__":
    main()
