"""CLI commands that run the engine: generate, chat, bench (serve lives in pagedlm.server)."""

from __future__ import annotations

import argparse


def register_engine_commands(sub: argparse._SubParsersAction) -> None:
    pass
