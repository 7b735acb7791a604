"""`ServerMetrics`: the counters and histograms of one server, named after vLLM's (`kodkod:`).

Recording happens outside the engine thread, once per request (and once per batch of tokens a
consumer takes, for inter-token latency): `track()` attaches a tap to a request's stream,
which sees the events as the HTTP side consumes them. Generation tokens are counted as their
batches arrive (so a dashboard's tokens/s moves while replies stream); at the request's
`FinishEvent` the token counters have grown by exactly what its `usage` reports (prompt,
completion, cached prompt tokens, drafted and accepted draft tokens) and each request
histogram gets one observation — the prompt figures once per prompt, from its first choice,
as the answer's `usage` has them (n>1 choices share the prompt); the timings come from the
engine's clock (`Usage`): time to first token and end-to-end latency from the request's
arrival at the engine, queue time until it first ran. A request whose client left before its
end reported no usage and counts only the tokens it streamed (it counts as `client_disconnect`
in `kodkod:request_errors_total`, see `http.py`).

Gauges and engine-side counters (running/waiting requests, KV use, host-tier saves and
restores) are read from the engine's published `EngineStats` when Prometheus scrapes
(`collector.py`): the engine thread records nothing for metrics.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kodkod.api.metrics.collector import EngineCollector
from kodkod.api.metrics.histogram import TokenGapHistogram
from kodkod.core.types import ErrorEvent, ErrorKind, Event, FinishEvent, TokenEvent
from kodkod.engine.stream import RequestStream
from kodkod.models.manager import ModelManager

PREFIX = "kodkod:"

# Bucket bounds follow vLLM's (so dashboards built for it read these unchanged).
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
MAX_TOKEN_BUCKET = 1_000_000  # token histograms: 1, 2, 5, 10, 20, 50, ... up to this


def one_two_five_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... while <= limit (vLLM's token histogram buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class ErrorReason(str, enum.Enum):
    """The `reason` label of `kodkod:request_errors_total`."""

    BAD_REQUEST = "bad_request"  # a 4xx answer (not 401/403/429), or an engine refusal
    OVERLOAD = "overload"  # 429: the waiting queue is full
    CLIENT_DISCONNECT = "client_disconnect"  # the client left before its answer ended
    ENGINE = "engine"  # a 5xx answer, or the engine failed the generation


def reason_of_error_event(ev: ErrorEvent) -> ErrorReason:
    if ev.kind in (ErrorKind.BAD_REQUEST, ErrorKind.CONTEXT_LENGTH):
        return ErrorReason.BAD_REQUEST
    return ErrorReason.ENGINE


@dataclass(slots=True)
class RequestOutcome:
    """What the generations of one HTTP request reported (set by their taps, read by the
    HTTP middleware when the exchange ends)."""

    error: ErrorReason | None = None


class ServerMetrics:
    """Every metric of one server, in its own registry (nothing global)."""

    def __init__(self, models: ModelManager) -> None:
        self.registry = CollectorRegistry()
        self._models = models
        reg, model = self.registry, ["model_name"]

        def counter(name: str, doc: str, labels: list[str] = model) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, model, registry=reg, buckets=buckets)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests (usage).")
        self.generation_tokens = counter(
            "generation_tokens", "Generated tokens, counted as they stream (a finished request: its usage)."
        )
        self.request_success = counter(
            "request_success", "Requests that finished, by finish reason.", ["model_name", "finished_reason"]
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (usage prompt_tokens)."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache (usage cached_tokens)."
        )
        self.spec_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Speculative decoding: tokens drafted (usage)."
        )
        self.spec_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Speculative decoding: drafted tokens accepted (usage)."
        )
        self.embeddings_inputs = counter("embeddings_inputs", "Inputs embedded by the embeddings API.")
        self.request_errors = counter(
            "request_errors", "Failed requests by kind of failure.", ["model_name", "reason"]
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time from reaching the engine to the first token.", TTFT_BUCKETS_S
        )
        self.itl = TokenGapHistogram(  # observed per token: a lock-free histogram (histogram.py)
            PREFIX + "inter_token_latency_seconds",
            "Time between tokens as the consumer received them.",
            ITL_BUCKETS_S,
        )
        reg.register(self.itl)
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Time from reaching the engine to the end of the request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request waited before it first ran.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        token_buckets = one_two_five_buckets(MAX_TOKEN_BUCKET)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", token_buckets
        )
        self.registry.register(EngineCollector(models, PREFIX))

    # -- recording -------------------------------------------------------------------------

    def track(
        self, stream: RequestStream, model_name: str, outcome: RequestOutcome | None, *, counts_prompt: bool
    ) -> None:
        """Record `stream`'s request as its consumer takes its events. `counts_prompt`: its
        prompt is the one the answer's usage reports (the first choice of an HTTP request; the
        others share or follow it and their prompts are not in `usage`)."""
        stream.add_tap(RequestTap(self, model_name, outcome, counts_prompt))

    def record_finish(
        self, model_name: str, ev: FinishEvent, *, counts_prompt: bool = True, streamed_tokens: int = 0
    ) -> None:
        """A finished request. `streamed_tokens`: generation tokens already counted as they
        arrived (the counter is live, like vLLM's); the rest of `usage` is added now."""
        u = ev.usage
        if counts_prompt:
            self.prompt_tokens.labels(model_name).inc(u.prompt_tokens)
            self.prefix_cache_queries.labels(model_name).inc(u.prompt_tokens)
            self.prefix_cache_hits.labels(model_name).inc(u.cached_tokens)
            self.request_prompt_tokens.labels(model_name).observe(u.prompt_tokens)
        if u.completion_tokens > streamed_tokens:
            self.generation_tokens.labels(model_name).inc(u.completion_tokens - streamed_tokens)
        if u.drafted_tokens:
            self.spec_draft_tokens.labels(model_name).inc(u.drafted_tokens)
            self.spec_accepted_tokens.labels(model_name).inc(u.accepted_draft_tokens)
        self.request_success.labels(model_name, ev.reason.value).inc()
        self.ttft.labels(model_name).observe(u.prompt_time_s)
        self.e2e.labels(model_name).observe(u.prompt_time_s + u.completion_time_s)
        self.queue_time.labels(model_name).observe(u.queue_time_s)
        self.request_generation_tokens.labels(model_name).observe(u.completion_tokens)

    def record_error(self, reason: ErrorReason, model_name: str | None = None) -> None:
        """One failed request; `model_name` defaults to the loaded model's ("" without one)."""
        if model_name is None:
            current = self._models.current
            model_name = current.name if current is not None else ""
        self.request_errors.labels(model_name, reason.value).inc()

    def record_embeddings(self, model_name: str, num_inputs: int) -> None:
        """The embeddings API embedded `num_inputs` inputs with `model_name`."""
        self.embeddings_inputs.labels(model_name).inc(num_inputs)

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """Everything in the Prometheus text format."""
        return generate_latest(self.registry)


class RequestTap:
    """Sees one request's event batches on the consumer's event loop."""

    __slots__ = (
        "_metrics",
        "_model",
        "_outcome",
        "_counts_prompt",
        "_gaps",
        "_last_token_s",
        "_generated",
        "_counted",
    )

    def __init__(
        self, metrics: ServerMetrics, model_name: str, outcome: RequestOutcome | None, counts_prompt: bool
    ) -> None:
        self._metrics = metrics
        self._model = model_name
        self._outcome = outcome
        self._counts_prompt = counts_prompt
        self._gaps = metrics.itl.series(model_name)
        self._last_token_s = 0.0  # when the previous batch with tokens arrived
        self._generated = metrics.generation_tokens.labels(model_name)
        self._counted = 0  # generation tokens counted as they arrived

    def __call__(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, TokenEvent):
                self._tokens(len(ev.token_ids))
            elif isinstance(ev, FinishEvent):
                self._metrics.record_finish(
                    self._model, ev, counts_prompt=self._counts_prompt, streamed_tokens=self._counted
                )
            elif self._outcome is not None:
                if self._outcome.error is None:
                    self._outcome.error = reason_of_error_event(ev)
            else:
                self._metrics.record_error(reason_of_error_event(ev), self._model)

    def _tokens(self, n: int) -> None:
        if n <= 0:
            return
        self._generated.inc(n)  # live, so a dashboard's rate moves while replies stream
        self._counted += n
        now = time.perf_counter()
        if self._last_token_s:
            # n tokens arrived together: spread the wait over them (a reader that lags gets
            # merged batches; each token still counts once)
            self._gaps.observe((now - self._last_token_s) / n, n)
        self._last_token_s = now
