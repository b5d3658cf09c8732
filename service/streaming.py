"""Follow a job's event log on behalf of one HTTP client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.sse import ServerSentEvent
from starlette.requests import Request

from service.jobs import Job, JobManager

RETRY_MILLISECONDS = 2000
"""How long an `EventSource` waits before reconnecting, sent with the first event."""


async def follow_job(manager: JobManager, job: Job, after: int = -1, *,
                     request: Request | None = None,
                     break_after: int = 0) -> AsyncIterator[ServerSentEvent]:
    """Yield the job's events after id `after` as `ServerSentEvent`s, until `done`.

    While the client reads, it counts as a listener. It stops counting when the
    generator is closed or, with `request` given, as soon as the client disconnects,
    even while no event is due, and then the job's grace period starts.
    `break_after` > 0 ends the stream early after that many events (the resume test hook).
    """
    manager.attach(job)
    attached = True

    def leave() -> None:
        nonlocal attached
        if attached:
            attached = False
            manager.detach(job)

    watcher = asyncio.create_task(_wait_for_disconnect(request, leave)) if request else None
    try:
        first = True
        sent = 0
        async for stored in job.follow(after):
            if break_after and sent >= break_after and stored.event != "done":
                return
            sent += 1
            event = stored.to_sse()
            if first:
                event.retry = RETRY_MILLISECONDS
                first = False
            yield event
    finally:
        if watcher is not None:
            watcher.cancel()
        leave()


async def _wait_for_disconnect(request: Request, on_disconnect) -> None:
    # The request body has been read by now, so the next ASGI message is the
    # disconnect. Waiting for it notices a client that left between two events.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def parse_last_event_id(value: str | None) -> int:
    """Return the event id a client last saw, or -1 for none or a value that is not an id."""
    if value is None:
        return -1
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 10 else -1
