"""Errors a user can cause; the CLI and server turn these into messages, not tracebacks."""

from __future__ import annotations


class PagedLMError(Exception):
    """Base class of pagedlm's own errors."""


class ModelLoadError(PagedLMError, ValueError):
    """A model path or file that cannot be loaded; the message names the file and the reason."""


class RequestRejectedError(PagedLMError, ValueError):
    """A request that can never be served (e.g. longer than the cache or max_model_len)."""


# What the CLI reports as "error: ..." with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, PagedLMError)
