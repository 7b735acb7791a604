"""Pieces of running engine requests for an HTTP request: SSE framing, fan-in of n choices.

The stream-until-done loop and the non-streamed wait that build on these are in
`kodkod.api.streaming`; closing a `RequestStream` aborts its engine request within one step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from kodkod.api.errors import ApiError
from kodkod.core.types import ErrorEvent, Event
from kodkod.engine.stream import RequestStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_ping() -> str:
    return ": ping\n\n"


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def fan_in(
    streams: list[RequestStream], idle_s: float | None = None
) -> AsyncIterator[tuple[int, list[Event]]]:
    """(choice index, merged events) from every stream as they come; (-1, []) when idle."""
    if len(streams) == 1:
        async for batch in streams[0].batches(idle_s):
            yield (0, batch) if batch else (-1, [])
        return
    # Bounded: while the response is not being sent (a client that stopped reading), the pumps
    # block and events wait, merged, in each RequestStream, whose stall timeout then applies.
    queue: asyncio.Queue[tuple[int, list[Event]] | None] = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, s: RequestStream) -> None:
        async for batch in s.batches():
            await queue.put((i, batch))

    async def pump_all() -> None:
        await asyncio.wait(tasks)
        await queue.put(None)  # after every pump's last item

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    done_task = asyncio.create_task(pump_all())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), idle_s) if idle_s else await queue.get()
            except TimeoutError:
                yield -1, []
                continue
            if item is None:
                break
            yield item
    finally:
        for t in tasks:
            t.cancel()
        done_task.cancel()
        for s in streams:
            s.close()


def error_for(ev: ErrorEvent) -> ApiError:
    status = {"context_length_exceeded": 400, "invalid_request_error": 400, "model_unloaded": 503}
    return ApiError(status.get(ev.kind.value, 503), ev.message, code=ev.kind.value)
