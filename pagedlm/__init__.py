"""pagedlm: an LLM inference engine written from first principles on PyTorch."""

__version__ = "0.1.0"
