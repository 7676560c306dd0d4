"""Every Prometheus object in one place, on a registry of our own (no global state).

Counters and histograms are fed by engine events (an EngineObserver); gauges and the adapter-tier
counters are read from live state at scrape time by a collector, so they can never drift.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..adapters.reloads import RELOAD_WINDOW_S
from .engine import EngineObserver, Sequence, StepStats
from .requests import Timing

log = logging.getLogger("loramux.requests")
OTHER = "other"
# CPU decode steps take tens of milliseconds, GPU steps a few: buckets span both.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class AdapterLabels:
    """Bounded label set: the first ``top`` adapters to be used get their own series (and keep it,
    so counters stay monotonic); every other adapter is counted under adapter="other"."""

    def __init__(self, top: int):
        self.top = top
        self._labelled: set[str] = set()

    def __call__(self, adapter_id: str | None) -> str:
        name = adapter_id or "base"
        if name in self._labelled:
            return name
        if len(self._labelled) < self.top:
            self._labelled.add(name)
            return name
        return OTHER


class Metrics(EngineObserver):
    def __init__(self, built, top_adapters: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.built = built
        self.labels = AdapterLabels(top_adapters)
        r = self.registry
        self.requests = Counter("loramux_requests", "Finished requests by status", ["status", "adapter"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r)
        self.generated_tokens = Counter("loramux_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.request_duration = Histogram("loramux_request_duration_seconds", "Arrival to last token",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("loramux_queue_duration_seconds", "Arrival to joining the batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loramux_inter_token_latency_seconds", "Time between the steps that give a request "
                             "tokens (kept speculative drafts come with the step's token, as vLLM counts)",
                             buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("loramux_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram("loramux_step_duration_seconds", "Engine step time", buckets=STEP_BUCKETS,
                                       registry=r)
        self.adapter_load = Histogram("loramux_adapter_load_seconds", "Adapter load time into a tier", ["tier"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.dynamic_adapters = Counter(
            "loramux_dynamic_adapters", "Adapters registered on first use (--dynamic-adapters), by event: registered, "
            "evicted (unregistered to make room), failed", ["event"], registry=r)
        r.register(_LiveCollector(built))
        built.engine.observers.append(self)
        built.manager.on_load = lambda tier, s: self.adapter_load.labels(tier).observe(s)

    def watch_responses(self, store) -> None:
        """Gauges of the Responses API's kept responses (server/response_store.py), read at scrape time."""
        Gauge("loramux_responses_kept", "Responses API responses kept (previous_response_id, "
              "GET /v1/responses/{id})", registry=self.registry).set_function(lambda: len(store))
        Gauge("loramux_responses_kept_bytes", "Their bytes as JSON, at most --responses-store-bytes",
              registry=self.registry).set_function(lambda: store.bytes)
        Gauge("loramux_responses_in_progress", "Background responses kept queued or being generated",
              registry=self.registry).set_function(lambda: store.unfinished)

    def rejected(self, status: str, adapter_id: str | None) -> None:
        """A request refused before admission (bad argument, unknown adapter, full queue...).
        Labels come only from registered ids: a client's unvalidated id never becomes a series."""
        registered = adapter_id is None or adapter_id in self.built.registry
        self.requests.labels(status, self.labels(adapter_id) if registered else OTHER).inc()

    def dynamic(self, event: str) -> None:
        self.dynamic_adapters.labels(event).inc()

    def step(self, stats: StepStats) -> None:
        self.batch_size.observe(stats.num_seqs)
        self.step_duration.observe(stats.seconds)

    def token(self, seq: Sequence, gap_seconds: float | None) -> None:
        if gap_seconds is not None:
            self.itl.observe(gap_seconds)
        # as each is sampled (vLLM's generation_tokens too), so a scrape sees long generations move
        self.generated_tokens.labels(self.labels(seq.request.adapter_id)).inc()

    def finish(self, seq: Sequence, status: str, error: BaseException | None, timing: Timing) -> None:
        adapter = self.labels(seq.request.adapter_id)
        self.requests.labels(status, adapter).inc()
        self.prompt_tokens.labels(adapter).inc(seq.num_prompt)
        self.request_duration.observe(timing.total_seconds)
        if seq.admitted_at is not None:
            self.queue_duration.observe(timing.queue_seconds)
        if seq.first_token_at is not None:
            self.ttft.observe(timing.time_to_first_token_seconds)


class RequestLog(EngineObserver):
    """One structured log line per finished request, with the timing its response carries."""

    def finish(self, seq: Sequence, status: str, error: BaseException | None, timing: Timing) -> None:
        req = seq.request
        log.info(
            "request %s adapter=%s status=%s prompt_tokens=%d completion_tokens=%d total_seconds=%.3f",
            req.request_id, req.adapter_id or "-", status, seq.num_prompt, seq.num_generated, timing.total_seconds,
            extra={"fields": {
                "request_id": req.request_id, "adapter": req.adapter_id, "status": status,
                "prompt_tokens": seq.num_prompt, "completion_tokens": seq.num_generated,
                **dataclasses.asdict(timing), "error": str(error) if error else None,
            }},
        )


