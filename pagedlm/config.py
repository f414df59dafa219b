"""One normalised, frozen model config, built from an HF ``config.json`` or GGUF metadata.

Every other part of pagedlm (model code, loader, engine, ``analysis/``) reads this object and
never a raw config dict, so ``pagedlm inspect`` and the engine cannot disagree about a model.
This module imports no torch: ``analysis`` uses it for instant answers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# The per-architecture table (``ARCHITECTURES``, after ModelConfig) says which HF architectures
# pagedlm knows, how each config is normalised, and the flags the model code and loaders read.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


class ConfigError(ValueError):
    """A config that pagedlm cannot use; the message names the bad key or value."""


class UnsupportedArchitectureError(ConfigError):
    def __init__(self, arch: str):
        super().__init__(
            f"unsupported architecture {arch!r}; supported: "
            f"{', '.join(sorted(a for a, spec in ARCHITECTURES.items() if spec.runnable))}"
            + "".join(f" (analysis only: {', '.join(only)})" for only in [sorted(
                a for a, spec in ARCHITECTURES.items() if not spec.runnable)] if only)
        )
        self.architecture = arch


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of default, linear, llama3, yarn."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN (DeepSeek-V2/V3): ramp between interpolated and extrapolated frequencies, and the
    # magnitude scales (cos/sin times ``attention_factor``; DeepSeek's softmax scale times
    # ``yarn_mscale(factor, mscale_all_dim) ** 2``).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # model code: "llama" (incl. Gemma 3, MoE) | "gpt2" | "deepseek" (MLA)
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    norm_type: str = "rms"  # "rms" | "layer"
    hidden_act: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate, up, down) vs plain fc -> act -> proj
    position_embedding: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_local_theta: float | None = None  # Gemma 3: rope base of sliding-window layers
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over each head of q and k
    post_norms: bool = False  # Gemma 3: norms after attention and MLP as well as before
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float = 0.0  # softmax scale; derived as head_dim ** -0.5 when 0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # Mixture of experts (0 experts = dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen-MoE shared expert (with a sigmoid gate)
    moe_layers: tuple[bool, ...] = ()  # per layer: sparse MLP or dense MLP
    # DeepSeek-V2/V3: multi-head latent attention (MLA: kv_lora_rank > 0) and routed + shared experts.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rope on interleaved (even, odd) pairs of the rope dims
    n_shared_experts: int = 0  # shared experts of moe_intermediate_size each, added without a gate
    # Router: "softmax" (top-k of the softmax; renormalised by norm_topk_prob), "softmax_group"
    # (DeepSeek-V2 group_limited_greedy), "sigmoid_group" (DeepSeek-V3 noaux_tc: sigmoid scores
    # plus e_score_correction_bias choose, within the topk_group best of n_group groups).
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Flags the loaders read (set from the architecture table, never tested by family name).
    gguf_qk_permuted: bool = False  # llama.cpp's converter interleaved q/k rope halves (LlamaModel.permute)
    local_rope_scaled: bool = True  # Gemma 3: False, its sliding layers use plain rope
    # Tokens.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_hidden_layers)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim ** -0.5)

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        """Dims each head rotates: all of head_dim, or MLA's decoupled rope part."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention: the cache holds one latent per token, shared by all heads."""
        return self.kv_lora_rank > 0

    @property
    def runnable(self) -> bool:
        spec = ARCHITECTURES.get(self.architecture)
        return spec is not None and spec.runnable

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    def rope_theta_for(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def rope_scaling_for(self, layer: int) -> RopeScaling | None:
        if not self.local_rope_scaled and self.is_sliding(layer):
            return None
        return self.rope_scaling

    def with_overrides(self, **kwargs: Any) -> ModelConfig:
        return replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if isinstance(v, RopeScaling):
                v = {g.name: getattr(v, g.name) for g in fields(v)}
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """From a model directory, a ``config.json`` file or a ``.gguf`` file."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path does not exist: {path!r}")
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
                if len(ggufs) == 1:
                    return cls.from_gguf_file(os.path.join(path, ggufs[0]))
                raise FileNotFoundError(f"no config.json (or single .gguf file) in {path!r}")
            path = cfg_path
        if path.endswith(".gguf"):
            return cls.from_gguf_file(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path!r} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path!r} does not hold a JSON object")
        return cls.from_hf(data)

    @classmethod
    def from_gguf_file(cls, path: str) -> ModelConfig:
        """From a .gguf file's metadata (the engine goes through ``loader.source.ModelSource``,
        which opens the file once for config, weights and tokenizer alike)."""
        from pagedlm.loader.gguf import GGUFFile  # a leaf module: no import cycle

        f = GGUFFile(path)
        return cls.from_gguf(f.metadata, f.tensor_names)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Normalise an HF ``config.json`` dict (transformers 4.x and 5.x layouts) through the
        architecture's entry in ``ARCHITECTURES``."""
        if "text_config" in d and "vocab_size" not in d:  # multimodal wrapper: the text model
            inner = dict(d["text_config"])
            inner.setdefault("architectures", [
                a.replace("ForConditionalGeneration", "ForCausalLM") for a in d.get("architectures", [])
            ])
            d = inner
        archs = d.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(d.get("model_type", ""), "")
        if not arch:
            raise ConfigError("config has neither 'architectures' nor a known 'model_type'")
        spec = ARCHITECTURES.get(arch)
        if spec is None:
            raise UnsupportedArchitectureError(arch)

        def req(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"config is missing required key {key!r}")

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            family=spec.family,
            model_type=d.get("model_type", ""),
            vocab_size=int(req("vocab_size")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", spec.tied_by_default)),
            extra={k: d[k] for k in ("quantization_config",) if k in d},
            gguf_qk_permuted=spec.gguf_qk_permuted,
            **spec.normalise(d, req),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: list[str] | None = None) -> ModelConfig:
        """Normalise GGUF metadata (``general.architecture`` and ``{arch}.*`` keys, as llama.cpp's
        ``convert_hf_to_gguf.py`` writes them) into an HF config dict, then as ``from_hf``."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
            )

        def req(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise ConfigError(f"GGUF metadata is missing required key {full!r}")
            return meta[full]

        def opt(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        names = set(tensor_names or [])
        hidden = int(req("embedding_length"))
        n_heads = int(req("attention.head_count"))
        n_kv = int(opt("attention.head_count_kv", n_heads))
        head_dim = int(opt("attention.key_length", 0) or opt("rope.dimension_count", 0) or hidden // n_heads)
        n_layers = int(req("block_count"))
        vocab = opt("vocab_size")
        if vocab is None:
            if "tokenizer.ggml.tokens" not in meta:
                raise ConfigError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
            # The count alone: a lazy GGUFMetadata need not decode the whole vocabulary for it.
            counted = getattr(meta, "array_length", None)
            vocab = counted("tokenizer.ggml.tokens") if counted else len(meta["tokenizer.ggml.tokens"])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        hf: dict[str, Any] = {
            "model_type": arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(req("feed_forward_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "max_position_embeddings": int(opt("context_length", 2048)),
            "rms_norm_eps": float(opt("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(opt("rope.freq_base", 10000.0)),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": None if eos is None else int(eos),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
            "tie_word_embeddings": bool(names) and "output.weight" not in names,
            # llama.cpp records biases only as tensors (Llama with attention_bias has them).
            "attention_bias": "blk.0.attn_q.bias" in names,
        }
        factor = opt("rope.scaling.factor")
        if factor and opt("rope.scaling.type", "linear") == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        GGUF_ARCHITECTURES[arch](hf, opt)
        return cls.from_hf(hf)


# ---- the architecture table ------------------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    """One HF architecture: its model code, how its config is normalised, and the flags the
    model code and loaders read instead of testing architecture names."""

    family: str  # the model code that runs it (pagedlm.model.registry)
    normalise: Callable[[dict[str, Any], Callable[..., Any]], dict[str, Any]]  # (config, req) -> fields
    gguf_qk_permuted: bool = False  # llama.cpp's converter permutes q/k rows (its LlamaModel and subclasses)
    tied_by_default: bool = False  # tie_word_embeddings when the config does not say
    runnable: bool = True  # False: ``pagedlm inspect`` only


def _decoder(d: dict[str, Any], req, gemma: bool = False) -> dict[str, Any]:
    """Fields every decoder-only transformer config shares."""
    hidden, n_heads = int(req("hidden_size")), int(req("num_attention_heads"))
    theta, scaling, local_theta = _rope_from_hf(d, gemma)
    kw = dict(
        hidden_size=hidden,
        intermediate_size=int(req("intermediate_size")),
        num_hidden_layers=int(req("num_hidden_layers")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or hidden // n_heads),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        hidden_act=_norm_act(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
    )
    if gemma:
        kw["rope_local_theta"] = local_theta
    return kw


def _set_windows(kw: dict[str, Any], sliding: Any, layer_types: list[str] | None) -> dict[str, Any]:
    if sliding is not None and layer_types is not None and "sliding_attention" in layer_types:
        kw["sliding_window"] = int(sliding)
        kw["layer_types"] = tuple(layer_types)
    elif layer_types is not None:
        kw["layer_types"] = tuple("full_attention" for _ in layer_types)
    return kw


def _llama(d: dict[str, Any], req) -> dict[str, Any]:
    """Llama / Mistral / Mixtral: o_proj shares attention_bias (Llama); a sliding_window without
    layer_types windows every layer (Mistral)."""
    kw = _decoder(d, req)
    kw["o_proj_bias"] = kw["attention_bias"]
    sliding, layer_types = d.get("sliding_window"), d.get("layer_types")
    if sliding is not None and d.get("use_sliding_window", True) and layer_types is None:
        layer_types = ["sliding_attention"] * kw["num_hidden_layers"]
    return _set_windows(kw, sliding, layer_types)


def _mistral(d: dict[str, Any], req) -> dict[str, Any]:
    return {**_llama(d, req), "o_proj_bias": False}  # transformers' Mistral has no o_proj bias


def _qwen(d: dict[str, Any], req) -> dict[str, Any]:
    """Qwen2 / Qwen3 (and their MoE): sliding_window is used only with use_sliding_window, from
    layer max_window_layers on."""
    kw = _decoder(d, req)
    sliding, layer_types = d.get("sliding_window"), d.get("layer_types")
    if not d.get("use_sliding_window", False):
        sliding = None
    elif layer_types is None:
        n, max_win = kw["num_hidden_layers"], int(d.get("max_window_layers", kw["num_hidden_layers"]))
        layer_types = ["sliding_attention" if i >= max_win else "full_attention" for i in range(n)]
    return _set_windows(kw, sliding, layer_types)


def _qwen2(d: dict[str, Any], req) -> dict[str, Any]:
    return {**_qwen(d, req), "attention_bias": True}  # q/k/v always have a bias


def _qwen3(d: dict[str, Any], req) -> dict[str, Any]:
    kw = _qwen(d, req)
    return {**kw, "o_proj_bias": kw["attention_bias"], "qk_norm": True}


def _moe_fields(d: dict[str, Any], req, inter: int | None = None) -> dict[str, Any]:
    return dict(num_experts=int(req("num_experts", "num_local_experts", "n_routed_experts")),
                num_experts_per_tok=int(req("num_experts_per_tok")),
                moe_intermediate_size=inter if inter is not None else int(req("moe_intermediate_size")))


def _mixtral(d: dict[str, Any], req) -> dict[str, Any]:
    kw = _mistral(d, req)
    return {**kw, **_moe_fields(d, req, kw["intermediate_size"]), "norm_topk_prob": True}


def _qwen_moe(d: dict[str, Any], req, base) -> dict[str, Any]:
    kw = base(d, req)
    n = kw["num_hidden_layers"]
    moe = _moe_fields(d, req)
    step = int(d.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(d.get("mlp_only_layers") or [])
    return {**kw, **moe,
            "shared_expert_intermediate_size": int(d.get("shared_expert_intermediate_size") or 0),
            "moe_layers": tuple((i not in mlp_only) and moe["num_experts"] > 0 and (i + 1) % step == 0
                                for i in range(n))}


def _qwen2_moe(d: dict[str, Any], req) -> dict[str, Any]:
    kw = _qwen_moe(d, req, _qwen)
    return {**kw, "attention_bias": bool(d.get("qkv_bias", True)) or kw["attention_bias"],
            "norm_topk_prob": bool(d.get("norm_topk_prob", False))}


def _qwen3_moe(d: dict[str, Any], req) -> dict[str, Any]:
    return {**_qwen_moe(d, req, _qwen3), "norm_topk_prob": bool(d.get("norm_topk_prob", True))}


def _gemma3(d: dict[str, Any], req) -> dict[str, Any]:
    kw = _decoder(d, req, gemma=True)
    layer_types = d.get("layer_types")
    if not layer_types:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(kw["num_hidden_layers"])]
    kw.update(
        o_proj_bias=kw["attention_bias"],
        qk_norm=True,
        post_norms=True,
        norm_weight_offset=1.0,
        embed_scale=math.sqrt(kw["hidden_size"]),
        attn_scale=float(d.get("query_pre_attn_scalar") or kw["head_dim"]) ** -0.5,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
        local_rope_scaled=False,
    )
    return _set_windows(kw, d.get("sliding_window"), layer_types)


def _gpt2(d: dict[str, Any], req) -> dict[str, Any]:
    n_embd, n_head = int(req("n_embd", "hidden_size")), int(req("n_head", "num_attention_heads"))
    return dict(
        hidden_size=n_embd,
        intermediate_size=int(d.get("n_inner") or 4 * n_embd),
        num_hidden_layers=int(req("n_layer", "num_hidden_layers")),
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        head_dim=n_embd // n_head,
        max_position_embeddings=int(req("n_positions", "max_position_embeddings")),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        norm_type="layer",
        hidden_act=_norm_act(d.get("activation_function", "gelu_new")),
        gated_mlp=False,
        position_embedding="learned",
        attention_bias=True,
        o_proj_bias=True,
        mlp_bias=True,
    )


def _deepseek(d: dict[str, Any], req, v3: bool) -> dict[str, Any]:
    """DeepSeek-V2 / V3: MLA, dense-first layers, routed + shared experts. The rope dims are
    qk_rope_head_dim; ``head_dim`` is the q/k head size (nope + rope), as ``inspect`` counts it."""
    kw = _decoder({**d, "head_dim": None}, req)
    n = kw["num_hidden_layers"]
    qk_nope, qk_rope = int(req("qk_nope_head_dim")), int(req("qk_rope_head_dim"))
    first_dense = int(d.get("first_k_dense_replace", 0) or 0)
    freq = int(d.get("moe_layer_freq", 1) or 1)
    method = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if v3:  # transformers' V3 router: sigmoid, group-limited, bias-corrected choice, whatever topk_method says
        router, norm = "sigmoid_group", bool(d.get("norm_topk_prob", True))
    elif method == "group_limited_greedy":
        router, norm = "softmax_group", False
    elif method == "greedy":
        router, norm = "softmax", False  # V2 never renormalises the top-k weights
    else:
        raise ConfigError(f"unsupported DeepSeek-V2 topk_method {method!r}; supported: greedy, group_limited_greedy")
    scale = float(qk_nope + qk_rope) ** -0.5
    rs = kw["rope_scaling"]
    if rs is not None and rs.mscale_all_dim:  # YaRN: DeepSeek scales the softmax by mscale^2
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    kw.update(
        head_dim=qk_nope + qk_rope,
        num_key_value_heads=kw["num_attention_heads"],
        **_moe_fields(d, req),
        norm_topk_prob=norm,
        router=router,
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0) or 1.0),
        n_shared_experts=int(d.get("n_shared_experts") or 0),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(n)),
        q_lora_rank=d.get("q_lora_rank"),
        kv_lora_rank=int(req("kv_lora_rank")),
        qk_nope_head_dim=qk_nope,
        qk_rope_head_dim=qk_rope,
        v_head_dim=int(req("v_head_dim")),
        rope_interleave=bool(d.get("rope_interleave", True)) if v3 else True,
        attn_scale=scale,
    )
    return kw


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", _llama, gguf_qk_permuted=True),
    "MistralForCausalLM": ArchSpec("llama", _mistral, gguf_qk_permuted=True),
    "MixtralForCausalLM": ArchSpec("llama", _mixtral, gguf_qk_permuted=True),
    "Qwen2ForCausalLM": ArchSpec("llama", _qwen2),
    "Qwen3ForCausalLM": ArchSpec("llama", _qwen3),
    "Qwen2MoeForCausalLM": ArchSpec("llama", _qwen2_moe),
    "Qwen3MoeForCausalLM": ArchSpec("llama", _qwen3_moe),
    "Gemma3ForCausalLM": ArchSpec("llama", _gemma3, tied_by_default=True),
    "GPT2LMHeadModel": ArchSpec("gpt2", _gpt2, tied_by_default=True),
    "DeepseekV2ForCausalLM": ArchSpec("deepseek", lambda d, req: _deepseek(d, req, v3=False)),
    "DeepseekV3ForCausalLM": ArchSpec("deepseek", lambda d, req: _deepseek(d, req, v3=True)),
}


def _gguf_llama(hf: dict[str, Any], opt) -> None:
    experts = int(opt("expert_count", 0) or 0)
    hf["architectures"] = ["MixtralForCausalLM" if experts else "LlamaForCausalLM"]
    if experts:  # llama.cpp writes Mixtral as "llama" with experts
        hf.update(num_local_experts=experts, num_experts_per_tok=int(opt("expert_used_count", 2)))


def _gguf_gemma3(hf: dict[str, Any], opt) -> None:
    hf.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=int(opt("attention.sliding_window", 512)),
        # llama.cpp: every 6th layer global (its fixed Gemma 3 pattern), local rope base 10000,
        # softmax scale from head_dim except for the 62-layer 27B (hidden / heads).
        sliding_window_pattern=6,
        query_pre_attn_scalar=(hf["hidden_size"] // hf["num_attention_heads"] if hf["num_hidden_layers"] == 62
                               else hf["head_dim"]),
        rope_local_base_freq=10000.0,
        tie_word_embeddings=True,
    )


def _gguf_as(arch: str, **extra: Any):
    def fill(hf: dict[str, Any], opt) -> None:
        hf.update(architectures=[arch], **extra)
    return fill


def _gguf_gpt2(hf: dict[str, Any], opt) -> None:
    hf.update(architectures=["GPT2LMHeadModel"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
              n_layer=hf["num_hidden_layers"], n_positions=hf["max_position_embeddings"],
              layer_norm_epsilon=float(opt("attention.layer_norm_epsilon", 1e-5)))


# llama.cpp's ``general.architecture`` -> fills the HF config dict from the GGUF metadata.
GGUF_ARCHITECTURES: dict[str, Callable[[dict[str, Any], Callable[..., Any]], None]] = {
    "llama": _gguf_llama,
    "qwen2": _gguf_as("Qwen2ForCausalLM"),
    "qwen3": _gguf_as("Qwen3ForCausalLM"),
    "gemma3": _gguf_gemma3,
    "gpt2": _gguf_gpt2,
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _norm_act(act: str) -> str:
    act = act.lower()
    if act in ("silu", "swish"):
        return "silu"
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh", "gelu_fast"):
        return "gelu_tanh"
    if act == "gelu":
        return "gelu"
    if act == "relu":
        return "relu"
    raise ConfigError(f"unsupported activation function {act!r}")


def _rope_scaling(rs: dict[str, Any] | None) -> RopeScaling | None:
    if not rs:
        return None
    rtype = rs.get("rope_type") or rs.get("type") or "default"
    if rtype == "default":
        return None
    if rtype not in ("linear", "llama3", "yarn"):
        raise ConfigError(f"unsupported rope_scaling type {rtype!r}; supported: default, linear, llama3, yarn")
    attention_factor = rs.get("attention_factor")
    return RopeScaling(
        rope_type=rtype,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        beta_fast=float(rs.get("beta_fast") or 32.0),
        beta_slow=float(rs.get("beta_slow") or 1.0),
        mscale=float(rs.get("mscale") or 0.0),
        mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(rs.get("truncate", True)),
    )


def _rope_from_hf(d: dict[str, Any], gemma: bool = False) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, local theta) from either ``rope_theta``/``rope_scaling`` (transformers 4)
    or ``rope_parameters`` (transformers 5; per layer type for Gemma 3)."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        full = rp.get("full_attention") or {}
        local = rp.get("sliding_attention") or {}
        return (float(full.get("rope_theta", 1e6)), _rope_scaling(full),
                float(local.get("rope_theta", 10000.0)))
    if isinstance(rp, dict):
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        return theta, _rope_scaling(rp), (float(d["rope_local_base_freq"]) if "rope_local_base_freq" in d
                                          else (10000.0 if gemma else None))
    theta = float(d.get("rope_theta", 1e6 if gemma else 10000.0))
    local = float(d.get("rope_local_base_freq", 10000.0)) if gemma else None
    return theta, _rope_scaling(d.get("rope_scaling")), local
