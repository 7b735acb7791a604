"""The asyncio face of the engine: submit, abort, exclusive work, stats.

`submit()` validates a request synchronously (so the API can answer 400 before it commits to a
200 stream): context limits, and every token id it carries against the model's vocabulary (an
id outside it would make llama.cpp fail or read out of bounds). It refuses at once (503) while
the engine cannot serve (`problem`: fatal fault, dead thread, step stuck past the stall
timeout). Then it hands the request to the engine thread and returns a `RequestStream`. Closing
or abandoning the stream aborts the request within one step. A `Watchdog` thread reports an
engine that dies or stalls (`engine/watchdog.py`).

The client counts the requests it has submitted that have not ended (`in_flight`, exact, under
a lock: a request ends when its final event is pushed or its stream is closed); those beyond
`max_batch_size` are waiting for a place in the batch (`queued`), which the API bounds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from kodkod.core.types import GenerationRequest
from kodkod.engine.backend import Backend
from kodkod.engine.loop import EngineConfig, EngineLoop, EngineStats
from kodkod.engine.slots import EngineSlots
from kodkod.engine.stream import LoopWaker, RequestStream
from kodkod.engine.watchdog import Watchdog

T = TypeVar("T")
AdapterCheck = Callable[[tuple[tuple[str, float], ...]], None]


class RequestError(Exception):
    """A request that can never run (shown to the client as a 400, `status`)."""

    status = 400

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class EngineUnavailableError(RequestError):
    """The engine cannot serve requests now (fatal fault, dead thread, stuck step): a 503."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, "engine_unavailable")


class ContextLengthError(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "context_length_exceeded")


def check_token_ids(request: GenerationRequest, n_vocab: int) -> None:
    """RequestError naming the field and the first token id outside 0..n_vocab-1."""
    s = request.sampling
    fields: tuple[tuple[str, object], ...] = (
        ("prompt", request.prompt_ids),
        ("stop", request.stop_token_ids),
        ("logit_bias", s.logit_bias),
        ("banned_tokens", s.banned_token_ids),
        ("allowed_tokens", s.allowed_token_ids),
        ("negative_prompt", request.negative_prompt_ids or ()),
    )
    for name, ids in fields:
        if not ids or (min(ids) >= 0 and max(ids) < n_vocab):  # type: ignore[call-overload]
            continue
        bad = next(t for t in ids if not 0 <= t < n_vocab)  # type: ignore[attr-defined]
        raise RequestError(
            f"{name}: token id {bad} is not in this model's vocabulary (0..{n_vocab - 1})", param=name
        )


