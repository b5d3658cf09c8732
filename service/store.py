"""Job store: every job and each of its events as they happen, in SQLite.

The store is what lets a finished job outlive the process: after a restart, its
events replay and its transcript downloads come from here. Writes go through one
thread of their own, in order, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from service.events import StoredEvent

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished);
"""


class StoredJob:
    """A job as the store has it: its row and its whole event log."""

    def __init__(self, job_id: str, filename: str, status: str, created: float,
                 finished: float | None, events: list[StoredEvent]) -> None:
        self.id = job_id
        self.filename = filename
        self.status = status
        self.created = created
        self.finished = finished
        self.events = events


class JobStore(Protocol):
    async def add_job(self, job_id: str, filename: str, created: float) -> None: ...
    async def add_event(self, job_id: str, event: StoredEvent) -> None: ...
    async def set_status(self, job_id: str, status: str, finished: float | None) -> None: ...
    async def load(self, job_id: str) -> StoredJob | None: ...
    async def unfinished(self) -> list[str]: ...
    async def delete_finished_before(self, cutoff: float) -> list[str]: ...
    async def close(self) -> None: ...


class SqliteJobStore:
    """`JobStore` in one SQLite file, written from a single dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="job-store")
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.executescript(SCHEMA)
            self._connection = connection
        return self._connection

    async def _call(self, function, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def add_job(self, job_id: str, filename: str, created: float) -> None:
        def write() -> None:
            self._connect().execute(
                "INSERT INTO jobs (id, filename, status, created) VALUES (?, ?, 'queued', ?)",
                (job_id, filename, created),
            )

        await self._call(write)

    async def add_event(self, job_id: str, event: StoredEvent) -> None:
        def write() -> None:
            self._connect().execute(
                "INSERT INTO events (job_id, seq, name, data) VALUES (?, ?, ?, ?)",
                (job_id, event.id, event.event, json.dumps(event.data, ensure_ascii=False)),
            )

        await self._call(write)

    async def set_status(self, job_id: str, status: str, finished: float | None) -> None:
        def write() -> None:
            self._connect().execute("UPDATE jobs SET status = ?, finished = ? WHERE id = ?",
                                    (status, finished, job_id))

        await self._call(write)

    async def load(self, job_id: str) -> StoredJob | None:
        def read() -> StoredJob | None:
            connection = self._connect()
            row = connection.execute(
                "SELECT id, filename, status, created, finished FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            events = [
                StoredEvent(id=seq, event=name, data=json.loads(data))
                for seq, name, data in connection.execute(
                    "SELECT seq, name, data FROM events WHERE job_id = ? ORDER BY seq", (job_id,)
                )
            ]
            return StoredJob(*row, events=events)

        return await self._call(read)

    async def unfinished(self) -> list[str]:
        def read() -> list[str]:
            rows = self._connect().execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running')"
            ).fetchall()
            return [row[0] for row in rows]

        return await self._call(read)

    async def delete_finished_before(self, cutoff: float) -> list[str]:
        def write() -> list[str]:
            connection = self._connect()
            rows = connection.execute(
                "SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,)
            ).fetchall()
            ids = [row[0] for row in rows]
            connection.executemany("DELETE FROM events WHERE job_id = ?", [(i,) for i in ids])
            connection.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            return ids

        return await self._call(write)

    async def close(self) -> None:
        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await self._call(shut)
        self._executor.shutdown(wait=True)


def create_store(settings) -> JobStore:
    """Build the job store that `settings.job_store` names."""
    if settings.job_store == "sqlite":
        return SqliteJobStore(settings.database)
    if settings.job_store == "modal-dict":
        from service.store_modal import ModalDictJobStore

        return ModalDictJobStore.from_name(settings.modal_dict_name)
    raise ValueError(
        f"unknown job store {settings.job_store!r}; set STREAMSCRIBE_JOB_STORE to "
        "'sqlite' or 'modal-dict'"
    )
