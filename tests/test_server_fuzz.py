"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis): valid and
invalid bodies for every operation, over real HTTP. No request may get a 5xx, and every 4xx
must carry the OpenAI error body."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from pagedlm.engine.async_engine import AsyncLLMEngine  # noqa: E402
from pagedlm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from pagedlm.server.app import ServerConfig, build_app  # noqa: E402
from tests.server_fixtures import ServerThread, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # A short context and few slots bound the work any generated request can ask for.
    engine = LLMEngine(EngineConfig(model=tiny_model_dir(tmp_path_factory), dtype="float32", kv_cache_memory=2 << 20,
                                    max_num_seqs=8, max_model_len=48, seed=0))
    aeng = AsyncLLMEngine(engine, max_waiting=64)
    app = build_app(aeng, ServerConfig(served_model_name="tiny", max_body_bytes=256 * 1024))
    with ServerThread(app, aeng) as srv:
        srv.engine = engine
        yield srv
    # Nothing left behind after hundreds of odd requests.
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.num_kv_blocks


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
              "GET /tokenizer_info", "GET /v1/models", "GET /health", "GET /metrics",
              "GET /v1/engine/state", "GET /v1/engine/blocks/{block_id}"]
EXAMPLES = {"POST /v1/completions": 15, "POST /v1/chat/completions": 25}


def error_body_is_openai_shaped(response) -> None:
    if 400 <= response.status_code < 600:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# These GET operations take no parameters: there is nothing invalid to send them, so they are
# fuzzed with valid requests only. (The engine-state stream never ends by itself: not fuzzed.)
NO_PARAMS = {"GET /tokenizer_info", "GET /v1/models", "GET /health", "GET /metrics"}
CASES = [(label, mode) for label in OPERATIONS for mode in ("positive", "negative")
         if not (mode == "negative" and label in NO_PARAMS)]


@pytest.mark.parametrize("label, mode", CASES)
def test_fuzz_no_server_errors(api_schema, fuzz_server, label, mode):
    from schemathesis.generation import GenerationMode

    ops = {r.ok().label: r.ok() for r in api_schema.get_all_operations()}
    assert set(OPERATIONS) <= set(ops), sorted(ops)
    op = ops[label]
    seen = []

    @settings(max_examples=EXAMPLES.get(label, 20), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case):
        response = case.call(base_url=fuzz_server.url, timeout=30)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        error_body_is_openai_shaped(response)

    run()
    assert seen
    if mode == "negative":
        assert any(400 <= s < 500 for s in seen)  # invalid bodies were really sent and refused
