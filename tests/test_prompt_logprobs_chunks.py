"""Prompt logprobs of a prompt prefilled in several chunks equal those of one chunk: every
chunk's last row scores the next chunk's first token (it was dropped, and every later chunk
then skipped, so a 249-token prompt under a 64-token budget returned 64 entries)."""

from __future__ import annotations

import pytest

from pagedlm import LLM, SamplingParams
from tests.helpers import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_plp")))


@pytest.mark.parametrize("budget", [16, 7])
def test_prompt_logprobs_across_chunks(tiny, budget):
    prompt = {"prompt_token_ids": [(13 * j) % 370 + 7 for j in range(53)]}
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)
    one = LLM(tiny, dtype="float32", max_num_batched_tokens=2048).generate([prompt], params, use_tqdm=False)[0]
    many = LLM(tiny, dtype="float32", max_num_batched_tokens=budget).generate([prompt], params, use_tqdm=False)[0]
    assert len(one.prompt_logprobs) == len(many.prompt_logprobs) == 53 and many.prompt_logprobs[0] is None
    for j, (a, b) in enumerate(zip(one.prompt_logprobs[1:], many.prompt_logprobs[1:]), 1):
        target = prompt["prompt_token_ids"][j]
        assert set(a) == set(b) and target in b, j
        assert b[target].logprob == pytest.approx(a[target].logprob, abs=1e-4), j
    assert one.outputs[0].token_ids == many.outputs[0].token_ids
