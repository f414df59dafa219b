"""``pagedlm perplexity`` with the kernels' activations chosen: int8 for the int4 and the int8
kernel (the default), int8 for the int4 kernel only (the default before the int8 kernel took
int8 activations), or float.

    python benchmarks/perplexity_int4_act.py {int8,int4-only,float} --file tests/data/public_domain_en.txt \\
        --quantization auto

Every argument after the first is ``pagedlm perplexity``'s. float gives the numerics before
issue 24 (dense GEMM over the dequantised weights, float activations in the kernels).
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("int8", "int4-only", "float"):
        raise SystemExit(__doc__)
    from pagedlm.cli import main as cli
    from pagedlm.model.layers import quant

    quant.INT4_INT8_ACTIVATIONS = sys.argv[1] in ("int8", "int4-only")
    quant.INT8_INT8_ACTIVATIONS = sys.argv[1] == "int8"
    return cli(["perplexity", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
