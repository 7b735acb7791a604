"""The embedding service: one embedding model next to the chat model, loaded by name from
`embeddings.embedding_model_dir`, and the batched, fair work of embedding inputs.

A name is a folder (or a `.gguf` file) of the embedding folder. A folder holding a GGUF loads
it; a Hugging Face sentence-transformers folder is converted once (`models/hf_encoder.py`) and
the cached GGUF loads. Loading, tokenizing and closing run on one worker thread owned by the
service (not a lane's: a request is tokenized while the lanes run another's batches). A
request is tokenized first (an input over the model's limit is refused with the numbers,
before any batch runs), then packed into batches of the encoder's preferred size (within its
limits; both in `models/embedding_inputs.py`). The encoder runs several lanes side by side
(one context each; `lane_plan` splits the threads into lanes of one thread or more), each lane
on its own worker thread; closing waits for a running batch (the encoder's lane locks). A
request's batches go, in order, to whichever lane is free and their rows are written back by
position, so the output keeps the input order. A lane's thread keeps taking the request's next
batch itself (no hand-off through the event loop per batch) until none is left or the lane is
wanted elsewhere: while another request waits for a lane they interleave batch by batch. A
request whose client went away (its task cancelled) starts no further batch: only those
already running finish (`EmbeddingCounters` and a log line tell how many were skipped).
Fair share with chat: the workers, and the llama.cpp threads they start, run at a lower
scheduling priority (`nice`, Linux), so while chat streams run the kernel gives their decode
steps the cores first; and while the chat engine has running streams at most half the lanes
(at least one) run at a time, otherwise all of them."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kodkod.core.encoder_types import Encoder, EncoderLoader
from kodkod.fsutil import plain_name
from kodkod.models.embedding_inputs import (
    EmbeddingInputError,
    InputTooLong,
    lane_plan,
    plan_batches,
    split_tail,
    tokenize_all,
)
from kodkod.models.gguf_header import read_roles
from kodkod.models.hf_encoder import ConversionError, cached_gguf

__all__ = [
    "EmbeddingCounters",
    "EmbeddingInputError",
    "EmbeddingLoadError",
    "EmbeddingResult",
    "EmbeddingService",
    "InputTooLong",
    "NoEmbeddingModel",
    "lane_plan",
]

log = logging.getLogger(__name__)


class NoEmbeddingModel(Exception):
    """No embedding model is loaded (→ 503)."""


class EmbeddingLoadError(Exception):
    """An embedding model could not be loaded (→ 400, one-line message)."""


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: np.ndarray  # float32, one row per input
    prompt_tokens: int
    model: str


@dataclass(slots=True)
class EmbeddingCounters:
    """What the worker did since start (read by tests and logs; written on the event loop)."""

    batches_run: int = 0
    requests_cancelled: int = 0  # requests stopped because their client went away
    batches_skipped: int = 0  # batches those requests never ran


def _lower_priority(nice: int) -> None:
    """Raise this thread's niceness to `nice` (Linux, where it is per thread and inherited by
    the threads it starts; elsewhere, or when refused, nothing changes)."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("could not lower the embedding thread's priority: %s", exc)


