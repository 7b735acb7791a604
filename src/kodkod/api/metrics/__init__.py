"""Prometheus metrics (`GET /metrics`): the service, its engine collector and error counting.

`ServerMetrics` (in `service.py`) owns one `CollectorRegistry` per app; `collector.py` reads the
engine's published stats at scrape time; `histogram.py` is the lock-free per-token histogram;
`http.py` counts failed HTTP requests by kind.
"""
