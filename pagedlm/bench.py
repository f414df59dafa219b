"""Offline throughput benchmark on a synthetic workload (the shape of nano-vllm's bench.py).

N requests with prompt and output lengths drawn uniformly from given ranges (fixed seed),
random token ids as prompts, ``ignore_eos`` so every request generates exactly its length.
All are submitted at t=0; the engine steps until done. Token arrival times are recorded per
request for TTFT and inter-token latency.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass


@dataclass
class BenchConfig:
    num_requests: int = 64
    input_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (32, 256)
    seed: int = 0
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")


def copy_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """The machine's memory bandwidth in GB/s as a large ``copy_`` reaches it (bytes read plus
    bytes written, best of ``repeats``): the roofline every decode figure is set against."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def decode_step_bytes(model) -> int:
    """Bytes of weights one decode step reads from memory, as stored for the decode kernels
    (packed int4 / int8 and their scales, or the dense weight): every linear layer and the output
    head once per step whatever the number of rows; embedding lookups, norms and the KV cache
    (small at short context) are not counted."""
    from pagedlm.model.layers.linear import LinearBase, VocabParallelEmbedding

    def nbytes(t) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    head = getattr(model, "lm_head", None)
    if head is None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head = model.model.embed_tokens
    total = 0
    for mod in model.modules():
        if isinstance(mod, LinearBase):
            method = mod.quant_method
        elif isinstance(mod, VocabParallelEmbedding) and mod is head:
            method = mod.head_method
        else:
            continue
        q = getattr(method, "qweight", None)
        if q is None:
            total += nbytes(mod.weight)
        else:  # the kernel's own scales where it has them
            total += nbytes(q.packed) + nbytes(q.kernel_scales if q.kernel is not None else q.scales)
    return total


def roofline(eng, report: dict) -> dict:
    """The decode roofline: copy bandwidth / bytes a step reads = the most decode steps per
    second memory allows (a step serves every running sequence, so batch-1 decode is capped at
    that many tokens/s); the measured step rate (1 / ITL p50) as a share of it."""
    model = getattr(getattr(eng, "runner", None), "model", None)
    step_bytes = decode_step_bytes(model) if model is not None else 0
    if not step_bytes:  # no local model (a distributed runner) or none of pagedlm's layers
        return {}
    bw = copy_bandwidth_gbps()
    max_steps = bw * 1e9 / step_bytes
    steps = 1e3 / report["itl_p50_ms"] if report.get("itl_p50_ms", 0) > 0 else float("nan")
    return {"copy_bandwidth_GBps": bw, "decode_step_bytes": step_bytes, "roofline_steps_per_s": max_steps,
            "decode_steps_per_s": steps, "roofline_pct": 100 * steps / max_steps}


