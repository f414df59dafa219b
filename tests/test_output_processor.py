"""The seam between the engine core and the output processor (engine/output_processor.py): the
core decides endings by token ids, the output processor owns text, stop strings, holdback,
deltas and logprobs, and its state never outlives a request."""

from __future__ import annotations

import pytest

from pagedlm import SamplingParams
from pagedlm.engine.engine import EngineConfig, LLMEngine, Request
from pagedlm.engine.faults import FaultInjector
from pagedlm.engine.output_processor import OutputProcessor
from pagedlm.engine.sequence import Finish, Sequence, SequenceStatus

# A toy vocabulary: ids decode to these strings; 9 is the first byte of "é" (it decodes to the
# replacement character until 10, its second byte, follows).
PIECES = {1: "a", 2: "b", 3: "<", 4: "/", 5: "s", 6: ">", 7: "!", 8: "<eos>", 9: "", 10: ""}


class ToyTokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        out, i = [], 0
        while i < len(ids):
            if ids[i] == 9:
                out.append("é" if i + 1 < len(ids) and ids[i + 1] == 10 else "\ufffd")
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 10 else 1
                continue
            out.append(PIECES[ids[i]])
            i += 1
        return "".join(out)


def _request(params: SamplingParams, rid: str = "r") -> tuple[OutputProcessor, Request, Sequence]:
    proc = OutputProcessor(ToyTokenizer())
    req = Request(rid, [1, 2], params, 0.0)
    req.seqs.append(Sequence(rid, req.prompt_ids, params))
    proc.add_request(req, "ab")
    return proc, req, req.seqs[0]


def _feed(proc, seq, tok, end=None, lp=None, top=None):
    """What the core does per token: append it, then hand it to the output processor."""
    seq.token_ids.append(tok)
    return proc.add_token(seq, tok, lp, top, end)


def test_stop_string_is_the_output_processors_decision_and_deltas_hold_it_back():
    proc, req, seq = _request(SamplingParams(stop=["</s>"]))
    streamed = ""
    for tok in (1, 3, 4):  # "a<": a prefix of the stop string is held back from the stream
        assert _feed(proc, seq, tok) is None
        out = proc.make_output(req)
        streamed += out.outputs[0].text_delta
        assert out.outputs[0].token_ids_delta == [tok]
    assert streamed == "a" and out.outputs[0].text == "a</"
    assert _feed(proc, seq, 5) is None
    assert _feed(proc, seq, 6) == "</s>"  # the core must finish the sequence with it
    seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, "stop", "</s>"
    out = proc.make_output(req)
    assert out.finished and out.outputs[0].text == "a" and out.outputs[0].text_delta == ""
    assert out.outputs[0].token_ids == [1, 3, 4, 5, 6] and out.outputs[0].token_ids_delta == [5, 6]
    assert proc.states == {}  # the state goes with the request's last output


def test_stop_string_overrides_the_cores_length_ending_without_flushing():
    proc, _, seq = _request(SamplingParams(stop=["b!"], include_stop_str_in_output=True))
    _feed(proc, seq, 2)
    assert _feed(proc, seq, 7, end=Finish("length")) == "b!"
    assert proc.states["r"].samples[0].text == "b!"


def test_core_endings_flush_or_skip_the_token_text():
    proc, _, seq = _request(SamplingParams())
    _feed(proc, seq, 1)
    _feed(proc, seq, 9)  # half a character: held back
    assert proc.states["r"].samples[0].text == "a"
    _feed(proc, seq, 8, end=Finish("stop", None, by_token=True))  # EOS never shows as text
    assert proc.states["r"].samples[0].text == "a"

    proc, _, seq = _request(SamplingParams())
    _feed(proc, seq, 1)
    _feed(proc, seq, 9, end=Finish("length"))  # the core ends it: the incomplete character is emitted
    assert proc.states["r"].samples[0].text == "a\ufffd"


def test_logprobs_recorded_per_token_even_for_a_stop_token():
    proc, req, seq = _request(SamplingParams(logprobs=1))
    _feed(proc, seq, 1, lp=(-0.5, 1), top=([1], [-0.5]))
    _feed(proc, seq, 8, end=Finish("stop", 8, by_token=True), lp=(-1.5, 2), top=([1], [-0.25]))
    s = proc.states["r"].samples[0]
    assert s.cum_logprob == -2.0 and s.text == "a"
    assert s.logprobs[1][8].logprob == -1.5 and s.logprobs[1][8].rank == 2 and s.logprobs[1][1].rank == 1
    assert proc.make_output(req).outputs[0].cumulative_logprob == -2.0


def test_sequence_state_is_typed():
    seq = Sequence("r", [1], SamplingParams())
    assert not hasattr(seq, "state")
    with pytest.raises(AttributeError):
        seq.detok = None  # output state does not live on the core's Sequence


