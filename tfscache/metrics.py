"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process
in tests).  Per-model labels only when the config asks for them: a fleet of thousands of
models would otherwise explode the series count."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, per_model_labels: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_model_labels = per_model_labels
        m = ("model",) if per_model_labels else ()
        r = self.registry
        # api: TF Serving's gRPC method name for both protocols (REST's /...:predict is
        # "Predict", its status call "GetModelStatus"); "unknown" for a REST path naming none
        self.requests = Counter("tfscache_requests", "Client requests by protocol, API and outcome",
                                ("protocol", "api", "code"), registry=r)
        self.request_seconds = Histogram("tfscache_request_seconds", "Client request latency",
                                         ("protocol", "api"), buckets=REQUEST_BUCKETS, registry=r)
        self.inflight = Gauge("tfscache_requests_in_flight", "Requests being served", registry=r)
        self.hits = Counter("tfscache_cache_hits", "Requests for a model already AVAILABLE",
                            m, registry=r)
        self.misses = Counter("tfscache_cache_misses", "Requests that had to wait for a load",
                              m, registry=r)
        self.fetches = _ModelLabelled(Counter("tfscache_fetches", "Copies from the model source",
                                              (*m, "outcome"), registry=r), per_model_labels)
        self.fetch_seconds = Histogram("tfscache_fetch_seconds", "Copy time from the model source",
                                       buckets=LOAD_BUCKETS, registry=r)
        self.fetch_bytes = Counter("tfscache_fetch_bytes", "Bytes copied from the model source", registry=r)
        self.loads = _ModelLabelled(Counter("tfscache_loads", "Loads into TF Serving", (*m, "outcome"),
                                            registry=r), per_model_labels)
        self.load_seconds = Histogram("tfscache_load_seconds", "Load time in TF Serving until AVAILABLE",
                                      buckets=LOAD_BUCKETS, registry=r)
        self.load_failures = Counter("tfscache_load_failures", "Failed fetches or loads", m,
                                     registry=r)
        self.unloads = _ModelLabelled(Counter("tfscache_unloads", "Models unloaded from TF Serving",
                                              (*m, "reason"), registry=r), per_model_labels)
        self.disk_evictions = Counter("tfscache_disk_evictions", "Model versions deleted from disk", registry=r)
        self.disk_evicted_bytes = Counter("tfscache_disk_evicted_bytes", "Bytes deleted from disk", registry=r)
        self.models_on_disk = Gauge("tfscache_models_on_disk", "Model versions in the disk cache", registry=r)
        self.bytes_on_disk = Gauge("tfscache_disk_bytes", "Bytes in the disk cache", registry=r)
        self.models_loaded = Gauge("tfscache_models_loaded", "Model versions AVAILABLE in TF Serving", registry=r)
        self.bytes_loaded = Gauge("tfscache_loaded_bytes_estimate",
                                  "Estimated memory of the loaded models (size x memory factor)", registry=r)
        # reason: the room that ran out, TF Serving's (serving.max_models / max_bytes) or the
        # disk cache's (disk_cache.capacity_bytes)
        self.rejected = Counter("tfscache_capacity_rejections",
                                "Loads refused with RESOURCE_EXHAUSTED for lack of room", ("reason",),
                                registry=r)
        self.reloads_after_not_found = Counter(
            "tfscache_reloads_after_not_found",
            "Requests that TF Serving answered NOT_FOUND for a model loaded here, which it had lost "
            "(it restarted empty): loaded again and sent once more", registry=r)
        self.loads_stuck = Gauge("tfscache_loads_stuck",
                                 "1 while a write of TF Serving's model list is held up by a load that has "
                                 "not finished: cold models go to other owners", registry=r)
        self.forwards = Counter("tfscache_router_forwards", "Requests forwarded by the router",
                                ("target", "outcome"), registry=r)
        self.retries = Counter("tfscache_router_retries", "Forwards retried on the next owner", registry=r)
        self.spill_overs = Counter("tfscache_router_spill_overs",
                                   "Requests passed to the next owner because an owner had no room "
                                   "for the model (RESOURCE_EXHAUSTED)", registry=r)
        self.members = Gauge("tfscache_discovery_members", "Live members known to this node", registry=r)
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        self._request_histograms: dict[tuple[str, str], Any] = {}
        self._forward_counters: dict[tuple[str, str], Any] = {}

    # Per-request updates with labels: a child looked up once per label set (``labels()``
    # takes a lock and validates the labels on every call; profiled on the warm path).
    def request_done(self, protocol: str, api: str, code: str, seconds: float) -> None:
        key = (protocol, api, code)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(protocol=protocol, api=api, code=code)
        counter.inc()
        histogram = self._request_histograms.get(key[:2])
        if histogram is None:
            histogram = self._request_histograms[key[:2]] = self.request_seconds.labels(protocol=protocol, api=api)
        histogram.observe(seconds)

    def forward_done(self, target: str, outcome: str) -> None:
        key = (target, outcome)
        counter = self._forward_counters.get(key)
        if counter is None:
            counter = self._forward_counters[key] = self.forwards.labels(target=target, outcome=outcome)
        counter.inc()

    def model(self, counter: Counter, name: str) -> Counter:
        return counter.labels(model=name) if self.per_model_labels else counter

    # copies, loads and unloads: labelled by model too when per_model_labels is on
    def fetch_done(self, name: str, outcome: str) -> None:
        self.fetches.labels(model=name, outcome=outcome).inc()

    def load_done(self, name: str, outcome: str) -> None:
        self.loads.labels(model=name, outcome=outcome).inc()

    def unload_done(self, name: str, reason: str) -> None:
        self.unloads.labels(model=name, reason=reason).inc()


class _ModelLabelled:
    """A counter with a ``model`` label only when per-model labels are on: ``labels(model=...,
    outcome=...)`` drops the model otherwise.  A caller that does not name the model counts
    under ``model=""`` instead of failing (prometheus_client refuses a missing label)."""

    def __init__(self, counter: Counter, per_model: bool) -> None:
        self.counter, self.per_model = counter, per_model

    def labels(self, model: str = "", **labels: str) -> Any:
        if self.per_model:
            return self.counter.labels(model=model, **labels)
        return self.counter.labels(**labels)
