"""The KoboldAI API (reference §5.3, §10), served by the same engine as the OpenAI endpoints.

`mount(app)` adds three groups: `/api/v1/...` (also at `/api/latest/...`, hidden from the
schema) and `/api/extra/...`. Generation endpoints need an API key; the version endpoints and
soft-prompt stubs are open (§2.5) because clients probe them before they send a key.

A generate request leases the loaded model for its whole HTTP exchange (like the OpenAI
endpoints; Kobold has no `model` field, so never switches models), is converted by
`kobold.convert` (shared sampler fields, presets, Kobold aliases), submitted as one engine
request, and registered in the job table (`kobold.jobs`) until it ends, so /api/extra/abort
and /api/extra/generate/check can find it by genkey. It runs in the engine's batch next to
every other request.

Streams use Kobold's framing (KoboldCpp's, which KoboldAI Lite parses strictly): each piece is
`event: message\\ndata: {"token": "...", "finish_reason": null}\\n\\n` with bare LF, the last
event carries `finish_reason` ("stop" | "length") and an empty token, and the stream then
closes. Keep-alives are SSE comments (`: ping`), which Lite's and SillyTavern's parsers skip.
A client that disconnects aborts its job (streaming: the response's cleanup closes the engine
stream; non-streaming: a disconnect poll, answered with 422 like the OpenAI endpoints).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kodkod.api.admin.inline import hold_model
from kodkod.api.convert import new_request_id, run_sized, tokenize_prompt
from kodkod.api.deps import API, get_keys
from kodkod.api.errors import ApiError, stream_error
from kodkod.api.generation import SSE_HEADERS, error_for, fan_in, sse_ping
from kodkod.api.kobold.convert import finish_reason, kobold_generation
from kodkod.api.kobold.jobs import JobTable, KoboldJob, get_jobs
from kodkod.api.kobold.schemas import KoboldGenerateRequest, TokenCountRequest
from kodkod.api.request_log import log_generation
from kodkod.api.state import get_model, get_state
from kodkod.api.validation import check_queue
from kodkod.core.types import ErrorEvent, ErrorKind, FinishEvent, TokenEvent
from kodkod.engine.stream import RequestStream
from kodkod.models.manager import NoModelLoaded

KOBOLD_UNITED_VERSION = "1.2.5"  # /api/v1/info/version: we answer like KoboldAI United
KOBOLDCPP_VERSION = "1.74"  # /api/extra/version: enables Lite's genkey, SSE, grammar, DRY, XTC;
# not >= 1.88, which would make Lite send {{[INPUT]}}/{{[OUTPUT]}} placeholders we don't expand
DISCONNECT_POLL_S = 0.5

v1 = APIRouter(tags=["kobold"])
extra = APIRouter(tags=["kobold"])


def mount(app: FastAPI) -> None:
    """Serve the Kobold routes on `app` (called when `kobold` is in network.api_servers)."""
    app.include_router(v1, prefix="/api/v1")
    app.include_router(v1, prefix="/api/latest", include_in_schema=False)
    app.include_router(extra, prefix="/api/extra")


# -- generation --------------------------------------------------------------------------------


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _caller(request: Request) -> str | None:
    """Who is asking: a digest of the key that authenticated the request (None without
    auth). Jobs are visible to, and abortable by, their starter only."""
    return get_keys(request).caller_id(request.headers)


async def _start(
    request: Request, req: KoboldGenerateRequest
) -> tuple[KoboldJob, RequestStream, JobTable]:
    """Convert, submit and register one job. Bad requests raise here, before any response."""
    state = get_state(request)
    model = await hold_model(request)  # leased until the exchange (stream included) ends
    request_id = new_request_id()
    limits = state.settings.limits
    gen = await kobold_generation(req, request_id, model, state.overrides, limits)
    await model.engine.prepare(gen)
    check_queue(model.engine, 1, limits)  # 429 when too many wait; no await before submit
    stream = model.engine.submit(gen, stall_timeout_s=limits.stalled_stream_timeout_s)
    log_generation(state.settings.logging, gen, stream, model.tokenizer)
    job = KoboldJob(
        genkey=req.genkey or request_id,
        request_id=request_id,
        client_host=_client_host(request),
        anonymous=not req.genkey,
        engine=model.engine,
        owner=_caller(request),
    )
    jobs = get_jobs(state)
    jobs.add(job)
    return job, stream, jobs


async def _drain(job: KoboldJob, stream: RequestStream) -> FinishEvent | ErrorEvent:
    """Consume the stream to its end, keeping the job's text up to date for /check."""
    async for batch in stream.batches():
        for ev in batch:
            if isinstance(ev, TokenEvent):
                job.append(ev.text)
            else:
                return ev
    return ErrorEvent("the request was cancelled", ErrorKind.INTERNAL)


async def _run(request: Request, job: KoboldJob, stream: RequestStream) -> FinishEvent | ErrorEvent:
    """`_drain`, aborting the job if the client goes away meanwhile (→ 422)."""
    task = asyncio.ensure_future(_drain(job, stream))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(422, "the request was cancelled by the client")
    finally:
        if not task.done():
            task.cancel()


@v1.post("/generate", dependencies=[API])
async def generate(req: KoboldGenerateRequest, request: Request) -> dict[str, Any]:
    job, stream, jobs = await _start(request, req)
    try:
        final = await _run(request, job, stream)
    finally:
        stream.close()
        jobs.remove(job)
    if isinstance(final, ErrorEvent):
        raise error_for(final)
    return {
        "results": [
            {
                "text": job.text,
                "finish_reason": finish_reason(final),
                "prompt_tokens": final.usage.prompt_tokens,
                "completion_tokens": final.usage.completion_tokens,
            }
        ]
    }