def test_no_output_state_outlives_its_request(tiny_llama_dir):
    """Finished, aborted and failed requests all leave both the core's registry and the output
    processor's, and every KV block comes back."""
    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_kv_blocks=64, block_size=4))
    eng.fault_injector = FaultInjector(7, "sample")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=["zz"], logprobs=2)
    eng.add_request("done", None, params, prompt_token_ids=[5, 6, 8])
    eng.add_request("aborted", None, params, prompt_token_ids=[9, 10, 11])
    eng.add_request("failed", None, params, prompt_token_ids=[12, 7, 13])
    eng.add_request("n2", None, SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True,
                                               prompt_logprobs=1), prompt_token_ids=[14, 15, 16])
    assert set(eng.output.states) == {"done", "aborted", "failed", "n2"}
    finished = {o.request_id: o for o in eng.step() if o.finished}  # "failed" fails in its first step
    eng.abort_request("aborted")
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
    assert set(finished) == {"done", "failed", "n2"}
    assert finished["failed"].outputs[0].finish_reason == "error"
    assert finished["done"].outputs[0].finish_reason == "length" and len(finished["done"].outputs[0].logprobs) == 6
    assert [len(c.token_ids) for c in finished["n2"].outputs] == [4, 4]
    assert len(finished["n2"].prompt_logprobs) == 3
    assert not eng.requests and not eng.output.states
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_deltas_replayed_elsewhere_give_the_in_process_outputs(tiny_llama_dir):
    """A core that emits deltas (``emit_deltas``, as in a core process) and a ``DeltaProcessor``
    that hears of them a step late: the same outputs as the in-process engine, stop strings
    (text cut, tokens after them dropped in the core, blocks freed), logprobs, prompt logprobs,
    n > 1 and the streamed deltas included."""
    from pagedlm.engine.output_processor import DeltaProcessor

    cfg = EngineConfig(model=tiny_llama_dir, dtype="float32", num_kv_blocks=128, block_size=4, seed=0)
    ref, core = LLMEngine(cfg), LLMEngine(cfg)
    core.emit_deltas()
    api = DeltaProcessor(core.tokenizer)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = _run(ref, {"g": ([5, 6, 8], greedy)})[0]["g"].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    requests = {
        "stop": ([5, 6, 8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=2)),
        "kept": ([5, 6, 8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                           include_stop_str_in_output=True, prompt_logprobs=1)),
        "n3": ([9, 10, 11], SamplingParams(n=3, temperature=0.9, seed=3, max_tokens=16, ignore_eos=True,
                                           stop=["a", "e"], logprobs=1)),
        "plain": ([12, 7, 13], SamplingParams(temperature=0.7, seed=1, max_tokens=20, logprobs=0)),
    }
    want, want_streamed = _run(ref, requests)
    streamed: dict[tuple[str, int], str] = {}
    got = {}
    for rid, (ids, params) in requests.items():
        api.add(rid, None, ids, params)
        core.add_request(rid, None, params, prompt_token_ids=ids)
    late: list = []
    while core.has_unfinished_requests() or late:
        for d in late:  # last step's deltas, heard while the core ran this one
            out, stops = api.apply(d)
            for index, s, kept in stops:
                core.stop_sequence(d.request_id, index, s, kept)
            if out is not None:
                for c in out.outputs:
                    key = (out.request_id, c.index)
                    streamed[key] = streamed.get(key, "") + c.text_delta
                if out.finished:
                    got[out.request_id] = out
        late = core.step() if core.has_unfinished_requests() else []
    assert any(c.finish_reason == "stop" and c.stop_reason == stop for c in want["stop"].outputs)
    assert {c.finish_reason for c in want["n3"].outputs} >= {"stop"}
    for rid, w in want.items():
        g = got[rid]
        assert g.prompt_logprobs == w.prompt_logprobs and g.prompt_token_ids == w.prompt_token_ids
        assert g.metrics.num_generated_tokens == w.metrics.num_generated_tokens
        for a, b in zip(w.outputs, g.outputs, strict=True):
            assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, a.finish_reason,
                                                                            a.stop_reason), rid
            assert b.logprobs == a.logprobs and b.cumulative_logprob == a.cumulative_logprob
    assert streamed == want_streamed
    assert not core.requests and not core.output.states and not api.requests and not api.states
    assert core.block_manager.num_free_blocks == core.num_kv_blocks
    assert core.stats["generation_tokens"] == ref.stats["generation_tokens"] - 24  # the greedy probe's


def _run(engine: LLMEngine, requests: dict) -> tuple[dict, dict]:
    """The final outputs of in-process requests, and their streamed text per sample."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, None, params, prompt_token_ids=ids)
    done, streamed = {}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                streamed[(o.request_id, c.index)] = streamed.get((o.request_id, c.index), "") + c.text_delta
            if o.finished:
                done[o.request_id] = o
    return done, streamed
