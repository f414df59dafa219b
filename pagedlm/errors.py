"""Errors a user can cause; the CLI and server turn these into messages, not tracebacks."""

from __future__ import annotations


class PagedLMError(Exception):
    """Base class of pagedlm's own errors."""


class ModelLoadError(PagedLMError, ValueError):
    """A model path or file that cannot be loaded; the message names the file and the reason."""


class RequestRejectedError(PagedLMError, ValueError):
    """A request that can never be served (e.g. longer than the cache or max_model_len)."""


class EngineDeadError(PagedLMError, RuntimeError):
    """The engine cannot serve any more requests: it is shut down, shutting down, or a model
    rank died (the message names it). HTTP 503."""


class RequestFailedError(PagedLMError):
    """One request failed inside an engine step (finish_reason "error"); the others went on."""


class WorkerError(RuntimeError):
    """A model rank died, failed to start, or raised; the message names the rank."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"worker rank {rank} {message}")
        self.rank = rank


# What the CLI reports as "error: ..." with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, PagedLMError)
