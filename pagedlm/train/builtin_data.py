"""A small instruction data set that pagedlm generates (no download, no licence question): short
tasks answered in one fixed, recognisable format, so a fine-tune's effect is visible in what the
served model writes, not only in the loss."""

from __future__ import annotations

import random

WORDS = ("apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon mango "
         "needle orange pepper quartz river silver tiger umbrella violet walnut yellow zebra anchor "
         "basket candle desert engine forest glacier hammer ivory jacket ladder marble nectar orbit "
         "pillow rocket saddle timber velvet window").split()


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    w = rng.choice(WORDS)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} plus {b}?", f"Answer: {a + b}"
    if kind == 1:
        return f"Reverse the word {w}.", f"Answer: {w[::-1]}"
    if kind == 2:
        return f"Write {w} in capital letters.", f"Answer: {w.upper()}"
    return f"How many letters does {w} have?", f"Answer: {len(w)}"


def builtin_records(n: int = 2000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = _task(rng)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "_where": f"builtin:{i + 1}"})
    return out
