"""Fuzzing a real service: random form fields, damaged media and the OpenAPI schema.

Whatever arrives, the service must respond with a stream that ends in `done`, a
complete OpenAI response, or a 4xx JSON error with a message. It must never respond
with a 500 or leave a job folder behind.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, currently_in_test_context, example, given, note, settings
from hypothesis import strategies as st

from tests.helpers import ServerProcess, assert_no_job_files, ffmpeg, read_events, start_server

FORM_EXAMPLES = 25
MUTATION_EXAMPLES = 40
SCHEMA_EXAMPLES = 20

RESPONSE_SECONDS = 30
"""Maximum seconds one fuzzed request may take, from the upload to the last byte."""

ENDPOINTS = ("/v1/transcriptions", "/v1/audio/transcriptions")

# Edge cases for form parsers: non-ASCII digits ("²" passes str.isdigit() but not
# int()), doubled signs, numbers out of float range, NaN, empty and blank strings, NUL.
TRICKY_VALUES = (
    "", " ", "\x00", "\t\r\n", "²", "١", "𝟙", "--1", "+1", "-0", "0x10", "1_0", "1e309",
    "-1e309", "nan", "NaN", "inf", "0", "1", "0.5", "5", "45", "46", "63", "64",
    "9" * 40, "true", "false", "TRUE", "yes", "off", "auto", "en", "EN-us", "-en",
    "en-", "a-b", "zz", "de", "whisper-1", "tiny.en", "default", "json", "text", "srt",
    "verbose_json", "vtt", "word", "segment", "Word ", "İ", "ß", "null", "[]", "{}",
)

FIELD_VALUE = st.one_of(
    st.sampled_from(TRICKY_VALUES),
    st.text(max_size=30),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)

FORM_FIELDS = st.fixed_dictionaries({}, optional={
    "language": FIELD_VALUE,
    "model": FIELD_VALUE,
    "prompt": FIELD_VALUE,
    "temperature": FIELD_VALUE,
    "response_format": FIELD_VALUE,
    "stream": FIELD_VALUE,
    "audio_track": FIELD_VALUE,
    "segment_seconds": FIELD_VALUE,
    "word_timestamps": FIELD_VALUE,
    "timestamp_granularities[]": st.lists(FIELD_VALUE, min_size=1, max_size=3),
})


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("fuzz"), probe_timeout_seconds=10,
                          decode_stall_seconds=10)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, demo_video: Path) -> dict[str, bytes]:
    """Two seconds of the demo's speech as WAV, MP4 (AAC, index first) and WebM (Opus)."""
    folder = tmp_path_factory.mktemp("clips")
    commands = {
        "speech.wav": ("-vn", "-ac", "1", "-ar", "16000"),
        "speech.mp4": ("-vn", "-c:a", "aac", "-b:a", "32k", "-movflags", "+faststart"),
        "speech.webm": ("-vn", "-c:a", "libopus", "-b:a", "24k"),
    }
    clip_bytes = {}
    for name, options in commands.items():
        ffmpeg("-ss", "0.5", "-t", "2", "-i", str(demo_video), *options, str(folder / name))
        clip_bytes[name] = (folder / name).read_bytes()
    return clip_bytes


def check_response(response: httpx.Response, endpoint: str) -> str:
    """Assert that `response` is complete and well formed, or a 4xx JSON error.

    Returns "rejected", "streamed", or "returned" for an OpenAI response that is not a
    stream. `response` must be a streamed response that has not been read yet.
    """
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    body_text = "" if content_type.startswith("text/event-stream") else response.read().decode()
    assert status != 500, body_text[:500]
    if status >= 400:
        assert status < 500, (status, body_text[:500])
        assert content_type.startswith("application/json"), (status, content_type)
        assert json.loads(body_text)["error"]["message"]
        return "rejected"
    assert status == 200, (status, body_text[:500])
    if not content_type.startswith("text/event-stream"):
        assert endpoint == "/v1/audio/transcriptions"
        return "returned"
    events = list(read_events(response))
    assert events, "the stream carried no events"
    if endpoint == "/v1/transcriptions":
        assert events[-1].name == "done", [event.name for event in events]
        codes = [event.data.get("code") for event in events if event.name == "error"]
        assert "internal_error" not in codes, events
    else:
        last = events[-1]
        assert last.name == "transcript.text.done" or "error" in last.data, last
    return "streamed"


