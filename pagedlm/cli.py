"""``pagedlm`` command line: generate | chat | serve | bench | inspect | cache.

Each command lives in its own module with ``register(subparsers)``; this file only wires them
and turns user errors into a message and a non-zero exit (never a traceback). Nothing here
imports torch, so ``pagedlm inspect`` and ``--help`` are instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pagedlm.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedlm",
        description="pagedlm: an LLM inference engine with a paged KV cache and continuous batching.",
        epilog="Run 'pagedlm COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from pagedlm.commands import register_engine_commands

    register_engine_commands(sub)
    from pagedlm.server.cli import register as register_serve
    register_serve(sub)
    from pagedlm.analysis.cli import register as register_inspect
    register_inspect(sub)
    from pagedlm.cache import register as register_cache
    register_cache(sub)
    from pagedlm.train.commands import register as register_train
    register_train(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (callers that run ``main``
    in-process, such as tests, swap and close it), not the stream of the first call."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr() -> None:
    """pagedlm INFO records (start-up facts: KV cache, quantization, compile progress) to stderr,
    one handler however many times ``main`` runs in a process."""
    logger = logging.getLogger("pagedlm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":  # serve configures logging from --log-level
        _log_to_stderr()
    try:
        worker = _torchrun(args)
        if worker is not None:
            return worker()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"pagedlm {args.command}: error: {e}", file=sys.stderr)
        return 2


ENGINE_COMMANDS = ("serve", "generate", "chat", "bench", "perplexity")


def _torchrun(args: argparse.Namespace):
    """Under torchrun (RANK / WORLD_SIZE set, more than one rank): rank 0 runs the command with
    the engine's ranks being torchrun's; the others return a worker loop to run instead."""
    from pagedlm.distributed.launch import detect, resolve_layout

    env = detect()
    if env is None or args.command not in ENGINE_COMMANDS:
        return None
    args.tensor_parallel_size, args.pipeline_parallel_size, args.expert_parallel_size = resolve_layout(
        env, args.tensor_parallel_size, args.pipeline_parallel_size, args.expert_parallel_size)
    args.launcher = "torchrun"
    if env.rank == 0:
        return None
    from pagedlm.commands import engine_kwargs
    from pagedlm.distributed.torchrun import run_worker

    kwargs = engine_kwargs(args)
    return lambda: run_worker(kwargs, env)


if __name__ == "__main__":
    sys.exit(main())
