"""``pagedlm perplexity`` with the kernels' activations chosen: int8 for the int4 and the int8
kernel (the default), int8 for the int4 kernel only (the default before the int8 kernel took
int8 activations), or float.

    python benchmarks/perplexity_int4_act.py {int8,int4-only,float} --file tests/data/public_domain_en.txt \\
        --quantization auto

Every argument after the first is ``pagedlm perplexity``'s. float gives the numerics before
issue 24 (dense GEMM over the dequantised weights, float activations in the kernels).

``--dense-from N`` (before the ``pagedlm perplexity`` arguments) sends every int4 layer's
products of N rows or more to the dense GEMM whatever the measured crossover (``perplexity``'s
512-row windows otherwise stay on the kernel where the crossover is higher), and
``--dense-single`` multiplies only the bfloat16-rounded x there (the dense path before the
eighth session) instead of its two halves:

    python benchmarks/perplexity_int4_act.py int8 --dense-from 256 [--dense-single] \
        --file tests/data/public_domain_en.txt --quantization auto
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("int8", "int4-only", "float"):
        raise SystemExit(__doc__)
    import torch

    from pagedlm.cli import main as cli
    from pagedlm.model.layers import quant

    quant.INT4_INT8_ACTIVATIONS = sys.argv[1] in ("int8", "int4-only")
    quant.INT8_INT8_ACTIVATIONS = sys.argv[1] == "int8"
    args = sys.argv[2:]
    dense_from, single, plain = None, False, False
    while args and args[0] in ("--dense-from", "--dense-single", "--dense-plain"):
        if args[0] == "--dense-single":
            single, args = True, args[1:]
        elif args[0] == "--dense-plain":
            plain, args = True, args[1:]
        else:
            dense_from, args = int(args[1]), args[2:]
    if dense_from is not None:
        plain_mm, plain_dense = quant.QuantizedWeight.mm, quant.QuantizedWeight.dense_mm

        def dense_mm(self, x):
            if plain:
                return torch.nn.functional.linear(x, self.dense)
            if single and self.int8_act:
                from pagedlm.model.layers.matmul import linear

                return linear(quant.round_activations_int8(x), self.dense)
            return plain_dense(self, x)

        def mm(self, x):
            if self.kind == "int4":
                return dense_mm(self, x) if x.shape[0] >= dense_from else self.kernel_mm(x)
            return plain_mm(self, x)

        quant.QuantizedWeight.mm = mm
    return cli(["perplexity", *args])


if __name__ == "__main__":
    sys.exit(main())
