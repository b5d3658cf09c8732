"""The `modal.Dict` job store, on a stand-in with the same `.aio` methods, behind the real service."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx

from service.events import StoredEvent
from service.settings import Settings
from service.store_modal import STALE_SECONDS, ModalDictJobStore
from tests.helpers import read_events, running_service, transcribe


class _AioMethod:
    def __init__(self, function) -> None:
        self.aio = function


class DictStandIn:
    """An in-memory stand-in for `modal.Dict`: values are deep-copied, as pickling does."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.calls = 0

        async def get(key, default=None):
            self.calls += 1
            return copy.deepcopy(self.data.get(key, default))

        async def put(key, value, *, skip_if_exists=False):
            self.calls += 1
            if skip_if_exists and key in self.data:
                return False
            self.data[key] = copy.deepcopy(value)
            return True

        async def update(other=None, /, **kwargs):
            self.calls += 1
            for key, value in {**(other or {}), **kwargs}.items():
                self.data[key] = copy.deepcopy(value)

        async def pop(key, default=None):
            self.calls += 1
            return self.data.pop(key, default)

        async def keys():
            for key in list(self.data):
                yield key

        self.get, self.put, self.update = _AioMethod(get), _AioMethod(put), _AioMethod(update)
        self.pop, self.keys = _AioMethod(pop), _AioMethod(keys)


def _settings(tmp_path, name: str) -> Settings:
    return Settings(temp_root=tmp_path / name / "temp", database=tmp_path / name / "unused.sqlite3",
                    workers=2)


def test_job_readable_from_second_container(tmp_path, demo_video):
    dictionary = DictStandIn()
    with running_service(_settings(tmp_path, "first"), store=ModalDictJobStore(dictionary)) as (url, _):
        events = transcribe(url, demo_video)
    job_id = events[0].data["job_id"]
    assert f"job:{job_id}" in dictionary.data
    assert dictionary.data[f"job:{job_id}"]["status"] == "completed"
    assert dictionary.data[f"job:{job_id}"]["events"] == len(events)

    with running_service(_settings(tmp_path, "second"), store=ModalDictJobStore(dictionary)) as (url, _):
        text = httpx.get(f"{url}/v1/jobs/{job_id}/transcript.txt").text.strip()
        status = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{url}/v1/jobs/{job_id}/events",
                               headers={"Last-Event-ID": "0"}) as response:
                replay = list(read_events(response))
    assert text == events[-1].data["text"]
    assert status["status"] == "completed"
    assert [event.data for event in replay] == [event.data for event in events[1:]]


def test_stale_running_job_is_recovered():
    dictionary = DictStandIn()
    store = ModalDictJobStore(dictionary)

    async def scenario() -> tuple[list[str], list[str]]:
        await store.add_job("a" * 32, "old.mp4", time.time())
        await store.add_event("a" * 32, StoredEvent(id=0, event="job", data={"job_id": "a" * 32}))
        await store.add_job("b" * 32, "fresh.mp4", time.time())
        dictionary.data[f"job:{'a' * 32}"]["updated"] -= STALE_SECONDS + 1
        return await store.unfinished(), sorted(dictionary.data)

    stale, keys = asyncio.run(scenario())
    assert stale == ["a" * 32]
    assert f"event:{'a' * 32}:0" in keys


def test_retention_deletes_rows_and_events():
    dictionary = DictStandIn()
    store = ModalDictJobStore(dictionary)

    async def scenario() -> list[str]:
        for job_id in ("a" * 32, "b" * 32):
            await store.add_job(job_id, "clip.mp4", time.time())
            for seq in range(3):
                await store.add_event(job_id, StoredEvent(id=seq, event="progress", data={}))
        await store.set_status("a" * 32, "completed", time.time() - 100)
        await store.set_status("b" * 32, "completed", time.time())
        return await store.delete_finished_before(time.time() - 50)

    removed = asyncio.run(scenario())
    assert removed == ["a" * 32]
    assert not [key for key in dictionary.data if "a" * 32 in key]
    assert len([key for key in dictionary.data if "b" * 32 in key]) == 4


def test_load_unknown_job_is_none():
    assert asyncio.run(ModalDictJobStore(DictStandIn()).load("c" * 32)) is None