class _LiveCollector:
    """Gauges and tier counters read from engine and adapter state at scrape time."""

    def __init__(self, built):
        self.built = built
        self._lora_state = None  # (running, waiting) adapter sets at the last change
        self._lora_changed_at = time.time()

    def collect(self):
        engine, manager = self.built.engine, self.built.manager
        running, waiting = engine.adapter_ids()
        num_running, num_waiting = engine.counts()
        kv_usage = engine.blocks.usage()
        yield GaugeMetricFamily("loramux_running_requests", "Requests in the batch", value=num_running)
        yield GaugeMetricFamily("loramux_waiting_requests", "Requests queued", value=num_waiting)
        yield GaugeMetricFamily("loramux_kv_cache_usage_ratio", "Share of KV blocks held by running requests "
                                "(cached blocks nothing references count as free)", value=kv_usage)
        yield CounterMetricFamily("loramux_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                  value=engine.prefix_queried_tokens)
        yield CounterMetricFamily("loramux_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=engine.prefix_hit_tokens)
        yield CounterMetricFamily("loramux_spec_decode_draft_tokens", "Speculative draft tokens run "
                                  "(--num-speculative-tokens)", value=engine.draft_tokens)
        yield CounterMetricFamily("loramux_spec_decode_accepted_tokens", "Speculative draft tokens kept: each saves "
                                  "a decode step", value=engine.accepted_tokens)
        yield GaugeMetricFamily("loramux_cached_states", "Recurrent states cached for prefix-cache hits (a model with "
                                "recurrent layers; at most --max-cached-states)",
                                value=len(engine.state_cache) if engine.state_cache is not None else 0)
        yield GaugeMetricFamily("loramux_cached_answer_states", "Of loramux_cached_states, those decode steps cached "
                                "at answers' blocks and no hit has used yet (at most half of a full cache)",
                                value=engine.state_cache.num_answers if engine.state_cache is not None else 0)
        yield GaugeMetricFamily("loramux_step_token_budget", "Token budget of the last step: --max-tokens-per-step, "
                                "or what --target-step-ms left of it", value=engine.step_token_budget)
        graphs = engine.runner.graphs
        yield CounterMetricFamily("loramux_decode_graph_steps", "Decode steps replayed from a CUDA graph "
                                  "(--cuda-graphs; on a CPU with on, steps of the same static path)",
                                  value=0 if graphs is None else graphs.steps)
        yield CounterMetricFamily("loramux_preemptions", "Running requests preempted: for KV memory, an adapter's fair "
                                  "share or a request of higher priority",
                                  value=engine.num_preemptions)
        # The names the Gateway API Inference Extension's endpoint picker reads (its model-server
        # protocol), with the same KV definition as loramux_kv_cache_usage_ratio.
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the batch", value=num_running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued", value=num_waiting)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Share of KV blocks held by running requests (0-1)",
                                value=kv_usage)
        yield GaugeMetricFamily("loramux_adapter_pins", "Adapter pins held by running requests",
                                value=manager.pool.total_pins())
        counters = manager.tier_counters()
        for name, attr, doc in (("hits", "hits", "found in the tier"), ("misses", "misses", "not found in the tier"),
                                ("evictions", "evictions", "evicted from the tier")):
            fam = CounterMetricFamily(f"loramux_adapter_cache_{name}", f"Adapter lookups {doc}", labels=["tier"])
            for tier, c in counters.items():
                fam.add_metric([tier], getattr(c, attr))
            yield fam
        reloads = CounterMetricFamily("loramux_adapter_reloads", "Adapters loaded into the tier again within "
                                      f"{RELOAD_WINDOW_S:g} s of their eviction from it (thrash)", labels=["tier"])
        for tier, c in counters.items():
            reloads.add_metric([tier], c.reloads)
        yield reloads
        yield GaugeMetricFamily("loramux_adapters_kept_resident", "Registered adapters kept resident on request "
                                "(keep_resident, --keep-resident)", value=manager.num_kept())
        saved = manager.registry.saved
        yield GaugeMetricFamily("loramux_saved_modules", "Adapters' fully trained token embeddings and lm_heads held "
                                "(modules_to_save; --max-saved-modules)", value=len(saved))
        yield GaugeMetricFamily("loramux_saved_module_bytes", "Bytes of the fully trained modules held",
                                value=saved.nbytes)
        resident = manager.resident()
        count = GaugeMetricFamily("loramux_adapters_resident", "Adapters resident per tier", labels=["tier"])
        size = GaugeMetricFamily("loramux_adapter_memory_bytes", "Adapter bytes resident per tier", labels=["tier"])
        for tier, (n, nbytes) in resident.items():
            count.add_metric([tier], n)
            size.add_metric([tier], nbytes)
        yield count
        yield size
        labels = {"running_lora_adapters": ",".join(sorted(running)), "waiting_lora_adapters": ",".join(sorted(waiting)),
                  "max_lora": str(engine.config.max_adapters_per_step or engine.config.max_device_adapters)}
        state = (labels["running_lora_adapters"], labels["waiting_lora_adapters"])
        if state != self._lora_state:  # the value is when the adapter sets last changed, as the protocol says
            self._lora_state, self._lora_changed_at = state, time.time()
        # The same series under the name the Gateway API Inference Extension reads from vLLM.
        for name in ("loramux_lora_requests_info", "vllm:lora_requests_info"):
            fam = GaugeMetricFamily(name, "Running and waiting LoRA adapters (adapter affinity); the value is the "
                                    "time they last changed", labels=list(labels))
            fam.add_metric(list(labels.values()), self._lora_changed_at)
            yield fam
