"""Jobs: status, resume with Last-Event-ID, restart survival, grace period, downloads, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import srt
import webvtt

from tests.helpers import ROOT, read_events, start_server, transcribe


def _wait_for_status(url: str, job_id: str, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if status["status"] in wanted:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {wanted}: {status}")


def test_resume_with_last_event_id(server, demo_video):
    first_part = []
    with httpx.Client(timeout=120) as client, demo_video.open("rb") as handle:
        with client.stream("POST", f"{server.url}/v1/transcriptions",
                           files={"file": ("demo.mp4", handle)},
                           data={"segment_seconds": "10"}) as response:
            for event in read_events(response):
                first_part.append(event)
                if event.name == "segment":
                    break
    job_id = first_part[0].data["job_id"]
    last_id = first_part[-1].id
    with httpx.Client(timeout=120) as client:
        with client.stream("GET", f"{server.url}/v1/jobs/{job_id}/events",
                           headers={"Last-Event-ID": last_id}) as response:
            rest = list(read_events(response))
    events = first_part + rest
    assert [event.id for event in events] == [str(i) for i in range(len(events))]
    indices = [event.data["index"] for event in events if event.name == "segment"]
    assert sorted(indices) == list(range(len(indices)))
    assert rest[-1].name == "done"
    assert rest[-1].data["segments"] == len(indices)


def test_replay_from_start_after_done(server, demo_video):
    live = transcribe(server.url, demo_video)
    job_id = live[0].data["job_id"]
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", f"{server.url}/v1/jobs/{job_id}/events") as response:
            replay = list(read_events(response))
    assert [(e.id, e.name, e.data) for e in replay] == [(e.id, e.name, e.data) for e in live]


def test_job_status_counts(server, demo_video):
    events = transcribe(server.url, demo_video)
    status = httpx.get(f"{server.url}/v1/jobs/{events[0].data['job_id']}").json()
    assert status["status"] == "completed"
    assert status["segments_done"] == status["segments_total"] == events[-1].data["segments"]
    assert status["percent"] == 100.0


@pytest.mark.parametrize("job_id", ["0" * 32, "../../etc/passwd", "abc", "%2e%2e"])
def test_unknown_job_is_404(server, job_id):
    response = httpx.get(f"{server.url}/v1/jobs/{job_id}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] in ("job_not_found", "not_found")


def test_transcript_downloads(server, demo_video):
    events = transcribe(server.url, demo_video)
    job_id = events[0].data["job_id"]
    text = events[-1].data["text"]
    base = f"{server.url}/v1/jobs/{job_id}/transcript"
    srt_body = httpx.get(f"{base}.srt")
    assert srt_body.headers["content-disposition"].startswith('attachment; filename="demo.srt"')
    cues = list(srt.parse(srt_body.text))
    assert " ".join(cue.content for cue in cues) == text
    vtt = webvtt.from_buffer(__import__("io").StringIO(httpx.get(f"{base}.vtt").text))
    assert " ".join(caption.text for caption in vtt.captions) == text
    assert httpx.get(f"{base}.txt").text.strip() == text
    assert httpx.get(f"{base}.json").json()["text"] == text
    assert httpx.get(f"{base}.docx").status_code == 404


def test_finished_job_survives_restart(tmp_path, demo_video):
    database = tmp_path / "jobs.sqlite3"
    first = start_server(tmp_path / "first", database=database)
    try:
        events = transcribe(first.url, demo_video)
    finally:
        first.stop()
    job_id = events[0].data["job_id"]
    second = start_server(tmp_path / "second", database=database)
    try:
        text = httpx.get(f"{second.url}/v1/jobs/{job_id}/transcript.txt").text.strip()
        with httpx.Client(timeout=30) as client:
            with client.stream("GET", f"{second.url}/v1/jobs/{job_id}/events",
                               headers={"Last-Event-ID": "0"}) as response:
                replay = list(read_events(response))
    finally:
        second.stop()
    assert text == events[-1].data["text"]
    assert [event.data for event in replay] == [event.data for event in events[1:]]


def test_retention_removes_old_jobs(tmp_path, demo_video):
    database = tmp_path / "jobs.sqlite3"
    first = start_server(tmp_path / "first", database=database)
    try:
        job_id = transcribe(first.url, demo_video)[0].data["job_id"]
    finally:
        first.stop()
    time.sleep(1.5)
    second = start_server(tmp_path / "second", database=database, retention_seconds=1,
                          memory_seconds=1)
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{second.url}/v1/jobs/{job_id}").status_code != 404:
            assert time.monotonic() < deadline, "the expired job is still served"
            time.sleep(0.2)
    finally:
        second.stop()


def test_abandoned_job_cancelled_after_grace(tmp_path, demo_video):
    server = start_server(tmp_path, grace_seconds=1, workers=1, segment_seconds=10)
    try:
        with httpx.Client(timeout=60) as client, demo_video.open("rb") as handle:
            with client.stream("POST", f"{server.url}/v1/transcriptions",
                               files={"file": ("demo.mp4", handle)}) as response:
                job_id = next(read_events(response)).data["job_id"]
        status = _wait_for_status(server.url, job_id, {"cancelled", "completed"}, timeout=30)
        assert status["status"] == "cancelled"
        assert status["segments_done"] < 6
        assert not list(server.temp_root.glob("job-*"))
    finally:
        server.stop()


def test_reader_within_grace_keeps_job(tmp_path, demo_video):
    server = start_server(tmp_path, grace_seconds=30)
    try:
        with httpx.Client(timeout=60) as client, demo_video.open("rb") as handle:
            with client.stream("POST", f"{server.url}/v1/transcriptions",
                               files={"file": ("demo.mp4", handle)}) as response:
                job_id = next(read_events(response)).data["job_id"]
        with httpx.Client(timeout=120) as client:
            with client.stream("GET", f"{server.url}/v1/jobs/{job_id}/events",
                               headers={"Last-Event-ID": "0"}) as response:
                events = list(read_events(response))
        assert events[-1].name == "done"
        assert events[-1].data["status"] == "completed"
    finally:
        server.stop()


def test_cli_streams_and_writes_each_format(server, demo_video, tmp_path):
    for fmt in ("srt", "vtt", "txt", "json"):
        output = tmp_path / f"demo.{fmt}"
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "transcribe", str(demo_video), "--url", server.url,
             "--format", fmt, "-o", str(output)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "lighthouse" in result.stdout
        assert "100.0%" in result.stderr
        body = output.read_text()
        if fmt == "srt":
            assert list(srt.parse(body))
        elif fmt == "vtt":
            assert body.startswith("WEBVTT")
        elif fmt == "json":
            assert "lighthouse" in json.loads(body)["text"]
        else:
            assert "lighthouse" in body


def test_cli_without_url_starts_its_own_server(demo_video, tmp_path):
    env_overrides = {"STREAMSCRIBE_TEMP_ROOT": str(tmp_path / "temp"),
                     "STREAMSCRIBE_DATABASE": str(tmp_path / "jobs.sqlite3")}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "transcribe", str(demo_video)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, **env_overrides},
    )
    assert result.returncode == 0, result.stderr
    assert "lighthouse" in result.stdout


def test_cli_reports_rejected_file(server, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "transcribe", str(bad), "--url", server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "not a media file" in result.stderr
