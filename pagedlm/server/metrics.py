"""Prometheus metrics under vLLM's names (``vllm:...``), so vLLM dashboards work unchanged.

Each app owns a ``CollectorRegistry`` (never the process-global one), so several servers can
live in one process (tests). Engine state (running, waiting, KV usage, prefix cache, token
counters) is read from a snapshot of ``LLMEngine.get_metrics()`` taken on the engine thread
just before each scrape; latencies are histograms observed by the request handlers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)


class _EngineCollector:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot: dict = {}

    GAUGES = (("vllm:num_requests_running", "Sequences running in the engine.", "num_requests_running"),
              ("vllm:num_requests_waiting", "Sequences waiting for a slot.", "num_requests_waiting"),
              ("vllm:kv_cache_usage_perc", "KV cache usage, a fraction in [0, 1].", "kv_cache_usage"))
    COUNTERS = (("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
                ("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", "prefix_cache_hits"),
                ("vllm:num_preemptions", "Sequences preempted (recompute).", "num_preemptions"),
                ("vllm:prompt_tokens", "Prompt tokens admitted.", "prompt_tokens"),
                ("vllm:generation_tokens", "Tokens generated.", "generation_tokens"))

    SPEC_COUNTERS = (
        ("vllm:spec_decode_num_drafts", "Verification steps with proposed tokens.", "spec_decode_num_drafts"),
        ("vllm:spec_decode_num_draft_tokens", "Tokens proposed.", "spec_decode_num_draft_tokens"),
        ("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.", "spec_decode_num_accepted_tokens"))

    def collect(self):
        # Data-parallel replicas (server/replicas.py): one sample per replica, labelled
        # engine="i" as vLLM does; a single engine keeps the plain model_name label.
        replicas = self.snapshot.get("replicas")
        rows = ([([self.model_name, str(i)], s) for i, s in enumerate(replicas)] if replicas
                else [([self.model_name], self.snapshot)])
        names = ["model_name", "engine"] if replicas else ["model_name"]
        spec = any("spec_decode_num_drafts" in s for _, s in rows)  # speculative decoding is on
        counters = self.COUNTERS + (self.SPEC_COUNTERS if spec else ())
        for family, specs in ((GaugeMetricFamily, self.GAUGES), (CounterMetricFamily, counters)):
            for name, doc, key in specs:
                f = family(name, doc, labels=names)
                for labels, s in rows:
                    f.add_metric(labels, float(s.get(key, 0.0)))
                yield f
        if spec:
            c = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                    "Proposed tokens accepted, by position in the proposal.",
                                    labels=names + ["position"])
            for labels, s in rows:
                for pos, n in enumerate(s.get("spec_decode_num_accepted_tokens_per_pos", [])):
                    c.add_metric(labels + [str(pos)], float(n))
            yield c
        if any("core_restarts" in s for _, s in rows):  # engine cores in processes (core_process.py)
            c = CounterMetricFamily("pagedlm:engine_core_restarts", "Engine core processes started again after "
                                    "one died (serve --restart-core).", labels=names)
            for labels, s in rows:
                c.add_metric(labels, float(s.get("core_restarts", 0)))
            yield c
        if replicas:
            c = CounterMetricFamily("pagedlm:routed_requests", "Requests the router sent to each replica, by reason "
                                    "(prefix: it held the longest cached prefix; load: the least loaded).",
                                    labels=names + ["reason"])
            for labels, s in rows:
                for reason in ("prefix", "load"):
                    c.add_metric(labels + [reason], float(s.get(f"routed_by_{reason}", 0)))
            yield c


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = _EngineCollector(model_name)
        self.registry.register(self.engine)
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._success = Counter("vllm:request_success", "Requests finished, by reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.model_name = model_name

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self, snapshot: dict) -> bytes:
        self.engine.snapshot = snapshot
        return generate_latest(self.registry)
