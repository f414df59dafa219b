"""docs/eighth-session.png: the eighth session's trade between prefill speed and exactness on a
2-core Sapphire Rapids Xeon (bf16): the offline throughput ratio against transformers and the
perplexity of the dense path, for each form of the dense GEMM's input; and the fresh server's p99
time to first token against issue 22's target.

    python benchmarks/plot_eighth_session.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# docs/benchmarks.md, eighth session: (build, warm ratios of its runs, perplexity of its dense path).
BUILDS = [
    ("c878f75\nint4 kernel\nat every size", [2.79], 17.2527),  # seventh session's best run; kernel perplexity
    ("facf9e4\ndense, x rounded\nto bf16 once", [3.10, 3.17], 17.3933),
    ("ca6e1c6\ndense, x in\ntwo bf16 halves", [2.75, 2.78], 17.3023),
]
REFERENCE_PPL = 17.2727  # the default's perplexity in the fifth session's table
FRESH_P99 = [("seventh\nsession", 2.828), ("facf9e4", 1.383), ("ca6e1c6", 1.483)]


def main() -> None:
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    xs = range(len(BUILDS))
    for i, (_, runs, _) in enumerate(BUILDS):
        ax.scatter([i] * len(runs), runs, color="tab:blue", zorder=3)
    ax.axhline(3.0, color="tab:red", ls="--", label="issue 22 target (3x)")
    ax.set_xticks(list(xs), [b[0] for b in BUILDS], fontsize=8)
    ax.set_ylabel("48 requests, warm: pagedlm / transformers")
    ax.set_ylim(2.4, 3.4)
    ax.legend(fontsize=8)
    bx.bar(list(xs), [100 * (b[2] / REFERENCE_PPL - 1) for b in BUILDS], color="tab:orange")
    bx.axhline(0.5, color="tab:red", ls="--", label="issue 24 bound (+0.5%)")
    bx.set_xticks(list(xs), [b[0] for b in BUILDS], fontsize=8)
    bx.set_ylabel("perplexity of that path vs 17.2727, %")
    bx.legend(fontsize=8)
    cx.bar(range(len(FRESH_P99)), [v for _, v in FRESH_P99], color="tab:green")
    cx.axhline(2.0, color="tab:red", ls="--", label="issue 22 target (2 s)")
    cx.set_xticks(range(len(FRESH_P99)), [k for k, _ in FRESH_P99], fontsize=8)
    cx.set_ylabel("fresh serve, 32 streams: p99 TTFT, s")
    cx.legend(fontsize=8)
    fig.suptitle("Eighth session, 2-core Sapphire Rapids, SmolLM2 Q4_1, bf16 (docs/benchmarks.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(__file__.rsplit("/benchmarks/", 1)[0] + "/docs/eighth-session.png", dpi=110)


if __name__ == "__main__":
    main()
