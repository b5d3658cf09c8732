"""Job store in a `modal.Dict`, for the service when it runs on Modal.

A web container's own disk goes when the container scales down, so on Modal the job
rows and events live in a Dict that every container of the app reads. Keys:

- `job:<id>`: the job's row (file name, status, times, number of events);
- `event:<id>:<seq>`: one event, written together with the updated row in one call.

Only the container running a job writes its keys, so no write races another.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from service.events import StoredEvent
from service.store import StoredJob

STALE_SECONDS = 600.0
"""A running job whose row has not changed for this long is taken as abandoned."""

MAX_PARALLEL_READS = 16


def _job_key(job_id: str) -> str:
    return f"job:{job_id}"


def _event_key(job_id: str, seq: int) -> str:
    return f"event:{job_id}:{seq}"


class ModalDictJobStore:
    """`JobStore` on a `modal.Dict`, or any object with the same `.aio` methods."""

    def __init__(self, dictionary: Any) -> None:
        self.dictionary = dictionary
        self._rows: dict[str, dict] = {}

    @classmethod
    def from_name(cls, name: str) -> ModalDictJobStore:
        import modal

        return cls(modal.Dict.from_name(name, create_if_missing=True))

    async def _write_row(self, job_id: str, extra: dict[str, Any] | None = None) -> None:
        row = self._rows[job_id]
        row["updated"] = time.time()
        await self.dictionary.update.aio({_job_key(job_id): dict(row), **(extra or {})})

    async def add_job(self, job_id: str, filename: str, created: float) -> None:
        self._rows[job_id] = {"filename": filename, "status": "queued", "created": created,
                              "finished": None, "events": 0}
        await self._write_row(job_id)

    async def add_event(self, job_id: str, event: StoredEvent) -> None:
        row = self._rows[job_id]
        row["events"] = max(row["events"], event.id + 1)
        await self._write_row(job_id, {
            _event_key(job_id, event.id): {"name": event.event, "data": event.data},
        })

    async def set_status(self, job_id: str, status: str, finished: float | None) -> None:
        row = self._rows.get(job_id)
        if row is None:
            row = await self.dictionary.get.aio(_job_key(job_id))
            if row is None:
                return
            self._rows[job_id] = row
        row["status"] = status
        row["finished"] = finished
        await self._write_row(job_id)
        if finished is not None:
            # The job is done in this process, so its row needs no cache here.
            self._rows.pop(job_id, None)

    async def load(self, job_id: str) -> StoredJob | None:
        row = await self.dictionary.get.aio(_job_key(job_id))
        if row is None:
            return None
        limit = asyncio.Semaphore(MAX_PARALLEL_READS)

        async def read(seq: int) -> StoredEvent | None:
            async with limit:
                item = await self.dictionary.get.aio(_event_key(job_id, seq))
            return None if item is None else StoredEvent(id=seq, event=item["name"], data=item["data"])

        events = await asyncio.gather(*(read(seq) for seq in range(int(row["events"]))))
        return StoredJob(job_id, row["filename"], row["status"], row["created"], row["finished"],
                         [event for event in events if event is not None])

    async def _rows_by_id(self) -> dict[str, dict]:
        rows = {}
        async for key in self.dictionary.keys.aio():
            if isinstance(key, str) and key.startswith("job:"):
                row = await self.dictionary.get.aio(key)
                if row is not None:
                    rows[key[4:]] = row
        return rows

    async def unfinished(self) -> list[str]:
        """Return running jobs whose row has been still for `STALE_SECONDS`.

        Other containers may be running jobs right now, so only a job that has gone
        quiet for that long counts as left behind by a container that stopped.
        """
        cutoff = time.time() - STALE_SECONDS
        return [
            job_id for job_id, row in (await self._rows_by_id()).items()
            if row["status"] in ("queued", "running") and row.get("updated", 0) < cutoff
        ]

    async def delete_finished_before(self, cutoff: float) -> list[str]:
        removed = []
        for job_id, row in (await self._rows_by_id()).items():
            if row.get("finished") is not None and row["finished"] < cutoff:
                for seq in range(int(row["events"])):
                    await self.dictionary.pop.aio(_event_key(job_id, seq), None)
                await self.dictionary.pop.aio(_job_key(job_id), None)
                removed.append(job_id)
        return removed

    async def close(self) -> None:
        self._rows.clear()
