"""Linear layers that own their tensor-parallel sharding rule (nano-vllm style).

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that narrows the
checkpoint tensor to this rank's shard and copies it in place, so the loader is a plain walk.
With tp_size == 1 every layer is one matmul (``matmul.linear``: picks the kernel by hardware).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm.model.layers.quant import (
    Int4LinearMethod,
    LinearMethod,
    QuantizedWeight,
    UnquantizedLinearMethod,
    current_weight_dtype,
)
from pagedlm.model.parallel import current_parallel_state


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch for {what}: model expects {tuple(param.shape)}, "
                         f"checkpoint has {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _store_whole(param: nn.Parameter, loaded: torch.Tensor, what: str) -> None:
    """Load a whole parameter: take the loaded tensor itself where the loader made it for us
    (``loaded.pagedlm_fresh``: a dequantised GGUF tensor, owned and writable) and it already has
    the parameter's dtype, shape and layout, else copy into the parameter. Taking it saves a copy
    of every such weight at a cold start, and the page faults of first writing the parameter."""
    if (getattr(loaded, "pagedlm_fresh", False) and loaded.dtype == param.dtype and loaded.is_contiguous()
            and loaded.device == param.device and tuple(loaded.shape) == tuple(param.shape)):
        param.data = loaded
    else:
        _copy_checked(param.data, loaded, what)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    _store_whole(param, loaded, getattr(param, "_pagedlm_name", "parameter"))


class LinearBase(nn.Module):
    """A linear layer: a dense ``weight`` (filled by the loader walk) and a ``quant_method``
    (``layers/quant.py``) that decides, once loaded, how it multiplies."""

    tp_dim: int | None = None  # 0: shard output rows; 1: shard input columns; None: replicated

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        ps = current_parallel_state()
        self.tp_rank, self.tp_size, self.tp_group = ps.tp_rank, ps.tp_size, ps.tp_group
        self.in_features, self.out_features = in_features, out_features
        self.quant_method: LinearMethod = UnquantizedLinearMethod()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=current_weight_dtype()),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        if self.tp_dim is None or self.tp_size == 1 or (self.tp_dim == 1 and loaded.dim() == 1):
            return loaded
        size = param.shape[self.tp_dim]
        return loaded.narrow(self.tp_dim, self.tp_rank * size, size)

    def _store_rows(self, param: nn.Parameter, offset: int, size: int, loaded: torch.Tensor, what: str) -> None:
        """Copy ``loaded`` into rows [offset, offset + size) of ``param``; an int4 layer also keeps
        the exact GGUF codes those rows came with (None when they came without: quantized from dense)."""
        if offset == 0 and size == param.shape[0]:
            _store_whole(param, loaded, what)
        else:
            _copy_checked(param.data.narrow(0, offset, size), loaded, what)
        if param is self.weight and isinstance(self.quant_method, Int4LinearMethod):
            self.quant_method.record_exact(offset, getattr(loaded, "gguf_int4", None))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = self._shard(param, loaded)
        self._store_rows(param, 0, param.shape[0], loaded, getattr(param, "_pagedlm_name", "linear"))

    def process_weights_after_loading(self, compute_dtype: torch.dtype):
        """Quantize (once) as the method says; yields (method name, QuantizedWeight or None)."""
        m = self.quant_method
        m.process_weights_after_loading(self, self.weight, compute_dtype)
        q: QuantizedWeight | None = getattr(m, "qweight", None)
        if q is not None:
            self.weight.data = q.dense  # the dense GEMM multiplies the same (dequantized) weights
        yield m.name, q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    tp_dim = None


class ColumnParallelLinear(LinearBase):
    """Output features split across TP ranks; no communication in forward."""

    tp_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = current_parallel_state().tp_size
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tensor parallel size {tp}")
        super().__init__(in_features, out_features // tp, bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (e.g. gate and up); shard_id is the index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded)
        tp = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        loaded = loaded.narrow(0, self.tp_rank * size, size) if tp > 1 else loaded
        self._store_rows(param, offset, size, loaded, f"{getattr(param, '_pagedlm_name', 'merged')}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Heads are split across TP ranks; KV heads are
    replicated when there are fewer of them than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = current_parallel_state().tp_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor parallel size {tp}")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ValueError(f"num_key_value_heads {num_kv_heads} is not divisible by tensor parallel size {tp}")
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ValueError(f"tensor parallel size {tp} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_kv_heads = num_kv_heads
        out_total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out_total, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return LinearBase.weight_loader(self, param, loaded)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        if self.tp_size > 1:
            if shard_id == "q":
                head_rank = self.tp_rank
            elif self.total_kv_heads < self.tp_size:  # replicated KV heads: tp/kv ranks share one
                head_rank = self.tp_rank // (self.tp_size // self.total_kv_heads)
            else:
                head_rank = self.tp_rank
            loaded = loaded.narrow(0, head_rank * size, size)
        self._store_rows(param, offset, size, loaded, f"{getattr(param, '_pagedlm_name', 'qkv')}[{shard_id}]")


class RowParallelLinear(LinearBase):
    """Input features split across TP ranks; the partial outputs are all-reduced in forward."""

    tp_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = current_parallel_state().tp_size
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tensor parallel size {tp}")
        super().__init__(in_features // tp, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.weight, self.bias)
        y = self.quant_method.apply(self, x, self.weight, None)
        from pagedlm.distributed.comm import all_reduce

        all_reduce(y, self.tp_group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across TP ranks; ids outside this rank's range give zeros, then an
    all-reduce sums the shards."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        ps = current_parallel_state()
        self.tp_rank, self.tp_size, self.tp_group = ps.tp_rank, ps.tp_size, ps.tp_group
        self.num_embeddings = num_embeddings
        self.per_rank = (num_embeddings + self.tp_size - 1) // self.tp_size
        self.start = self.tp_rank * self.per_rank
        self.end = min(self.start + self.per_rank, num_embeddings)
        wdtype = current_weight_dtype()
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=wdtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # Weights stored in a lower precision than the activations: lookups are cast up.
        self.out_dtype = None if wdtype == torch.get_default_dtype() else torch.get_default_dtype()
        # How this table multiplies when it is the output head (tied, or a ParallelLMHead); the
        # build sets it. A quantized head keeps its own copy: the lookup table stays as loaded.
        self.head_method: LinearMethod = UnquantizedLinearMethod()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"shape mismatch for {getattr(param, '_pagedlm_name', 'embedding')}: model "
                             f"expects {self.num_embeddings} rows, checkpoint has {loaded.shape[0]}")
        shard = loaded if (self.start, self.end) == (0, loaded.shape[0]) else loaded[self.start : self.end]
        param.data.zero_()
        if shard.shape[0] == param.shape[0]:
            _store_whole(param, shard, getattr(param, "_pagedlm_name", "embedding"))
        else:
            _copy_checked(param.data[: shard.shape[0]], shard, getattr(param, "_pagedlm_name", "embedding"))

    def process_weights_after_loading(self, compute_dtype: torch.dtype):
        m = self.head_method
        m.process_weights_after_loading(self, self.weight, compute_dtype)
        q: QuantizedWeight | None = getattr(m, "qweight", None)
        if q is not None:
            q.one_row_gemv = True  # the compiled decode step realizes the head's input
        if q is not None and isinstance(self, ParallelLMHead):
            self.weight.data = q.dense  # not a lookup table: one copy is enough
        if q is not None:
            yield m.name, q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            y = F.embedding(ids, self.weight)
            return y if self.out_dtype is None else y.to(self.out_dtype)
        mask = (ids >= self.start) & (ids < self.end)
        y = F.embedding((ids - self.start) * mask, self.weight)
        if self.out_dtype is not None:
            y = y.to(self.out_dtype)
        y = y * mask[:, None].to(y.dtype)
        from pagedlm.distributed.comm import all_reduce

        all_reduce(y, self.tp_group)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with vocab rows split across TP ranks; logits are gathered on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head_method.apply(self, hidden, self.weight, None)
        if self.tp_size == 1:
            return logits
        from pagedlm.distributed.comm import all_gather_last_dim

        return all_gather_last_dim(logits, self.tp_group)[:, : self.num_embeddings]


__all__ = [
    "ColumnParallelLinear", "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear",
    "ReplicatedLinear", "RowParallelLinear", "VocabParallelEmbedding", "default_weight_loader",
]