def kobold_event(payload: dict[str, Any]) -> str:
    """One Kobold SSE event: `event: message`, one data line of JSON, bare LF separators.

    U+2028/U+2029 are escaped too: JavaScript's `.` does not match them, and KoboldAI Lite
    finds events with a regex.
    """
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"event: message\ndata: {data}\n\n"


async def _events(
    job: KoboldJob, stream: RequestStream, jobs: JobTable, ping_s: float | None
) -> AsyncIterator[str]:
    """The stream body. The job leaves the table before its last event is sent, so a client
    that checks right after reading it already finds the job gone."""
    async for index, events in fan_in([stream], ping_s):
        if index < 0:
            yield sse_ping()
            continue
        for ev in events:
            if isinstance(ev, TokenEvent):
                if ev.text:
                    job.append(ev.text)
                    yield kobold_event({"token": ev.text, "finish_reason": None})
            elif isinstance(ev, FinishEvent):
                jobs.remove(job)
                yield kobold_event({"token": "", "finish_reason": finish_reason(ev)})
            else:
                jobs.remove(job)
                yield kobold_event({"token": "", "finish_reason": None, **stream_error(ev.message)})
                return


class JobStreamResponse(StreamingResponse):
    """A streaming response that always runs `cleanup` when it ends — also when the client
    disconnected before the body iterator was ever started (a plain generator's `finally`
    would not run then, and the job would keep generating)."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


@extra.post("/generate/stream", dependencies=[API])
async def generate_stream(req: KoboldGenerateRequest, request: Request) -> StreamingResponse:
    ping_s = get_state(request).settings.network.sse_ping_interval or None
    job, stream, jobs = await _start(request, req)

    def cleanup() -> None:
        stream.close()  # aborts the engine request if it is still running
        jobs.remove(job)

    return JobStreamResponse(_events(job, stream, jobs, ping_s), cleanup)


async def _genkey(request: Request) -> str | None:
    """The genkey of an abort/check call: JSON body `{"genkey": …}` or `?genkey=`.

    Lenient on purpose: SillyTavern posts /abort with no body at all, and KoboldCpp treats an
    unreadable body as "no key" too.
    """
    key = request.query_params.get("genkey")
    raw = await request.body()
    if raw.strip():
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            data = None
        if isinstance(data, dict) and isinstance(data.get("genkey"), str) and data["genkey"]:
            key = data["genkey"]
    return key or None


@extra.post("/abort", dependencies=[API])
async def abort(request: Request) -> dict[str, bool]:
    """Abort the caller's jobs with this genkey (no genkey: this client's jobs that sent
    none). Another key's job is left alone, and the answer is the same as for no job."""
    genkey = await _genkey(request)
    get_jobs(get_state(request)).abort(genkey, _client_host(request), _caller(request))
    return {"success": True}


@extra.get("/generate/check", dependencies=[API])
@extra.post("/generate/check", dependencies=[API])
async def check(request: Request) -> dict[str, Any]:
    """The text so far of a running job, `{"results": [{"text": …}]}` — also while it is still
    empty (KoboldCpp's shape; clients read `results[0].text`); `{"results": []}` when there is
    no such job (unknown key, or finished: a job leaves the table when it ends)."""
    genkey = await _genkey(request)
    job = get_jobs(get_state(request)).latest(genkey, _client_host(request), _caller(request))
    return {"results": [{"text": job.text}]} if job is not None else {"results": []}


# -- model information -------------------------------------------------------------------------


@extra.post("/tokencount", dependencies=[API])
async def tokencount(req: TokenCountRequest, request: Request) -> dict[str, Any]:
    model = await hold_model(request)  # leased: the worker thread tokenizes under the lease
    offload_chars = get_state(request).settings.limits.offload_tokenize_chars
    ids = await run_sized(len(req.prompt), offload_chars, lambda: tokenize_prompt(
        model.tokenizer, req.prompt, add_bos=req.special, bos_id=model.info.bos_id))
    return {"value": len(ids), "ids": ids}


@v1.get("/model", dependencies=[API])
async def model_name(request: Request) -> dict[str, str]:
    """`tabbyAPI/<model folder>`; "ReadOnly" (KoboldAI's "no model") when nothing is loaded."""
    try:
        model = get_model(request)
    except NoModelLoaded:
        return {"result": "ReadOnly"}
    return {"result": f"tabbyAPI/{model.name}"}


@v1.get("/config/max_length", dependencies=[API])
@v1.get("/config/max_context_length", dependencies=[API])
async def max_context_length(request: Request) -> dict[str, int]:
    return {"value": get_model(request).max_seq_len}


@extra.get("/true_max_context_length", dependencies=[API])
async def true_max_context_length(request: Request) -> dict[str, int]:
    return {"value": get_model(request).max_seq_len}


# -- open endpoints: versions and soft-prompt stubs ------------------------------------------


@v1.get("/info/version")
async def united_version() -> dict[str, str]:
    return {"result": KOBOLD_UNITED_VERSION}


@extra.get("/version")
async def koboldcpp_version() -> dict[str, str]:
    return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION}


@v1.get("/config/soft_prompts_list")
async def soft_prompts_list() -> dict[str, list[str]]:
    return {"values": []}


@v1.get("/config/soft_prompt")
async def soft_prompt() -> dict[str, str]:
    return {"value": ""}


@v1.put("/config/soft_prompt")
async def set_soft_prompt() -> dict[str, Any]:
    return {}
