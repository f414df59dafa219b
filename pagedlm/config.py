"""One normalised, frozen model config, built from an HF ``config.json`` or GGUF metadata.

Every other part of pagedlm (model code, loader, engine, ``analysis/``) reads this object and
never a raw config dict, so ``pagedlm inspect`` and the engine cannot disagree about a model.
This module imports no torch: ``analysis`` uses it for instant answers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

# HF architecture name -> model family implemented in pagedlm.model (runnable by the engine).
RUNNABLE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
    "Gemma3ForCausalLM": "gemma3",
}
# Architectures that ``analysis`` understands but the engine does not run.
ANALYSIS_ONLY_ARCHITECTURES: dict[str, str] = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
SUPPORTED_ARCHITECTURES = {**RUNNABLE_ARCHITECTURES, **ANALYSIS_ONLY_ARCHITECTURES}

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
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


class ConfigError(ValueError):
    """A config that pagedlm cannot use; the message names the bad key or value."""


class UnsupportedArchitectureError(ConfigError):
    def __init__(self, arch: str):
        super().__init__(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(RUNNABLE_ARCHITECTURES))}"
            f" (analysis only: {', '.join(sorted(ANALYSIS_ONLY_ARCHITECTURES))})"
        )
        self.architecture = arch


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of default, linear, llama3."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # "llama" | "gpt2" | "gemma3" | "deepseek_v3"
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
    # DeepSeek-V3 (analysis only): MLA and routed + shared experts.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_shared_experts: int = 0
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
    def runnable(self) -> bool:
        return self.architecture in RUNNABLE_ARCHITECTURES

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    def rope_theta_for(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def rope_scaling_for(self, layer: int) -> RopeScaling | None:
        # Gemma 3 scales only the global layers' rope; local layers use plain rope.
        if self.family == "gemma3" and self.is_sliding(layer):
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
        from pagedlm.loader.gguf_meta import read_gguf_metadata

        meta, tensor_names = read_gguf_metadata(path)
        return cls.from_gguf(meta, tensor_names)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Normalise an HF ``config.json`` dict (transformers 4.x and 5.x layouts)."""
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
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch)
        family = SUPPORTED_ARCHITECTURES[arch]

        def req(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"config is missing required key {key!r}")

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common: dict[str, Any] = dict(
            architecture=arch,
            family=family,
            model_type=d.get("model_type", ""),
            vocab_size=int(req("vocab_size")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family in ("gpt2", "gemma3"))),
            extra={k: d[k] for k in ("quantization_config",) if k in d},
        )
        if family == "gpt2":
            n_embd = int(req("n_embd", "hidden_size"))
            n_head = int(req("n_head", "num_attention_heads"))
            act = d.get("activation_function", "gelu_new")
            return cls(
                **common,
                hidden_size=n_embd,
                intermediate_size=int(d.get("n_inner") or 4 * n_embd),
                num_hidden_layers=int(req("n_layer", "num_hidden_layers")),
                num_attention_heads=n_head,
                num_key_value_heads=n_head,
                head_dim=n_embd // n_head,
                max_position_embeddings=int(req("n_positions", "max_position_embeddings")),
                norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                norm_type="layer",
                hidden_act=_norm_act(act),
                gated_mlp=False,
                position_embedding="learned",
                attention_bias=True,
                o_proj_bias=True,
                mlp_bias=True,
            )

        hidden = int(req("hidden_size"))
        n_heads = int(req("num_attention_heads"))
        n_kv = int(d.get("num_key_value_heads") or n_heads)
        head_dim = int(d.get("head_dim") or hidden // n_heads)
        n_layers = int(req("num_hidden_layers"))
        if arch in ANALYSIS_ONLY_ARCHITECTURES:
            # Never run by the engine, so its rope scaling (DeepSeek-V3: YaRN) is not needed here.
            theta, scaling, local_theta = _rope_from_hf(
                {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")}, family)
        else:
            theta, scaling, local_theta = _rope_from_hf(d, family)
        act = d.get("hidden_act") or d.get("hidden_activation") or "silu"
        kw: dict[str, Any] = dict(
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            hidden_act=_norm_act(act),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(d.get("attention_bias", False)) or arch == "Qwen2ForCausalLM"
            or (arch == "Qwen2MoeForCausalLM" and bool(d.get("qkv_bias", True))),
            # transformers gives o_proj a bias with attention_bias in these (never in Qwen2/Mistral).
            o_proj_bias=bool(d.get("attention_bias", False)) and arch in (
                "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
        )
        sliding = d.get("sliding_window")
        use_sliding = d.get("use_sliding_window", True)
        layer_types = d.get("layer_types")
        if family == "gemma3":
            if not layer_types:
                pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
                layer_types = [
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(n_layers)
                ]
            kw.update(
                rope_local_theta=local_theta,
                post_norms=True,
                norm_weight_offset=1.0,
                embed_scale=math.sqrt(hidden),
                attn_scale=float(d.get("query_pre_attn_scalar") or head_dim) ** -0.5,
                final_logit_softcapping=d.get("final_logit_softcapping"),
                attn_logit_softcapping=d.get("attn_logit_softcapping"),
            )
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            # Qwen configs carry a sliding_window value that is used only when use_sliding_window.
            if not d.get("use_sliding_window", False):
                sliding = None
            elif layer_types is None:
                max_win = int(d.get("max_window_layers", n_layers))
                layer_types = ["sliding_attention" if i >= max_win else "full_attention" for i in range(n_layers)]
        elif sliding is not None and use_sliding and layer_types is None:
            layer_types = ["sliding_attention"] * n_layers  # Mistral: every layer windowed
        if sliding is not None and layer_types is not None and "sliding_attention" in layer_types:
            kw["sliding_window"] = int(sliding)
            kw["layer_types"] = tuple(layer_types)
        elif layer_types is not None:
            kw["layer_types"] = tuple("full_attention" for _ in layer_types)

        if arch == "MixtralForCausalLM":
            kw.update(
                num_experts=int(req("num_local_experts")),
                num_experts_per_tok=int(req("num_experts_per_tok")),
                moe_intermediate_size=kw["intermediate_size"],
                norm_topk_prob=True,
            )
        elif arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            n_exp = int(req("num_experts", "num_local_experts"))  # transformers 5 saves the latter
            step = int(d.get("decoder_sparse_step", 1) or 1)
            mlp_only = set(d.get("mlp_only_layers") or [])
            kw.update(
                num_experts=n_exp,
                num_experts_per_tok=int(req("num_experts_per_tok")),
                moe_intermediate_size=int(req("moe_intermediate_size")),
                norm_topk_prob=bool(d.get("norm_topk_prob", arch == "Qwen3MoeForCausalLM")),
                shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                moe_layers=tuple(
                    (i not in mlp_only) and n_exp > 0 and (i + 1) % step == 0 for i in range(n_layers)
                ),
            )
        elif arch == "DeepseekV3ForCausalLM":
            first_dense = int(d.get("first_k_dense_replace", 0))
            freq = int(d.get("moe_layer_freq", 1) or 1)
            n_routed = int(req("n_routed_experts"))
            qk_rope = int(req("qk_rope_head_dim"))
            qk_nope = int(req("qk_nope_head_dim"))
            kw.update(
                head_dim=qk_nope + qk_rope,
                num_experts=n_routed,
                num_experts_per_tok=int(req("num_experts_per_tok")),
                moe_intermediate_size=int(req("moe_intermediate_size")),
                norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                n_shared_experts=int(d.get("n_shared_experts") or 0),
                moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(n_layers)),
                q_lora_rank=d.get("q_lora_rank"),
                kv_lora_rank=int(req("kv_lora_rank")),
                qk_nope_head_dim=qk_nope,
                qk_rope_head_dim=qk_rope,
                v_head_dim=int(req("v_head_dim")),
                attn_scale=float(qk_nope + qk_rope) ** -0.5,
            )
        return cls(**common, **kw)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: list[str] | None = None) -> ModelConfig:
        """Normalise GGUF metadata (``general.architecture`` and ``{arch}.*`` keys)."""
        arch = meta.get("general.architecture")
        gguf_arch_map = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                         "gpt2": "GPT2LMHeadModel"}
        if arch not in gguf_arch_map:
            raise ConfigError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(gguf_arch_map))}"
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
            toks = meta.get("tokenizer.ggml.tokens")
            if toks is None:
                raise ConfigError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(toks)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        hf: dict[str, Any] = {
            "architectures": [gguf_arch_map[arch]],
            "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
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
        }
        if arch == "gpt2":
            hf.update(n_embd=hidden, n_head=n_heads, n_layer=n_layers, n_positions=hf["max_position_embeddings"],
                      layer_norm_epsilon=float(opt("attention.layer_norm_epsilon", 1e-5)))
        if arch == "gemma3":
            hf.update(
                hidden_activation="gelu_pytorch_tanh",
                sliding_window=int(opt("attention.sliding_window", 512)),
                query_pre_attn_scalar=head_dim,
                rope_local_base_freq=10000.0,
                tie_word_embeddings=True,
            )
            factor = opt("rope.scaling.factor")
            if factor and opt("rope.scaling.type", "linear") == "linear":
                hf["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        if arch == "qwen2":
            hf["attention_bias"] = True
        return cls.from_hf(hf)


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
    if rtype not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope_scaling type {rtype!r}; supported: default, linear, llama3")
    return RopeScaling(
        rope_type=rtype,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def _rope_from_hf(d: dict[str, Any], family: str) -> tuple[float, RopeScaling | None, float | None]:
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
                                          else (10000.0 if family == "gemma3" else None))
    theta = float(d.get("rope_theta", 1e6 if family == "gemma3" else 10000.0))
    local = float(d.get("rope_local_base_freq", 10000.0)) if family == "gemma3" else None
    return theta, _rope_scaling(d.get("rope_scaling")), local
