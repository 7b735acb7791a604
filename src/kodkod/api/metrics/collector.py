"""`EngineCollector`: the engine's gauges and counters, read from its published `EngineStats`
when Prometheus scrapes (a prometheus_client custom collector: nothing is recorded per step).

Engine-side counters (host-tier saves and restores, preemptions) belong to one loaded engine:
they start at zero with each model load, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kodkod.engine.stats import EngineStats
from kodkod.models.manager import ModelManager


def kv_usage_fraction(stats: EngineStats) -> float:
    """Share of the KV cells held by requests (0..1); idle cached prefixes count as free, as
    they are evicted whenever a request needs the room."""
    if stats.kv_capacity <= 0:
        return 0.0
    used = stats.kv_capacity - stats.free_cells - stats.idle_cells
    return min(1.0, max(0.0, used / stats.kv_capacity))


class EngineCollector(Collector):
    def __init__(self, models: ModelManager, prefix: str) -> None:
        self._models = models
        self._prefix = prefix

    def _families(self) -> list[Metric]:
        p, labels = self._prefix, ["model_name"]
        return [
            GaugeMetricFamily(p + "num_requests_running", "Requests in the running batch.", labels=labels),
            GaugeMetricFamily(p + "num_requests_waiting", "Requests waiting to run.", labels=labels),
            GaugeMetricFamily(
                p + "kv_cache_usage_perc", "Fraction of KV cells held by requests (1 = all).", labels=labels
            ),
            GaugeMetricFamily(
                p + "kv_cache_cached_tokens", "KV cells holding idle cached prefixes.", labels=labels
            ),
            GaugeMetricFamily(
                p + "host_cache_bytes", "Bytes of KV kept in the host-RAM tier.", labels=labels
            ),
            CounterMetricFamily(
                p + "host_cache_saves", "Prefixes saved to the host-RAM tier (this load).", labels=labels
            ),
            CounterMetricFamily(
                p + "host_cache_restores",
                "Prefixes restored from the host-RAM tier (this load).",
                labels=labels,
            ),
            CounterMetricFamily(
                p + "num_preemptions", "Requests preempted for room (this load).", labels=labels
            ),
        ]

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        model = self._models.current
        if model is not None:
            s = model.engine.stats
            values: list[float] = [
                s.running,
                s.waiting,
                kv_usage_fraction(s),
                s.cached_tokens,
                s.host_cache_bytes,
                s.host_cache_saves,
                s.host_cache_restores,
                s.preemptions,
            ]
            for family, value in zip(families, values, strict=True):
                family.add_metric([model.name], value)  # type: ignore[attr-defined]
        yield from families
