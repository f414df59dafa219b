"""SamplingParams: vLLM's fields and defaults, validated at construction with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def _ll():
    import llguidance

    return llguidance


@dataclass
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema, dict or string), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (a Lark grammar, the
    llguidance dialect). JSON is generated compact unless ``disable_any_whitespace=False``: free
    whitespace lets a model loop on spaces and newlines (vLLM's default is the opposite)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        elif self.json_object is not None and not isinstance(self.json_object, bool):
            raise TypeError(f"json_object must be a bool, got {self.json_object!r}")
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, grammar"
                             + (f"; got {', '.join(given)}" if given else ""))
        if not isinstance(self.disable_any_whitespace, bool):
            raise TypeError(f"disable_any_whitespace must be a bool, got {self.disable_any_whitespace!r}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"json schema is not valid JSON: {e}") from e
            if not isinstance(self.json, dict):
                raise TypeError(f"json schema must be a JSON object, got {self.json!r}"[:200])
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{name} must be a string, got {v!r}"[:200])
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}"[:200])
            self.choice = list(self.choice)
        err = _ll().LLMatcher.validate_grammar(self.to_grammar())
        if err:
            raise ValueError(f"invalid {self.kind}: {err.strip()}"[:1000])

    @property
    def kind(self) -> str:
        for name, label in (("json", "JSON schema"), ("regex", "regex"), ("choice", "choice"),
                            ("grammar", "grammar")):
            if getattr(self, name) is not None:
                return label
        return "JSON object"

    def to_grammar(self) -> str:
        """The llguidance grammar (a JSON string) this request is constrained by."""
        M = _ll().LLMatcher
        if self.regex is not None:
            return M.grammar_from_regex(self.regex)
        if self.choice is not None:
            # Lark string literals take JSON escapes: any choice text is matched literally.
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        if self.grammar is not None:
            return M.grammar_from_lark(self.grammar)
        schema = self.json if self.json is not None else {"type": "object"}
        return M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": not self.disable_any_whitespace})

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """None, an instance, or a dict of its fields (as vLLM accepts)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"structured_outputs has unknown field(s): {', '.join(sorted(unknown))}")
            return cls(**value)
        raise TypeError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {value!r}"[:200])


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per sampled token (the sampled one always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Added to the logits of these token ids (OpenAI's logit_bias: -100 bans, 100 all but forces).
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None  # a dict is converted
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not is_num(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("n", "top_k", "min_tokens"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None:
            if not is_int(self.max_tokens):
                raise TypeError(f"max_tokens must be an integer, got {self.max_tokens!r}")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop_list):
            raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) for t in self.stop_token_ids):
            raise TypeError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    is_int(k) and k >= 0 and is_num(v) for k, v in self.logit_bias.items()):
                raise TypeError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"[:200])
            bad = [v for v in self.logit_bias.values() if not -100.0 <= v <= 100.0]
            if bad:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bad[0]}")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