class EngineClient:
    def __init__(
        self,
        engine: EngineLoop,
        watchdog: Watchdog | None = None,
        adapter_check: AdapterCheck | None = None,
    ) -> None:
        self._engine = engine
        self._watchdog = watchdog
        # Checks a request's named LoRA adapters (raises RequestError); given by the model
        # manager (models/lora.py) so unknown or incompatible adapters are a 400 up front.
        self.adapter_check = adapter_check
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._waker: LoopWaker | None = None  # for the loop that submits (one per client)

    @classmethod
    def start(
        cls,
        backend: Backend,
        config: EngineConfig,
        on_fatal: Callable[[BaseException], None] | None = None,
        draft: Backend | None = None,
        adapter_check: AdapterCheck | None = None,
    ) -> EngineClient:
        """`draft`: a draft model's backend for speculative decoding (the caller frees it);
        `adapter_check`: checks the LoRA adapters a request names (raises RequestError)."""
        engine = EngineLoop(backend, config, on_fatal, draft)
        engine.start()
        watchdog = Watchdog(engine, on_fatal)
        watchdog.start()
        return cls(engine, watchdog, adapter_check)

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    @property
    def alive(self) -> bool:
        return self._engine.alive

    @property
    def problem(self) -> str | None:
        """Why the engine cannot serve requests now; None when it can."""
        return self._engine.problem()

    @property
    def in_flight(self) -> int:
        """Submitted requests (each choice is one) that have not ended."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests in flight beyond the batch's places: those waiting to run."""
        return max(0, self._in_flight - self._engine.config.max_batch_size)

    def _ended(self, _request_id: str) -> None:
        with self._count_lock:
            self._in_flight -= 1

    def check(self, request: GenerationRequest) -> None:
        """Raise RequestError if the request can never run, EngineUnavailableError (503) if
        the engine cannot run anything now."""
        problem = self._engine.problem()
        if problem is not None:
            raise EngineUnavailableError(f"the engine cannot serve requests: {problem}")
        n_prompt = len(request.prompt_ids)
        max_len = self._engine.config.max_seq_len
        if n_prompt == 0:
            raise RequestError("the prompt is empty (no tokens to start from)")
        if request.max_tokens is not None and request.max_tokens < 0:
            raise RequestError("max_tokens must be >= 0")
        wanted = n_prompt + (request.max_tokens or 0)
        if n_prompt >= max_len or wanted > max_len:
            extra = f" + {request.max_tokens} requested tokens" if request.max_tokens else ""
            raise ContextLengthError(
                f"This model's maximum context length is {max_len} tokens; the request has "
                f"{n_prompt} prompt tokens{extra} = {wanted if extra else n_prompt} tokens. "
                "Shorten the prompt or lower max_tokens."
            )
        if request.min_tokens and request.max_tokens is not None and request.min_tokens > request.max_tokens:
            raise RequestError("min_tokens must not exceed max_tokens")
        check_token_ids(request, self._engine.backend.info.n_vocab)
        if request.adapters and self.adapter_check is not None:
            self.adapter_check(request.adapters)

    async def prepare(self, request: GenerationRequest) -> None:
        """Check a request off the event loop when that can be slow (a LoRA adapter named for
        the first time may need a PEFT→GGUF conversion); then submit() is instant."""
        if request.adapters and self.adapter_check is not None:
            await asyncio.to_thread(self.adapter_check, request.adapters)

    def submit(self, request: GenerationRequest, *, stall_timeout_s: float | None = None) -> RequestStream:
        """`stall_timeout_s`: abort the request once its output sat unread that long."""
        self.check(request)
        loop = asyncio.get_running_loop()
        waker = self._waker
        if waker is None or waker.loop is not loop:  # the first submit (tests may use several loops)
            waker = self._waker = LoopWaker(loop)
            self._engine.add_waker(waker)
        stream = RequestStream(
            request.request_id,
            loop,
            self._engine.abort,
            on_end=self._ended,
            stall_timeout_s=stall_timeout_s,
            waker=waker,
        )
        with self._count_lock:
            self._in_flight += 1
        self._engine.submit(request, stream)
        return stream

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def slots(self, *, with_prompt: bool = False, timeout_s: float = 10.0) -> EngineSlots:
        """The engine's live sequences and cache, read on the engine thread between steps.

        The ask is answered when the engine next publishes its stats; an abort of a request id
        no request has ("") wakes an idle engine thread for that without touching anything.
        EngineUnavailableError when the engine cannot answer (stopped, or not within timeout_s).
        """
        if not self._engine.alive:
            raise EngineUnavailableError("the engine is not running")
        fut = self._engine.slots_probe.ask(with_prompt)  # the engine thread answers it at publish
        self._engine.abort("")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            raise EngineUnavailableError("the engine did not answer in time") from None

    async def run_exclusive(self, fn: Callable[[Backend], T], *, cancel_running: bool = False) -> T:
        """Run fn(backend) on the engine thread between steps, once nothing is running."""
        fut = self._engine.run_exclusive(fn, cancel_running=cancel_running)
        return await asyncio.wrap_future(fut)

    async def shutdown(self, message: str = "the model was unloaded") -> None:
        """End every request with an error event and stop the engine thread."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if not self._engine.alive:
            return
        await asyncio.wrap_future(self._engine.shutdown(message))
        await asyncio.to_thread(self._engine.join, 10.0)

    def close_backend(self) -> None:
        """Free the backend's C handles; only once the engine thread has stopped."""
        if self._engine.alive:
            raise RuntimeError("the engine is still running")
        self._engine.backend.close()

    def shutdown_sync(self, message: str, timeout_s: float = 10.0) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._engine.alive:
            self._engine.shutdown(message).result(timeout_s)
            self._engine.join(timeout_s)
