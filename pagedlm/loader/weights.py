"""Stream checkpoint tensors into a built model, strictly.

Sources: HF directories (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` through ``torch.load(weights_only=True)``)
and GGUF files (read by ``loader/gguf.py``, dequantised by the ``gguf`` package; names mapped to HF names; llama.cpp's
q/k row permutation and Gemma's norm ``+1`` undone). Every parameter must be loaded exactly once;
missing, unexpected and mis-shaped tensors raise ``ModelLoadError`` naming them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import torch
from torch import nn

from pagedlm.config import ModelConfig
from pagedlm.errors import ModelLoadError
from pagedlm.loader.gguf import GGUFFile, gguf_to_hf_name
from pagedlm.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, default_weight_loader

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias$|\.attn\.masked_bias$|^rope_freqs\.weight$)")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# ---- sources ---------------------------------------------------------------------------------

def iter_hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = _hf_weight_files(path)
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(f, framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(f"cannot read safetensors file {f!r}: {e}") from e
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelLoadError(f"cannot read {f!r} with torch.load(weights_only=True): {e}") from e
            if not isinstance(state, dict):
                raise ModelLoadError(f"{f!r} does not hold a state dict")
            yield from state.items()


def _hf_weight_files(path: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index!r} is not a valid weight index: {e}") from e
            files = sorted(set(weight_map.values()))
            for f in files:
                if not os.path.isfile(os.path.join(path, f)):
                    raise ModelLoadError(f"{index!r} names shard {f!r}, which does not exist")
            return [os.path.join(path, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    st = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if st:
        return [os.path.join(path, f) for f in st]
    raise ModelLoadError(f"no weights in {path!r}: expected model.safetensors, a sharded safetensors "
                         "index, pytorch_model.bin, or a .gguf file")


_QK_PERMUTED = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")


def iter_gguf_weights(file: str | GGUFFile, cfg: ModelConfig,
                      int4_codes: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised tensors under HF names, from a GGUF path or an open ``GGUFFile``. With
    ``int4_codes``, tensors stored as Q4_0 / Q4_1 / Q4_K also carry their exact 4-bit codes
    (``tensor.gguf_int4``) for int4 layers to repack."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize  # ggml's block formats, vectorised in numpy

    from pagedlm.loader.gguf_quant import FAST_DEQUANT, INT4_TYPES
    from pagedlm.loader.gguf_quant import dequantize as fast_dequantize
    from pagedlm.loader.gguf_quant import int4_codes as gguf_int4

    if cfg.position_embedding != "rope" or cfg.is_mla:
        raise ModelLoadError(f"GGUF {cfg.architecture} checkpoints are not supported; use an HF directory")
    reader = file if isinstance(file, GGUFFile) else GGUFFile(file)
    path = reader.path
    for t in reader.tensors:
        if _IGNORED.search(t.name):
            continue
        name = gguf_to_hf_name(t.name, cfg)
        if name is None:
            raise ModelLoadError(f"{path!r}: unexpected GGUF tensor {t.name!r}")
        data = t.data
        shape = t.torch_shape
        want_codes = int4_codes and t.type_name in INT4_TYPES and len(shape) == 2
        codes = None
        try:
            if t.type_name in FAST_DEQUANT and len(shape) == 2:
                # Codes and dense weights from one unpacking of the blocks (bit for bit gguf's).
                arr, codes = fast_dequantize(data, t.type_name, shape[1], with_codes=want_codes)
            else:
                arr = dequantize(data, GGMLQuantizationType(t.tensor_type))
        except Exception as e:
            raise ModelLoadError(f"{path!r}: cannot dequantise {t.name!r} ({t.type_name}): {e}") from e
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError(f"{path!r}: tensor {t.name!r} is truncated")
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable:  # unquantised tensors come straight from the memory map
            arr = arr.copy()
        w = torch.from_numpy(arr)
        if want_codes and codes is None:
            codes = gguf_int4(data, t.type_name, shape[1])
        if cfg.gguf_qk_permuted and name.endswith(_QK_PERMUTED):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            # llama.cpp's converter interleaved the two rope halves of each head's rows (weight
            # and bias); restore "rotate half" order.
            perm = torch.arange(shape[0]).view(heads, cfg.head_dim // 2, 2).transpose(1, 2).reshape(-1)
            # index_select: advanced indexing takes a slow path for uint8 (2.3 ms vs 0.2 ms per code
            # matrix of SmolLM2, measured; 60 layers x 3 tensors at every cold load).
            w = w.index_select(0, perm)
            codes = None if codes is None else tuple(c.index_select(0, perm) for c in codes)
        if cfg.norm_weight_offset and name.endswith("norm.weight"):
            w = w - cfg.norm_weight_offset  # llama.cpp stores Gemma's (1 + w)
        if codes is not None:
            w.gguf_int4 = codes
        w.pagedlm_fresh = True  # made here, owned, writable: a whole parameter may take it as is
        yield name, w


def iter_weights(path: str, cfg: ModelConfig, int4_codes: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    if path.endswith(".gguf"):
        return iter_gguf_weights(path, cfg, int4_codes)
    return iter_hf_weights(path)


# ---- the walk --------------------------------------------------------------------------------

def _expected_shards(model: nn.Module) -> dict[str, set]:
    expected: dict[str, set] = {}
    for mod_name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if isinstance(mod, QKVParallelLinear):
                expected[full] = {"q", "k", "v"}
            elif isinstance(mod, MergedColumnParallelLinear):
                expected[full] = set(range(len(mod.output_sizes)))
            elif hasattr(mod, "checkpoint_shards"):  # e.g. fused MoE experts: (expert, part) shards
                expected[full] = mod.checkpoint_shards(pname)
            else:
                expected[full] = {None}
    return expected


def default_remap(model: nn.Module, name: str, tensor: torch.Tensor):
    cfg: ModelConfig = model.config
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return
    for ckpt, (packed, shard) in model.packed_modules_mapping.items():
        if f".{ckpt}." in name:
            yield name.replace(f".{ckpt}.", f".{packed}."), tensor, shard
            return
    yield name, tensor, None


def layer_of(name: str) -> int | None:
    """The layer number a checkpoint name belongs to (None for embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _stage_layers(params: dict[str, torch.Tensor]):
    """``own_layer`` for a pipeline stage: the layer numbers its own parameters carry."""
    owned = {int(m.group(1)) for n in params if (m := _LAYER.search(n))}

    def own_layer(layer: int | None, pname: str | None = None) -> bool:
        if layer is None:  # a remapped name this stage lacks: owned only if it is not a layer's
            m = _LAYER.search(pname or "")
            return m is None or int(m.group(1)) in owned
        return layer in owned

    return own_layer


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    for n, p in params.items():
        p._pagedlm_name = n
    expected = _expected_shards(model)
    loaded: dict[str, set] = {n: set() for n in params}
    unexpected: list[str] = []
    remap = getattr(model, "remap_checkpoint", None)
    own_layers = getattr(model, "own_layer", None)
    if own_layers is None and not (getattr(model, "first", True) and getattr(model, "last", True)):
        own_layers = _stage_layers(params)  # a pipeline stage: other stages' layers are skipped
    for name, tensor in weights:
        if _IGNORED.search(name):
            continue
        m = _LAYER.search(name)
        if m and own_layers is not None and not own_layers(int(m.group(1))):
            continue  # another pipeline stage's layer
        items = remap(name, tensor) if remap is not None else default_remap(model, name, tensor)
        for pname, t, shard in items:
            param = params.get(pname)
            if param is None:
                if own_layers is not None and not own_layers(None, pname):
                    continue
                unexpected.append(name)
                continue
            if shard in loaded[pname]:
                raise ModelLoadError(f"checkpoint tensor {name!r} loaded twice")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                with torch.no_grad():
                    loader(param, t, shard) if shard is not None else loader(param, t)
            except ValueError as e:
                raise ModelLoadError(f"checkpoint tensor {name!r}: {e}") from e
            loaded[pname].add(shard)
    missing = sorted(n for n, shards in expected.items() if loaded.get(n, set()) != shards)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise ModelLoadError("checkpoint does not match the model: " + "; ".join(problems))