def make_workload(cfg: BenchConfig, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(cfg.seed)
    work = []
    for _ in range(cfg.num_requests):
        n_in = rng.randint(*cfg.input_len)
        n_out = rng.randint(*cfg.output_len)
        # Skip the first ids: they are often special tokens.
        work.append(([rng.randint(100, vocab_size - 1) for _ in range(n_in)], n_out))
    return work


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_workload(eng, work: list[tuple[list[int], int]], tag: str = "bench") -> dict:
    from pagedlm.sampling_params import SamplingParams

    t0 = time.perf_counter()
    arrivals: dict[str, list[float]] = {}
    for i, (ids, n_out) in enumerate(work):
        rid = f"{tag}-{i}"
        eng.add_request(rid, None, SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True),
                        prompt_token_ids=ids, arrival_time=t0)
        arrivals[rid] = []
    steps = 0
    produced: dict[str, int] = {}
    errors: dict[str, str] = {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            if o.request_id in arrivals:
                arrivals[o.request_id].extend([now] * len(o.outputs[0].token_ids_delta))
                if o.finished:
                    produced[o.request_id] = len(o.outputs[0].token_ids)
                    if o.error is not None or o.outputs[0].finish_reason == "error":
                        errors[o.request_id] = o.error or "finish_reason error"
    wall = time.perf_counter() - t0
    ttft = [a[0] - t0 for a in arrivals.values() if a]
    itl = [b - a for times in arrivals.values() for a, b in zip(times, times[1:])]
    n_in = sum(len(ids) for ids, _ in work)
    # Throughput counts the tokens produced, not the ones asked for: a failed request gets no
    # credit for what it did not generate (and the run reports it: see BenchFailure).
    n_out = sum(produced.values())
    return {
        "requests": len(work), "failed_requests": len(errors), "errors": sorted(set(errors.values()))[:3],
        "requested_output_tokens": sum(n for _, n in work),
        "prompt_tokens": n_in, "output_tokens": n_out, "wall_s": wall, "steps": steps,
        "requests_per_s": len(work) / wall, "output_tokens_per_s": n_out / wall,
        "total_tokens_per_s": (n_in + n_out) / wall,
        "ttft_mean_ms": statistics.fmean(ttft) * 1e3, "ttft_p50_ms": _pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": _pct(ttft, 0.99) * 1e3,
        "itl_mean_ms": (statistics.fmean(itl) * 1e3) if itl else float("nan"),
        "itl_p50_ms": _pct(itl, 0.5) * 1e3, "itl_p99_ms": _pct(itl, 0.99) * 1e3,
        "itl_max_ms": max(itl) * 1e3 if itl else float("nan"),  # the longest stall a stream saw
    }


class BenchFailure(RuntimeError):
    """A benchmark run in which a request failed or produced fewer tokens than asked: its
    figures are not a measurement of the engine doing the work."""


def check_report(r: dict) -> None:
    """Raise ``BenchFailure`` when any request failed or a token asked for was not produced."""
    if r.get("failed_requests") or r["output_tokens"] != r.get("requested_output_tokens", r["output_tokens"]):
        raise BenchFailure(
            f"{r.get('failed_requests', 0)} of {r['requests']} requests failed; {r['output_tokens']} of "
            f"{r.get('requested_output_tokens')} output tokens produced"
            + (f"; errors: {'; '.join(r['errors'])}" if r.get("errors") else ""))


def run_bench(eng, cfg: BenchConfig) -> dict:
    vocab = eng.model_config.vocab_size
    if cfg.warmup:
        warm = BenchConfig(num_requests=cfg.warmup, input_len=(16, 32), output_len=(4, 8), seed=cfg.seed + 1)
        run_workload(eng, make_workload(warm, vocab), tag="warmup")
    report = run_workload(eng, make_workload(cfg, vocab))
    m = eng.get_metrics()
    report["preemptions"] = m["num_preemptions"]
    report.update(roofline(eng, report))
    report["config"] = {"num_requests": cfg.num_requests, "input_len": list(cfg.input_len),
                        "output_len": list(cfg.output_len), "seed": cfg.seed}
    return report


def format_report(r: dict) -> str:
    return "\n".join([
        f"requests: {r['requests']} ({r.get('failed_requests', 0)} failed)  prompt tokens: {r['prompt_tokens']}  "
        f"output tokens produced: {r['output_tokens']} of {r.get('requested_output_tokens', r['output_tokens'])}"
        f"  wall: {r['wall_s']:.2f} s  steps: {r['steps']}",
        f"throughput: {r['requests_per_s']:.2f} req/s, {r['output_tokens_per_s']:.1f} output tok/s, "
        f"{r['total_tokens_per_s']:.1f} total tok/s",
        f"TTFT ms: mean {r['ttft_mean_ms']:.0f}  p50 {r['ttft_p50_ms']:.0f}  p99 {r['ttft_p99_ms']:.0f}",
        f"ITL  ms: mean {r['itl_mean_ms']:.1f}  p50 {r['itl_p50_ms']:.1f}  p99 {r['itl_p99_ms']:.1f}",
        f"preemptions: {r.get('preemptions', 0)}",
        *([f"roofline: copy bandwidth {r['copy_bandwidth_GBps']:.1f} GB/s, a decode step reads "
           f"{r['decode_step_bytes'] / 1e6:.1f} MB of weights -> at most {r['roofline_steps_per_s']:.0f} steps/s "
           f"(batch-1: tok/s); decode ran {r['decode_steps_per_s']:.0f} steps/s (1 / ITL p50) = "
           f"{r['roofline_pct']:.0f}% of roofline"] if "roofline_pct" in r else []),
    ])
