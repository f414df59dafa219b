"""This process's place in the parallel layout. The state itself lives with the model code
(``pagedlm.model.parallel``), which receives it at build time; re-exported here for the
distributed package."""

from __future__ import annotations

from pagedlm.model.parallel import ParallelState

__all__ = ["ParallelState"]
