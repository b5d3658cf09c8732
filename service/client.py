"""A small Python client for Streamscribe's event stream (httpx with httpx-sse).

    from service.client import StreamscribeClient

    with StreamscribeClient("http://127.0.0.1:8000") as client:
        for event in client.transcribe("talk.mp4"):
            if event.name == "segment":
                print(event.data["start"], event.data["text"])

`transcribe` resumes on its own: if the connection drops after the `job` event, it
reconnects to the job's event stream with `Last-Event-ID` and carries on, so every
event is seen exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from httpx_sse import ServerSentEvent, connect_sse


class StreamscribeError(Exception):
    """A request the server rejected, with its HTTP `status` and error `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Event:
    id: int
    name: str
    data: dict


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        error = response.json()["error"]
        code, message = error.get("code") or "error", error.get("message") or response.text
    except (ValueError, KeyError, TypeError):
        code, message = "error", response.text
    raise StreamscribeError(response.status_code, code, message)


class StreamscribeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, reconnect_attempts: int = 5) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, read=None))
        self.reconnect_attempts = reconnect_attempts

    def __enter__(self) -> StreamscribeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def transcribe(self, path: str | Path, **fields: str | int | float | bool) -> Iterator[Event]:
        """Upload `path` and yield its events until `done`; form `fields` go along."""
        path = Path(path)
        data = {key: (str(value).lower() if isinstance(value, bool) else str(value))
                for key, value in fields.items()}
        job_id = None
        last_id = -1
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            try:
                with connect_sse(self._http, "POST", "/v1/transcriptions", files=files,
                                 data=data) as source:
                    _raise_for_error(source.response)
                    for sse in source.iter_sse():
                        event = _to_event(sse)
                        last_id = event.id
                        if event.name == "job":
                            job_id = event.data["job_id"]
                        yield event
                        if event.name == "done":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if job_id is None:
                    raise
        yield from self.events(job_id, after=last_id)

    def events(self, job_id: str, after: int = -1) -> Iterator[Event]:
        """Yield a job's events after id `after`, reconnecting when the stream breaks."""
        attempts = 0
        while True:
            headers = {"Last-Event-ID": str(after)} if after >= 0 else {}
            try:
                with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                                 headers=headers) as source:
                    _raise_for_error(source.response)
                    for sse in source.iter_sse():
                        event = _to_event(sse)
                        after = event.id
                        attempts = 0
                        yield event
                        if event.name == "done":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                attempts += 1
                if attempts > self.reconnect_attempts:
                    raise
                time.sleep(min(2.0, 0.2 * 2**attempts))

    def job(self, job_id: str) -> dict:
        response = self._http.get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return response.json()

    def download(self, job_id: str, fmt: str) -> str:
        """Return a finished job's transcript as srt, vtt, txt or json text."""
        response = self._http.get(f"/v1/jobs/{job_id}/transcript.{fmt}")
        _raise_for_error(response)
        return response.text


def _to_event(sse: ServerSentEvent) -> Event:
    return Event(id=int(sse.id) if sse.id and sse.id.isdigit() else -1, name=sse.event,
                 data=json.loads(sse.data) if sse.data else {})
