"""Cost of structured output: constrained vs unconstrained decode tok/s on SmolLM2, and the
grammar's own time per token (mask fill, masking in the sampler, matcher advance).

    PYTHONPATH=$PWD python -m benchmarks.bench_structured [--batch 1 8] [--tokens 64] [--repeats 2] [--eager]

Every request is greedy with the same chat prompt and exactly ``--tokens`` generated tokens: the
constrained ones follow a JSON schema whose shortest document is longer than that (an array of
at least 40 objects), so both sides decode the same number of steps. Only decode steps are
timed (steps without prefill tokens). Runs alternate unconstrained / constrained ``--repeats``
times; the best of each is reported. Compiled decode (the server's default) unless ``--eager``;
compilation happens in a warm-up run before timing.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                     "city": {"enum": ["Paris", "London", "Rome"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}}
MESSAGES = [{"role": "user", "content": "List people with their name, age and city as JSON."}]


class GrammarTimer:
    """Wraps the three grammar seams to add up their time."""

    def __init__(self, engine):
        import pagedlm.engine.engine as eng_mod
        import pagedlm.model.layers.sampler as sm

        self.t = {"fill": 0.0, "apply": 0.0, "advance": 0.0}
        self.rows = 0
        fill, apply, advance = engine.grammars.fill, sm._apply_grammar, eng_mod.advance

        def timed(name, fn, count=False):
            def run(*a):
                t = time.perf_counter()
                out = fn(*a)
                self.t[name] += time.perf_counter() - t
                if count:
                    self.rows += len(a[0])
                return out
            return run

        engine.grammars.fill = timed("fill", fill, count=True)
        sm._apply_grammar = timed("apply", apply)
        eng_mod.advance = timed("advance", advance)


def run(engine, batch: int, tokens: int, constrained: bool) -> tuple[float, int]:
    from pagedlm.sampling_params import SamplingParams
    from pagedlm.tokenizer import apply_chat_template

    text = apply_chat_template(engine.tokenizer, MESSAGES, True)
    ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    so = {"json": SCHEMA} if constrained else None
    for i in range(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", None, SamplingParams(
            temperature=0.0, max_tokens=tokens, ignore_eos=not constrained,
            structured_outputs=so), prompt_token_ids=ids)
    decode_time, decode_tokens = 0.0, 0
    while engine.has_unfinished_requests():
        before = engine.stats["prefill_tokens"], engine.stats["generation_tokens"]
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if engine.stats["prefill_tokens"] == before[0]:
            decode_time += dt
            decode_tokens += engine.stats["generation_tokens"] - before[1]
    return decode_time, decode_tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args(argv)
    from pagedlm.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(enforce_eager=args.eager, max_num_seqs=max(args.batch),
                                    kv_cache_memory=256 << 20))
    print(machine(), "compiled" if not args.eager else "eager")
    print("| batch | unconstrained tok/s | constrained tok/s | cost | grammar us/token: fill, apply, advance |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        run(engine, batch, 8, False)  # warm-up: compiles this batch's bucket, builds the grammar tables
        run(engine, batch, 8, True)
        timer = GrammarTimer(engine)
        best = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for constrained in (False, True):
                dt, n = run(engine, batch, args.tokens, constrained)
                best[constrained] = max(best[constrained], n / dt)
        per = {k: v / max(timer.rows, 1) * 1e6 for k, v in timer.t.items()}
        cost = 1 - best[True] / best[False]
        print(f"| {batch} | {best[False]:.1f} | {best[True]:.1f} | {cost:+.1%} | "
              f"{per['fill']:.0f}, {per['apply']:.0f}, {per['advance']:.0f} |")


if __name__ == "__main__":
    main()
