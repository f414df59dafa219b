"""docs/fifth-session.png: the ratios of docs/benchmarks.md's fifth-session tables (each measured
in one run against its anchor, same machine), fourth session against fifth, with each issue's
target.

    python benchmarks/plot_fifth_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, fourth session, fifth session, target): the tables' "vs anchor" columns.
ROWS = [
    ("prefill 512\nvs llama-bench (24)", 1.47, 2.66, 2.0),
    ("decode b1\nvs llama-bench (24)", 1.18, 1.16, 1.5),
    ("48 requests warm\nvs transformers (22)", 2.44, 3.50, 3.0),
    ("48 requests cold\nvs transformers (22)", 1.48, 1.49, 1.5),
    ("serve 32 streams\nvs llama-server (23)", 2.06, 2.45, 3.0),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(ROWS))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in ROWS], 0.4, label="fourth session")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in ROWS], 0.4, label="fifth session")
    for x, r in zip(xs, ROWS):
        ax.plot([x - 0.45, x + 0.45], [r[3], r[3]], "k--", lw=1)
    ax.set_xticks(list(xs), [r[0] for r in ROWS], fontsize=8)
    ax.set_ylabel("ratio to the anchor (one run each)")
    ax.set_title("pagedlm, 2-core AVX2 EPYC, SmolLM2 Q4_1 (dashed: the issue's target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig("docs/fifth-session.png", dpi=110)


if __name__ == "__main__":
    main()
