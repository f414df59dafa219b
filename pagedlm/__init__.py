"""pagedlm: an LLM inference engine written from first principles on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "LLMEngine",
           "EngineConfig", "LoRARequest"]

if TYPE_CHECKING:
    from pagedlm.engine.engine import EngineConfig, LLMEngine
    from pagedlm.llm import LLM
    from pagedlm.lora import LoRARequest
    from pagedlm.outputs import CompletionOutput, RequestOutput
    from pagedlm.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str):
    # Lazy: `pagedlm inspect` and `--help` must not pay for importing torch.
    if name == "LLM":
        from pagedlm.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from pagedlm import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from pagedlm import outputs

        return getattr(outputs, name)
    if name == "LoRARequest":
        from pagedlm.lora import LoRARequest

        return LoRARequest
    if name in ("LLMEngine", "EngineConfig"):
        from pagedlm.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pagedlm' has no attribute {name!r}")
