"""The embedding service: one embedding model next to the chat model, loaded by name from
`embeddings.embedding_model_dir`, and the batched, fair work of embedding inputs.

A name is a folder (or a `.gguf` file) of the embedding folder. A folder holding a GGUF loads
it; a Hugging Face sentence-transformers folder is converted once (`models/hf_encoder.py`) and
the cached GGUF loads. All native work -- loading, tokenizing, embedding, closing -- runs on
one worker thread owned by the service, so nothing closes under a running batch. A request is
tokenized first (an input over the model's limit is refused with the numbers, before any
batch runs), then packed into batches of the encoder's preferred size (within its limits); each
batch is one job on the worker, so concurrent requests interleave batch by batch, and a request
whose client went away (its task cancelled) submits no further batch: only the one already
running finishes (`EmbeddingCounters` and a log line tell how many were skipped).
Fair share with chat: the worker thread, and the llama.cpp threads it starts, run at a lower
scheduling priority (`nice`, Linux), so while chat streams run the kernel gives their decode
steps the cores first; and while the chat engine has running streams an embedding batch runs on
half the threads, otherwise on all of them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kodkod.core.encoder_types import Encoder, EncoderLoader
from kodkod.fsutil import plain_name
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
]

log = logging.getLogger(__name__)


class NoEmbeddingModel(Exception):
    """No embedding model is loaded (→ 503)."""


class EmbeddingLoadError(Exception):
    """An embedding model could not be loaded (→ 400, one-line message)."""


class EmbeddingInputError(ValueError):
    """An input the model cannot take (→ 400, names the numbers)."""


class InputTooLong(EmbeddingInputError):
    """An input longer than the model's sequence limit."""


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


def _plan_batches(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> list[range]:
    """Consecutive input ranges of at most `max_seqs` inputs and `max_tokens` tokens (an input
    longer than `max_tokens` forms a range of its own)."""
    out: list[range] = []
    start, tokens = 0, 0
    for i, n in enumerate(lengths):
        if i > start and (tokens + n > max_tokens or i - start >= max_seqs):
            out.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


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
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kodkod-embed", initializer=_lower_priority, initargs=(nice,)
        )
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
                    self._worker, functools.partial(loader, gguf, name, n_threads=self._n_threads)
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
        self._worker.shutdown(wait=True)

    def require(self) -> Encoder:
        if self._encoder is None:
            raise NoEmbeddingModel("no embedding model is loaded")
        return self._encoder

    # -- embedding -------------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> EmbeddingResult:
        """One vector per input (text, or token ids used as given)."""
        encoder, name = self.require(), self._name or ""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._worker, _tokenize_all, encoder, inputs)
        info = encoder.info
        out = np.empty((len(ids), info.n_embd), dtype=np.float32)
        pack = info.pack_tokens or info.batch_tokens
        batches = _plan_batches([len(x) for x in ids], pack, info.batch_sequences)
        done = 0
        try:
            for part in batches:
                threads = max(1, self._n_threads // 2) if self._chat_busy() else self._n_threads
                chunk = [ids[i] for i in part]
                out[part.start : part.stop] = await loop.run_in_executor(
                    self._worker, _embed_batch, encoder, chunk, threads
                )
                done += 1
                self.counters.batches_run += 1
        except asyncio.CancelledError:
            # the batch in flight (if any) finishes on the worker; no further one starts
            skipped = len(batches) - done - 1
            self.counters.requests_cancelled += 1
            self.counters.batches_skipped += max(0, skipped)
            log.info(
                "embedding request cancelled (client gone) after %d of %d batches; %d skipped",
                done,
                len(batches),
                max(0, skipped),
            )
            raise
        return EmbeddingResult(out, sum(len(x) for x in ids), name)


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


def _tokenize_all(encoder: Encoder, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
    info = encoder.info
    out: list[list[int]] = []
    for index, item in enumerate(inputs):
        ids = encoder.tokenize(item) if isinstance(item, str) else list(item)
        if not ids:
            raise EmbeddingInputError(f"input {index} is empty")
        if len(ids) > info.max_input_tokens:
            raise InputTooLong(
                f"input {index} has {len(ids)} tokens; the embedding model {info.name!r} takes at "
                f"most {info.max_input_tokens}"
            )
        bad = next((t for t in ids if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise EmbeddingInputError(f"input {index} holds token id {bad}, outside 0..{info.n_vocab - 1}")
        out.append(ids)
    return out


def _embed_batch(encoder: Encoder, chunk: list[list[int]], n_threads: int) -> np.ndarray:
    encoder.set_threads(n_threads)
    return encoder.embed(chunk)