class EmbeddingService:
    """Owns the loaded encoder and the worker thread it runs on."""

    def __init__(
        self,
        loader: EncoderLoader | None,
        model_dir: Path,
        *,
        n_threads: int,
        chat_busy: Callable[[], bool] = lambda: False,
        nice: int = 0,
    ) -> None:
        self._loader = loader
        self.model_dir = model_dir
        self._n_threads = max(1, n_threads)
        self._chat_busy = chat_busy
        self._lanes, self._lane_threads = lane_plan(self._n_threads)
        self._lane_workers = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"kodkod-embed{k}",
                initializer=_lower_priority,
                initargs=(nice,),
            )
            for k in range(self._lanes)
        ]
        # loads, tokenizes and closes: on a thread of its own, so that a request is tokenized
        # (and its bad inputs refused) while the lanes run another request's batches
        self._worker = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="kodkod-embed-tok",
            initializer=_lower_priority,
            initargs=(nice,),
        )
        self._busy_lanes: set[int] = set()
        self._lane_freed = asyncio.Event()
        self._lane_waiters = 0  # feeders waiting for a lane (read by the lane threads too)
        self.counters = EmbeddingCounters()
        self._encoder: Encoder | None = None
        self._name: str | None = None
        self._lock = asyncio.Lock()

    # -- models ----------------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        return self._name

    def names(self) -> list[str]:
        """The folders of the embedding folder (what an admin may load)."""
        if not self.model_dir.is_dir():
            return []
        return sorted(p.name for p in self.model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _resolve(self, name: str) -> Path:
        if not plain_name(name):
            raise EmbeddingLoadError(f"invalid embedding model name {name!r}")
        path = self.model_dir / name
        if not path.exists():
            raise EmbeddingLoadError(f"embedding model {name!r} not found in {self.model_dir}")
        return path

    def _gguf_of(self, path: Path) -> Path:
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise EmbeddingLoadError(f"{path.name} is not a GGUF file")
            return _embedding_gguf(path)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _embedding_gguf(ggufs[0])
        if (path / "config.json").is_file():
            try:
                return cached_gguf(path)
            except ConversionError as exc:
                raise EmbeddingLoadError(str(exc)) from None
        raise EmbeddingLoadError(f"{path.name} holds neither a GGUF file nor a Hugging Face config.json")

    async def load(self, name: str) -> None:
        """Load `name` (EmbeddingLoadError: unknown, already loaded, or not loadable)."""
        if self._loader is None:
            raise EmbeddingLoadError("this server was built without an embedding backend")
        loader = self._loader
        async with self._lock:
            if name == self._name:
                raise EmbeddingLoadError(f"embedding model {name!r} is already loaded")
            path = self._resolve(name)
            loop = asyncio.get_running_loop()
            # find (or convert) the GGUF before the loaded model goes: a folder that cannot
            # be used leaves it serving
            gguf = await loop.run_in_executor(self._worker, self._gguf_of, path)
            await self._unload_locked()
            try:
                encoder = await loop.run_in_executor(
                    self._worker,
                    functools.partial(loader, gguf, name, n_threads=self._lane_threads, lanes=self._lanes),
                )
            except EmbeddingLoadError:
                raise
            except Exception as exc:
                raise EmbeddingLoadError(f"could not load embedding model {name!r}: {exc}") from None
            self._encoder, self._name = encoder, name
            log.info("embedding model %s loaded (%s)", name, encoder.info.path.name)

    async def unload(self) -> bool:
        """Unload the embedding model; False when none was loaded."""
        async with self._lock:
            return await self._unload_locked()

    async def _unload_locked(self) -> bool:
        encoder = self._encoder
        if encoder is None:
            return False
        self._encoder, self._name = None, None
        await asyncio.get_running_loop().run_in_executor(self._worker, encoder.close)
        return True

    def shutdown(self) -> None:
        """Close the model and stop the worker (blocking; at server exit)."""
        encoder, self._encoder, self._name = self._encoder, None, None
        if encoder is not None:
            self._worker.submit(encoder.close).result()
        for worker in (self._worker, *self._lane_workers):
            worker.shutdown(wait=True)

    def require(self) -> Encoder:
        if self._encoder is None:
            raise NoEmbeddingModel("no embedding model is loaded")
        return self._encoder

    # -- embedding -------------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> EmbeddingResult:
        """One vector per input (text, or token ids used as given)."""
        encoder, name = self.require(), self._name or ""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._worker, tokenize_all, encoder, inputs)
        info = encoder.info
        out = np.empty((len(ids), info.n_embd), dtype=np.float32)
        pack = info.pack_tokens or info.batch_tokens
        lanes = max(1, min(self._lanes, info.lanes))
        plan = plan_batches([len(x) for x in ids], pack, info.batch_sequences, info.pair_tokens)
        batches = split_tail(plan, lanes)
        # shared with the lane threads: each pack is popped (atomically) by exactly one of them,
        # or by the cancellation below, which empties the queue so that no further pack starts
        waiting = deque(batches)
        finished = [0] * lanes  # batches finished per lane, each slot written by its lane's thread

        async def feed() -> None:
            # holds a free lane while its thread runs the request's packs one after another
            # (`_run_packs`), and gives it back when the thread yields it to others
            while waiting:
                lane = await self._take_lane(lanes)
                try:
                    if not waiting:
                        return
                    ran = await loop.run_in_executor(
                        self._lane_workers[lane], self._run_packs, encoder, lane, ids, waiting, out, finished
                    )
                    self.counters.batches_run += ran
                finally:
                    self._give_lane(lane)
                if self._lane_waiters:
                    await asyncio.sleep(0)  # the request that waits takes the lane first

        feeders = [asyncio.ensure_future(feed()) for _ in range(min(lanes, len(batches)))]
        try:
            await asyncio.gather(*feeders)
        except asyncio.CancelledError:
            # the packs in flight (if any) finish on their threads; no further one starts
            skipped = _drain(waiting)
            for task in feeders:
                task.cancel()
            self.counters.requests_cancelled += 1
            self.counters.batches_skipped += skipped
            log.info(
                "embedding request cancelled (client gone) after %d of %d batches; %d skipped",
                sum(finished),
                len(batches),
                skipped,
            )
            raise
        except BaseException:
            _drain(waiting)
            for task in feeders:
                task.cancel()
            raise
        return EmbeddingResult(out, sum(len(x) for x in ids), name)

    def _run_packs(
        self,
        encoder: Encoder,
        lane: int,
        ids: Sequence[Sequence[int]],
        waiting: deque[range],
        out: np.ndarray,
        finished: list[int],
    ) -> int:
        """On lane `lane`'s thread: run the request's next packs until none is left, or until
        the lane is wanted elsewhere (another request waits for one, or chat streams run and
        the share of lanes must be checked again). Rows go to `out` by position, each finished
        pack counts in `finished[lane]`; returns the packs run. Staying on the thread spares a
        hand-off through the event loop per pack."""
        ran = 0
        while True:
            try:
                part = waiting.popleft()
            except IndexError:
                return ran
            out[part.start : part.stop] = encoder.embed([ids[i] for i in part], lane)
            ran += 1
            finished[lane] += 1
            if self._lane_waiters or self._chat_busy():
                return ran

    async def _take_lane(self, lanes: int) -> int:
        """A free lane of the first `lanes`; while chat streams run, at most half of them (at
        least one) are taken at a time."""
        while True:
            limit = max(1, lanes // 2) if self._chat_busy() else lanes
            if len(self._busy_lanes) < limit:
                lane = next((k for k in range(lanes) if k not in self._busy_lanes), None)
                if lane is not None:
                    self._busy_lanes.add(lane)
                    return lane
            # a lane is busy whenever this waits, and giving it back wakes us
            self._lane_freed.clear()
            self._lane_waiters += 1
            try:
                await self._lane_freed.wait()
            finally:
                self._lane_waiters -= 1

    def _give_lane(self, lane: int) -> None:
        self._busy_lanes.discard(lane)
        self._lane_freed.set()


def _drain(waiting: deque[range]) -> int:
    """Empty `waiting` (lane threads may pop from it meanwhile); the number taken here."""
    taken = 0
    while True:
        try:
            waiting.popleft()
        except IndexError:
            return taken
        taken += 1


def _embedding_gguf(path: Path) -> Path:
    """`path`, unless its header shows a text generator (a chat model): EmbeddingLoadError."""
    roles = read_roles(path)
    if roles is not None and roles.text_generator:
        raise EmbeddingLoadError(
            f"{path.name} is not an embedding model: a {roles.architecture} text-generation model "
            "(causal attention and no pooling type in its GGUF); load it as the chat model with "
            "POST /v1/model/load"
        )
    return path
