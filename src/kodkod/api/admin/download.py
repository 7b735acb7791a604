"""`POST /v1/download` (admin): download a Hugging Face repo into `model_dir` or `lora_dir`.

The body is TabbyAPI's: `repo_id`, `repo_type` ("lora" → `lora_dir`, anything else →
`model_dir`), `folder_name`, `revision`, `token`, `include` / `exclude` globs, `chunk_limit`,
`timeout` (seconds for the whole download). The download itself is `models/download.py`,
run on its own thread; the answer is `{"download_path": "<folder>"}`, or 400 with the reason
(nothing matches, the folder exists, an unsafe name, the hub refused, the timeout passed).
A client that goes away cancels the download: the flag is set at once, the worker stops at
its next block and removes everything it wrote. `chunk_limit` (upstream: the size of its write
chunks in units of 100 kB) is accepted and checked, but the library reads in blocks of its own
size. The `token` is passed to the hub and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kodkod.api.deps import ADMIN
from kodkod.api.errors import ApiError
from kodkod.api.state import Paths
from kodkod.api.streaming import until_done
from kodkod.api.validation import REQUEST_CONFIG, Name
from kodkod.models.download import (
    MAX_PATTERNS,
    Cancel,
    DownloadError,
    DownloadJob,
    LogProgress,
    download_repo,
)
from kodkod.models.hub import HfHub

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")

Pattern = Name


class DownloadRequest(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG)
    repo_id: Name = Field(min_length=1, max_length=200)
    repo_type: str = Field("model", max_length=50)
    folder_name: Name | None = Field(None, max_length=200)
    revision: Name | None = Field(None, max_length=200)
    token: str | None = Field(None, max_length=4000, repr=False)
    include: list[Pattern] = Field(default_factory=lambda: ["*"], max_length=MAX_PATTERNS)
    exclude: list[Pattern] = Field(default_factory=list, max_length=MAX_PATTERNS)
    chunk_limit: float | None = Field(None, gt=0)
    timeout: int | None = Field(None, gt=0)


class DownloadResponse(BaseModel):
    download_path: str


def _run_on_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """`fn()` on a thread of its own (a long download must not hold a pool thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="kodkod-download", daemon=True).start()
    return future


async def _download(job: DownloadJob, cancel: Cancel) -> Path:
    hub = HfHub.from_env(timeout_s=job.timeout_s)
    future = _run_on_thread(lambda: download_repo(job, cancel, LogProgress(), hub))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set("the client went away")
        log.warning("download of %s cancelled: the client went away", job.repo_id)
        future.add_done_callback(lambda f: _log_stopped(job.repo_id, f))
        raise


def _log_stopped(repo_id: str, future: asyncio.Future[Path]) -> None:
    """The worker of a cancelled download has ended (its files are gone by then)."""
    if not future.cancelled() and future.exception() is None:
        log.info("download of %s had finished before the cancel; kept in %s", repo_id, future.result())
    else:
        log.info("download of %s stopped; nothing of it is kept", repo_id)


@router.post("/v1/download", dependencies=[ADMIN])
async def download(req: DownloadRequest, request: Request, paths: Paths) -> Any:
    target_dir = paths.lora_dir if req.repo_type == "lora" else paths.model_dir
    job = DownloadJob(
        repo_id=req.repo_id,
        target_dir=target_dir,
        folder_name=req.folder_name,
        revision=req.revision,
        token=req.token,
        include=tuple(req.include),
        exclude=tuple(req.exclude),
        timeout_s=float(req.timeout) if req.timeout is not None else None,
    )
    cancel = Cancel(job.timeout_s)
    try:
        path = await until_done(request, _download(job, cancel))
    except DownloadError as exc:
        log.warning("download of %s failed: %s", req.repo_id, exc)
        raise ApiError(400, str(exc), code="download_failed") from None
    return DownloadResponse(download_path=str(path))