def post_and_check(server: ServerProcess, endpoint: str, filename: str, content: bytes,
                   data: dict) -> str:
    """Upload `content` with form `data`, check the response and that no job files remain."""
    if currently_in_test_context():
        note(f"POST {endpoint}: {filename}, {len(content)} bytes, starting {content[:16]!r}, "
             f"fields {data!r}")
    started = time.monotonic()
    with httpx.Client(timeout=RESPONSE_SECONDS) as client:
        with client.stream("POST", f"{server.url}{endpoint}", data=data,
                           files={"file": (filename, content)}) as response:
            kind = check_response(response, endpoint)
    elapsed = time.monotonic() - started
    assert elapsed < RESPONSE_SECONDS, f"the response took {elapsed:.1f} s"
    assert_no_job_files(server.temp_root)
    return kind


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_form_fields_never_500(fuzz_server, clips, endpoint):
    kinds: list[str] = []

    @settings(max_examples=FORM_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(fields=FORM_FIELDS)
    @example(fields={"audio_track": "²"})
    @example(fields={"audio_track": "--1"})
    @example(fields={"segment_seconds": "1e309", "temperature": "nan"})
    @example(fields={"language": "-en", "stream": "true"})
    @example(fields={"timestamp_granularities[]": ["word", "segment", "word"],
                     "response_format": "verbose_json"})
    def check(fields: dict) -> None:
        kinds.append(post_and_check(fuzz_server, endpoint, "speech.wav", clips["speech.wav"],
                                    fields))

    check()
    # Some fields must get through, or only the validation was fuzzed.
    assert kinds.count("rejected") < len(kinds), kinds


# --- Damaged media -------------------------------------------------------------------------


@st.composite
def damaged_media(draw: st.DrawFn, originals: dict[str, bytes]) -> tuple[str, bytes]:
    """Draw one clip and damage it: flipped bytes, a cut, a spliced or repeated range."""
    name = draw(st.sampled_from(sorted(originals)))
    data = bytearray(originals[name])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero", "repeat", "random"]))
        size = len(data)
        if size == 0:
            break
        position = draw(st.integers(min_value=0, max_value=size - 1))
        if kind == "flip":
            for offset in draw(st.lists(st.integers(0, 255), min_size=1, max_size=16)):
                data[(position + offset * 7919) % size] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "splice":
            other = originals[draw(st.sampled_from(sorted(originals)))]
            start = draw(st.integers(0, len(other) - 1))
            data[position:position + draw(st.integers(0, 4096))] = other[start:start + 4096]
        elif kind == "zero":
            length = draw(st.integers(1, 4096))
            data[position:position + length] = bytes(min(length, size - position))
        elif kind == "repeat":
            length = draw(st.integers(1, 8192))
            data[position:position] = data[position:position + length]
        else:
            data[position:position + 64] = draw(st.binary(min_size=64, max_size=64))
    return name, bytes(data)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_damaged_media_never_500(fuzz_server, clips, endpoint):
    kinds: list[str] = []

    @settings(max_examples=MUTATION_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(damaged=damaged_media(clips))
    def check(damaged: tuple[str, bytes]) -> None:
        name, content = damaged
        kinds.append(post_and_check(fuzz_server, endpoint, name, content, {}))

    # An MP4 whose index is whole but whose audio data is missing or zeroed probes
    # as valid and then decodes to nothing.
    mp4 = clips["speech.mp4"]
    payload = mp4.index(b"mdat") + 4
    check = example(damaged=("speech.mp4", mp4[:payload]))(check)
    check = example(damaged=("speech.mp4", mp4[:payload] + bytes(len(mp4) - payload)))(check)
    check()
    # A fuzzer that never gets past the probe tests only the probe.
    assert kinds.count("rejected") < len(kinds), kinds


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_rejected_cleanly(fuzz_server, seed):
    generator = random.Random(seed)
    content = generator.randbytes(generator.randint(1, 256 * 1024))
    for endpoint in ENDPOINTS:
        kind = post_and_check(fuzz_server, endpoint, f"random-{seed}.mp4", content, {})
        assert kind == "rejected"


# --- The OpenAPI schema, by schemathesis ---------------------------------------------------------


@pytest.mark.parametrize("job_ids", ["generated", "finished_job"])
def test_schemathesis_finds_no_server_error(fuzz_server, clips, tmp_path, job_ids):
    # Generated job ids reach only the 404 branch of the /v1/jobs/ routes, so a second
    # run pins `job_id` to a finished job. Generated uploads are random bytes, which the
    # probe rejects, so the form and damaged-media tests above cover the uploads.
    pytest.importorskip("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text("")
    only_jobs: list[str] = []
    if job_ids == "finished_job":
        with httpx.Client(timeout=RESPONSE_SECONDS) as client:
            with client.stream("POST", f"{fuzz_server.url}/v1/transcriptions",
                               files={"file": ("speech.wav", clips["speech.wav"])}) as response:
                events = list(read_events(response))
        assert events[-1].name == "done"
        config.write_text(f'[parameters]\njob_id = "{events[0].data["job_id"]}"\n')
        only_jobs = ["--include-path-regex", "^/v1/jobs/"]
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", f"{fuzz_server.url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(SCHEMA_EXAMPLES),
        "--seed", "1",
        "--workers", "1",
        "--request-timeout", "10",
        "--generation-database", "none",
        "--no-color",
        *only_jobs,
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Test cases:" in result.stdout, result.stdout[-2000:]
    # Each run took 5 to 10 s on a 2-core machine. Requests that hang until the 10 s
    # request timeout make it far slower.
    assert elapsed < 60, result.stdout[-3000:]
    assert_no_job_files(fuzz_server.temp_root)
