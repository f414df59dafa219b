"""xgrammar vs llguidance on SmolLM2's 49k vocabulary: the measurement that chose the library.

For each library: tokenizer set-up time, compile time per schema, and the per-token cost of a
constrained walk (fill the next-token bitmask, apply it to a row of logits, accept the drawn
token) over random logits — a random walk exercises every corner of the grammar, as a tiny
random model does. Each finished walk is parsed and validated with ``jsonschema``.

    PYTHONPATH=$PWD python -m benchmarks.bench_grammar_libs [--walks 3] [--max-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch

from tests.helpers import smollm2_path
from tests.structured_cases import SCHEMAS


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, mask) -> None:
        m.fill_next_token_bitmask(mask, 0)

    def accept(self, m, tok: int) -> bool:
        return m.accept_token(tok)

    def done(self, m) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict):
        g = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        err = self.ll.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return g

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def bitmask(self):
        return self.llt.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, mask) -> None:
        self.llt.fill_next_token_bitmask(m, mask, 0)

    def accept(self, m, tok: int) -> bool:
        return m.consume_token(tok)

    def done(self, m) -> bool:
        return m.is_stopped()


def apply(logits, mask) -> None:
    """pagedlm's bitmask kernel (the same for both libraries: only fill and accept differ)."""
    from pagedlm.engine.structured import apply_bitmask

    apply_bitmask(logits, mask)


def walk(lib, compiled, tok, vocab: int, eos: int, max_tokens: int, gen: torch.Generator):
    t = time.perf_counter()
    m = lib.matcher(compiled)
    mask = lib.bitmask()
    lib.fill(m, mask)  # the first mask builds lazy state: counted with the matcher's creation
    create = time.perf_counter() - t
    fill = applied = accept = 0.0
    ids: list[int] = []
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab, generator=gen)
        t0 = time.perf_counter()
        lib.fill(m, mask)
        t1 = time.perf_counter()
        apply(logits, mask)
        t2 = time.perf_counter()
        t = int(logits.argmax())
        if t == eos or not lib.accept(m, t):
            break
        t3 = time.perf_counter()
        fill, applied, accept = fill + t1 - t0, applied + t2 - t1, accept + t3 - t2
        ids.append(t)
        if lib.done(m):
            break
    return tok.decode(ids), len(ids), create, (fill, applied, accept)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args(argv)
    from pagedlm.tokenizer import load_tokenizer

    path = smollm2_path()
    tok = load_tokenizer(path, path)
    vocab = 49152
    for cls in (XGrammar, LLGuidance):
        t = time.perf_counter()
        lib = cls(tok, vocab)
        setup = time.perf_counter() - t
        compile_ms, create_ms, tokens, times, valid, total, failed = [], [], 0, [0.0, 0.0, 0.0], 0, 0, []
        for name, schema in SCHEMAS.items():
            t = time.perf_counter()
            try:
                compiled = lib.compile(schema)
            except Exception as e:  # a library that cannot compile a schema is a finding, not a crash
                failed.append(f"{name}: {type(e).__name__}: {str(e)[:80]}")
                continue
            compile_ms.append((time.perf_counter() - t) * 1e3)
            gen = torch.Generator().manual_seed(0)
            for _ in range(args.walks):
                text, n, create, (f, a, c) = walk(lib, compiled, tok, vocab, tok.eos_token_id, args.max_tokens, gen)
                tokens += n
                create_ms.append(create * 1e3)
                times = [times[0] + f, times[1] + a, times[2] + c]
                total += 1
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += 1
                except Exception as e:
                    failed.append(f"{name}: {type(e).__name__} on {text[:60]!r}")
        per = [x / max(tokens, 1) * 1e6 for x in times]
        print(f"{lib.name}: setup {setup:.2f} s; compile median {statistics.median(compile_ms):.1f} ms, "
              f"max {max(compile_ms):.1f} ms over {len(compile_ms)} schemas; matcher + first mask median "
              f"{statistics.median(create_ms):.2f} ms; {tokens} tokens: "
              f"fill {per[0]:.0f} us, apply {per[1]:.0f} us, accept {per[2]:.0f} us per token; "
              f"valid {valid}/{total}")
        for f in failed:
            print("   ", f)


if __name__ == "__main__":
    main()
