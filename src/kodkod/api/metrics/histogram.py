"""`TokenGapHistogram`: a histogram cheap enough to observe every token (inter-token latency).

prometheus_client's `Histogram.observe` takes a lock and costs microseconds; inter-token latency
is observed for every token the consumers take. This one keeps plain bucket counts per model
(observed and collected on the event loop only, so no lock) and is exposed through
prometheus_client as an ordinary histogram family at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class GapSeries:
    """One model's bucket counts (`counts[i]`: observations in bucket i, not cumulative)."""

    __slots__ = ("_bounds", "counts", "sum_s", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_s = 0.0
        self.count = 0

    def observe(self, value_s: float, times: int = 1) -> None:
        """`times` observations of `value_s` (an upper bound is inclusive, as Prometheus has it)."""
        self.counts[bisect.bisect_left(self._bounds, value_s)] += times
        self.sum_s += value_s * times
        self.count += times


class TokenGapHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = tuple(sorted(buckets))
        self._series: dict[str, GapSeries] = {}

    def series(self, model_name: str) -> GapSeries:
        found = self._series.get(model_name)
        if found is None:
            found = self._series[model_name] = GapSeries(self._bounds)
        return found

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=["model_name"])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=["model_name"])
        for model_name, s in self._series.items():
            cumulative, buckets = 0, []
            for bound, n in zip((*self._bounds, float("inf")), s.counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([model_name], buckets, s.sum_s)
        yield family
