"""``pagedlm perplexity`` with the int4 kernel's activations chosen: int8 (the default) or float.

    python benchmarks/perplexity_int4_act.py {int8,float} --file tests/data/public_domain_en.txt \\
        --quantization auto

Every argument after the first is ``pagedlm perplexity``'s. float gives the numerics before
issue 24 (dense GEMM over the dequantised weights, float activations in the kernel).
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("int8", "float"):
        raise SystemExit(__doc__)
    from pagedlm.cli import main as cli
    from pagedlm.model.layers import quant

    quant.INT4_INT8_ACTIVATIONS = sys.argv[1] == "int8"
    return cli(["perplexity", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
