"""The KoboldAI API, served by the same engine as the OpenAI endpoints.

`mount(app)` adds three groups: `/api/v1/...` (also at `/api/latest/...`, hidden from the
schema) and `/api/extra/...`. Generation endpoints need an API key; the version endpoints and
soft-prompt stubs are open because clients probe them before they send a key.

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
stream; non-streaming: a disconnect poll, answered with 422 like the OpenAI endpoints). Both
loops are the shared ones of `kodkod.api.streaming`; this module only gives Kobold's frames
(`_KoboldFrames`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse

from kodkod.api.admin.inline import hold_model
from kodkod.api.convert import new_request_id, run_sized, tokenize_prompt
from kodkod.api.deps import API, get_keys
from kodkod.api.errors import stream_error
from kodkod.api.generation import error_for
from kodkod.api.kobold.convert import finish_reason, kobold_generation
from kodkod.api.kobold.jobs import JobTable, KoboldJob
from kodkod.api.kobold.schemas import KoboldGenerateRequest, TokenCountRequest
from kodkod.api.metrics.http import track_streams
from kodkod.api.presets import SamplerPresets
from kodkod.api.request_log import log_generation
from kodkod.api.state import AppSettings, KoboldJobs, Presets, get_model
from kodkod.api.streaming import event_stream, until_done
from kodkod.api.validation import check_queue
from kodkod.core.types import ErrorEvent, ErrorKind, FinishEvent, TokenEvent
from kodkod.engine.stream import RequestStream
from kodkod.models.manager import NoModelLoaded
from kodkod.settings import Settings

KOBOLD_UNITED_VERSION = "1.2.5"  # /api/v1/info/version: we answer like KoboldAI United
KOBOLDCPP_VERSION = "1.74"  # /api/extra/version: enables Lite's genkey, SSE, grammar, DRY, XTC;
# not >= 1.88, which would make Lite send {{[INPUT]}}/{{[OUTPUT]}} placeholders we don't expand

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
    request: Request,
    req: KoboldGenerateRequest,
    settings: Settings,
    presets: SamplerPresets,
    jobs: JobTable,
) -> tuple[KoboldJob, RequestStream]:
    """Convert, submit and register one job. Bad requests raise here, before any response."""
    model = await hold_model(request)  # leased until the exchange (stream included) ends
    request_id = new_request_id()
    limits = settings.limits
    gen = await kobold_generation(req, request_id, model, presets.active, limits)
    await model.engine.prepare(gen)
    check_queue(model.engine, 1, limits)  # 429 when too many wait; no await before submit
    stream = model.engine.submit(gen, stall_timeout_s=limits.stalled_stream_timeout_s)
    log_generation(settings.logging, gen, stream, model.tokenizer)
    track_streams(request, model.name, [stream])
    job = KoboldJob(
        genkey=req.genkey or request_id,
        request_id=request_id,
        client_host=_client_host(request),
        anonymous=not req.genkey,
        engine=model.engine,
        owner=_caller(request),
    )
    jobs.add(job)
    return job, stream


async def _drain(job: KoboldJob, stream: RequestStream) -> FinishEvent | ErrorEvent:
    """Consume the stream to its end, keeping the job's text up to date for /check."""
    async for batch in stream.batches():
        for ev in batch:
            if isinstance(ev, TokenEvent):
                job.append(ev.text)
            else:
                return ev
    return ErrorEvent("the request was cancelled", ErrorKind.INTERNAL)


@v1.post("/generate", dependencies=[API])
async def generate(
    req: KoboldGenerateRequest,
    request: Request,
    settings: AppSettings,
    presets: Presets,
    jobs: KoboldJobs,
) -> dict[str, Any]:
    job, stream = await _start(request, req, settings, presets, jobs)
    try:  # a client that goes away meanwhile aborts the job (→ 422)
        final = await until_done(request, _drain(job, stream))
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


class _KoboldFrames:
    """Kobold's stream events for one job (a `StreamSurface`). The job leaves the table before
    its last event is sent, so a client that checks right after reading it already finds the
    job gone."""

    __slots__ = ("_job", "_jobs")

    def __init__(self, job: KoboldJob, jobs: JobTable) -> None:
        self._job = job
        self._jobs = jobs

    def opening(self) -> Iterator[str]:
        return iter(())

    def on_token(self, index: int, ev: TokenEvent) -> Iterator[str]:
        if ev.text:
            self._job.append(ev.text)
            yield kobold_event({"token": ev.text, "finish_reason": None})

    def on_finish(self, index: int, ev: FinishEvent) -> Iterator[str]:
        self._jobs.remove(self._job)
        yield kobold_event({"token": "", "finish_reason": finish_reason(ev)})

    def on_error(self, index: int, ev: ErrorEvent) -> str:
        self._jobs.remove(self._job)
        return kobold_event({"token": "", "finish_reason": None, **stream_error(ev.message)})

    def closing(self) -> Iterator[str]:
        return iter(())


@extra.post("/generate/stream", dependencies=[API])
async def generate_stream(
    req: KoboldGenerateRequest,
    request: Request,
    settings: AppSettings,
    presets: Presets,
    jobs: KoboldJobs,
) -> StreamingResponse:
    ping_s = settings.network.sse_ping_interval or None
    job, stream = await _start(request, req, settings, presets, jobs)
    # the response's cleanup closes the stream (aborting a running request) and drops the job
    return event_stream([stream], _KoboldFrames(job, jobs), ping_s, on_end=lambda: jobs.remove(job))


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
async def abort(request: Request, jobs: KoboldJobs) -> dict[str, bool]:
    """Abort the caller's jobs with this genkey (no genkey: this client's jobs that sent
    none). Another key's job is left alone, and the answer is the same as for no job."""
    genkey = await _genkey(request)
    jobs.abort(genkey, _client_host(request), _caller(request))
    return {"success": True}


@extra.get("/generate/check", dependencies=[API])
@extra.post("/generate/check", dependencies=[API])
async def check(request: Request, jobs: KoboldJobs) -> dict[str, Any]:
    """The text so far of a running job, `{"results": [{"text": …}]}` — also while it is still
    empty (KoboldCpp's shape; clients read `results[0].text`); `{"results": []}` when there is
    no such job (unknown key, or finished: a job leaves the table when it ends)."""
    genkey = await _genkey(request)
    job = jobs.latest(genkey, _client_host(request), _caller(request))
    return {"results": [{"text": job.text}]} if job is not None else {"results": []}


# -- model information -------------------------------------------------------------------------


@extra.post("/tokencount", dependencies=[API])
async def tokencount(req: TokenCountRequest, request: Request, settings: AppSettings) -> dict[str, Any]:
    model = await hold_model(request)  # leased: the worker thread tokenizes under the lease
    offload_chars = settings.limits.offload_tokenize_chars
    ids = await run_sized(
        len(req.prompt),
        offload_chars,
        lambda: tokenize_prompt(model.tokenizer, req.prompt, add_bos=req.special, bos_id=model.info.bos_id),
    )
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
