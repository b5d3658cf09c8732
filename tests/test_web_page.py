"""The browser page in web/, driven in Debian's headless Chromium through Playwright.

Each test runs against a real `streamscribe serve` process and a real upload. The page
dispatches a `streamscribe:event` DOM event for every Server-Sent Event it processes,
and an init script records those, the transcript lines and the page phase with their
times, so the tests can check the order in which things happened.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import DEMO_VIDEO, ROOT, ServerProcess, ffmpeg, start_server

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="the browser tests need Debian's chromium at /usr/bin/chromium"),
]

sync_api = pytest.importorskip("playwright.sync_api")

# Debian's Chromium replaces Playwright's own browser build. These flags keep it from
# reaching the network or needing a GPU or a sandbox.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RESULTS = ROOT / "test-results"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}

# The demo transcribes in about 4 s on 2 cores, so the limit leaves room for a slow runner.
JOB_TIMEOUT_MS = 60_000
BREAK_STREAM_AFTER = 3
UPLOAD_LIMIT_BYTES = 2_000_000
API_KEY = "page-test-key"
SEEK_TOLERANCE_SECONDS = 0.3

RECORDER = """
window.pageRecord = { events: [], lines: [], phases: [] };
const phase = () => document.getElementById("main")?.dataset.phase ?? null;
document.addEventListener("streamscribe:event", (event) => {
  pageRecord.events.push({
    id: event.detail.id, event: event.detail.event, data: event.detail.data, at: performance.now(),
  });
});
new MutationObserver(() => {
  const count = document.querySelectorAll("#transcript .line").length;
  const last = pageRecord.lines.at(-1);
  if (count > 0 && (!last || last.count !== count)) {
    pageRecord.lines.push({
      count, at: performance.now(), phase: phase(), events: pageRecord.events.map((e) => e.event),
    });
  }
  if (phase() !== null && pageRecord.phases.at(-1) !== phase()) pageRecord.phases.push(phase());
}).observe(document, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-phase"] });
"""

SRT_TIMING = re.compile(r"(\d{2}):(\d{2}):(\d{2}),(\d{3}) --> (\d{2}):(\d{2}):(\d{2}),(\d{3})")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # launch() gives every run a fresh temporary profile.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def breaking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that ends each upload's own event stream after a few events."""
    process = start_server(
        tmp_path_factory.mktemp("breaking-server"),
        test_break_stream_after=BREAK_STREAM_AFTER,
        max_upload_bytes=UPLOAD_LIMIT_BYTES,
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that requires an API key and also ends each upload's stream early."""
    process = start_server(
        tmp_path_factory.mktemp("keyed-server"),
        api_key=API_KEY,
        test_break_stream_after=BREAK_STREAM_AFTER,
    )
    yield process
    process.stop()


@pytest.fixture
def open_page(browser):
    """Open the page of a server in a new browser context; fails the test on a script error."""
    contexts = []
    script_errors: list[str] = []

    def open_at(server: ServerProcess, viewport: dict[str, int] = DESKTOP):
        context = browser.new_context(
            viewport=viewport,
            accept_downloads=True,
            permissions=["clipboard-read", "clipboard-write"],
        )
        contexts.append(context)
        context.add_init_script(RECORDER)
        page = context.new_page()
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        page.goto(f"{server.url}/")
        return page

    yield open_at
    for context in contexts:
        context.close()
    assert script_errors == []


def wait_for_phase(page, *phases: str) -> str:
    selector = ", ".join(f'#main[data-phase="{phase}"]' for phase in phases)
    page.wait_for_selector(selector, state="attached", timeout=JOB_TIMEOUT_MS)
    return page.get_attribute("#main", "data-phase")


def line_texts(page) -> list[str]:
    return page.locator("#transcript .line .line-text").all_inner_texts()


def line_starts(page) -> list[float]:
    return [float(value) for value in page.locator("#transcript .line").evaluate_all(
        "lines => lines.map(line => line.dataset.start)")]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Parse SRT, asserting the numbering and the timing line format of every cue."""
    cues = []
    blocks = [block for block in re.split(r"\n[ \t]*\n", text.strip()) if block.strip()]
    for number, block in enumerate(blocks, start=1):
        lines = block.splitlines()
        assert lines[0] == str(number), f"cue {number} is numbered {lines[0]!r}"
        timing = SRT_TIMING.fullmatch(lines[1])
        assert timing, f"cue {number} has the timing line {lines[1]!r}"
        values = [int(part) for part in timing.groups()]
        start = values[0] * 3600 + values[1] * 60 + values[2] + values[3] / 1000
        end = values[4] * 3600 + values[5] * 60 + values[6] + values[7] / 1000
        cues.append((start, end, " ".join(lines[2:])))
    return cues


def server_error_message(server: ServerProcess, path: Path) -> dict[str, str]:
    with path.open("rb") as handle:
        response = httpx.post(f"{server.url}/v1/transcriptions", files={"file": (path.name, handle)}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def test_demo_lines_stream_before_done(server, open_page):
    page = open_page(server)
    page.set_input_files("#file-input", str(DEMO_VIDEO))
    assert wait_for_phase(page, "completed", "failed", "cancelled") == "completed"

    record = page.evaluate("pageRecord")
    names = [event["event"] for event in record["events"]]
    ids = [event["id"] for event in record["events"]]
    assert names[0] == "job"
    assert names[-1] == "done"
    assert ids == list(range(len(ids)))

    first_lines = record["lines"][0]
    done_at = record["events"][-1]["at"]
    assert "done" not in first_lines["events"]
    assert first_lines["phase"] == "transcribing"
    assert first_lines["at"] < done_at

    assert page.eval_on_selector("#upload-progress", "bar => bar.value") == 100
    assert page.eval_on_selector("#transcription-progress", "bar => bar.value") == 100
    assert "100" in page.inner_text("#transcription-detail")

    texts = line_texts(page)
    starts = line_starts(page)
    segment_cues = [cue for event in record["events"] if event["event"] == "segment"
                    for cue in event["data"]["cues"] if cue["text"].strip()]
    assert len(texts) == len(segment_cues)
    assert starts == sorted(starts)
    assert "lighthouse" in words(" ".join(texts))

    captions = page.evaluate("""() => {
        const track = document.querySelector("#video").textTracks[0];
        return { mode: track.mode, cues: track.cues.length };
    }""")
    assert captions["mode"] == "showing"
    assert captions["cues"] == len(texts)

    with page.expect_download() as download_info:
        page.get_by_role("link", name="SRT").click()
    download = download_info.value
    assert download.suggested_filename == "demo.srt"
    srt_cues = parse_srt(Path(download.path()).read_text("utf-8"))
    srt_starts = [start for start, _, _ in srt_cues]
    assert srt_starts == sorted(srt_starts)
    assert all(start < end for start, end, _ in srt_cues)
    assert all(end <= next_start for (_, end, _), next_start in zip(srt_cues, srt_starts[1:]))
    assert words(" ".join(text for _, _, text in srt_cues)) == words(" ".join(texts))

    done_text = record["events"][-1]["data"]["text"]
    page.get_by_role("button", name="Copy text").click()
    page.wait_for_function("document.querySelector('#copy-button').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == done_text

    RESULTS.mkdir(exist_ok=True)
    page.evaluate("document.querySelector('#video').currentTime = 20")
    page.wait_for_selector('#transcript .line[aria-current="true"]')
    page.screenshot(path=str(RESULTS / "page-finished.png"), full_page=True)


def test_transcript_lines_seek_video(server, open_page):
    page = open_page(server)
    page.set_input_files("#file-input", str(DEMO_VIDEO))
    assert wait_for_phase(page, "completed", "failed", "cancelled") == "completed"
    starts = line_starts(page)
    video_time = "document.querySelector('#video').currentTime"

    # Keyboard: Tab reaches one line, the arrow keys move between lines, Enter seeks.
    page.focus("#announce-toggle")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "line"
    assert page.evaluate("document.activeElement.dataset.start") == str(starts[0])
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.evaluate("document.querySelector('#video').pause()")
    assert abs(page.evaluate(video_time) - starts[2]) < SEEK_TOLERANCE_SECONDS
    assert page.locator('#transcript .line[tabindex="0"]').count() == 1
    assert page.get_attribute("#transcript li:nth-child(3) .line", "aria-current") == "true"

    page.locator("#transcript .line").nth(5).click()
    page.evaluate("document.querySelector('#video').pause()")
    assert abs(page.evaluate(video_time) - starts[5]) < SEEK_TOLERANCE_SECONDS
    assert page.locator('#transcript .line[aria-current="true"]').count() == 1

    announced = page.inner_text("#announcer")
    assert "lighthouse" in announced


@pytest.mark.parametrize(("name", "content", "title"), [
    ("noaudio.mp4", None, "This file has no sound to transcribe"),
    ("notes.mp4", b"these are meeting notes, not a video\n" * 20, "This is not a video or audio file"),
    ("empty.mp4", b"", "This file is empty"),
])
def test_rejected_file_shows_server_message(server, open_page, tmp_path, name, content, title):
    path = tmp_path / name
    if content is None:
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=5", "-t", "2", "-c:v", "libx264", str(path))
    else:
        path.write_bytes(content)
    expected = server_error_message(server, path)

    page = open_page(server)
    page.set_input_files("#file-input", str(path))
    assert wait_for_phase(page, "rejected", "completed", "failed") == "rejected"

    assert page.is_visible("#intake-error")
    assert page.inner_text("#intake-error-title") == title
    detail = page.inner_text("#intake-error-detail")
    assert expected["message"].lower() in detail.lower()
    assert "Traceback" not in page.inner_text("body")
    assert page.evaluate("document.activeElement.id") == "intake-error"


def test_too_large_file_shows_limit(breaking_server, open_page, tmp_path):
    path = tmp_path / "large.mp4"
    path.write_bytes(b"\0" * (UPLOAD_LIMIT_BYTES + 500_000))

    page = open_page(breaking_server)
    page.set_input_files("#file-input", str(path))
    assert wait_for_phase(page, "rejected", "completed", "failed") == "rejected"

    assert page.inner_text("#intake-error-title") == "This file is too large"
    assert str(UPLOAD_LIMIT_BYTES) in page.inner_text("#intake-error-detail")


def test_dropped_stream_resumes_once(breaking_server, open_page):
    page = open_page(breaking_server, PHONE)
    resume_headers: list[str | None] = []

    def replay_from_start(route):
        # The page must send the id of the last event it processed. The request then
        # goes out asking for events that the page already has, so duplicates reach it.
        headers = dict(route.request.headers)
        resume_headers.append(headers.get("last-event-id"))
        headers["last-event-id"] = "0"
        route.continue_(headers=headers)

    page.route("**/v1/jobs/*/events", replay_from_start)
    page.set_input_files("#file-input", str(DEMO_VIDEO))
    assert wait_for_phase(page, "completed", "failed", "cancelled") == "completed"

    record = page.evaluate("pageRecord")
    assert "reconnecting" in record["phases"]
    assert resume_headers[0] == str(BREAK_STREAM_AFTER - 1)

    # Every event reached the page's handlers once, in order, with none missing.
    ids = [event["id"] for event in record["events"]]
    assert ids == list(range(len(ids)))
    done = record["events"][-1]
    assert done["event"] == "done"

    segment_indexes = [event["data"]["index"] for event in record["events"] if event["event"] == "segment"]
    assert len(segment_indexes) == len(set(segment_indexes))
    assert len(segment_indexes) == done["data"]["segments"]

    job_id = record["events"][0]["data"]["job_id"]
    final = httpx.get(f"{breaking_server.url}/v1/jobs/{job_id}/transcript.json", timeout=30).json()
    texts = line_texts(page)
    assert len(texts) == len(set(zip(texts, line_starts(page))))
    assert texts == [segment["text"].strip() for segment in final["segments"]]

    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "page-phone.png"), full_page=True)


def test_cancel_stops_job(server, open_page):
    page = open_page(server)
    page.set_input_files("#file-input", str(DEMO_VIDEO))
    page.wait_for_function("pageRecord.events.some(event => event.event === 'job')", timeout=JOB_TIMEOUT_MS)
    page.get_by_role("button", name="Cancel").click()
    assert wait_for_phase(page, "cancelled", "completed", "failed") == "cancelled"

    job_id = page.evaluate("pageRecord.events[0].data.job_id")
    status = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()
    assert status["status"] == "cancelled"
    assert page.is_hidden("#cancel-button")
    assert page.is_visible("#another-file")


def test_api_key_prompt_then_upload(keyed_server, open_page):
    page = open_page(keyed_server)
    page.set_input_files("#file-input", str(DEMO_VIDEO))
    assert wait_for_phase(page, "rejected", "completed", "failed") == "rejected"
    assert page.inner_text("#intake-error-title") == "This server needs an API key"
    assert page.is_visible("#api-key-input")

    page.fill("#api-key-input", API_KEY)
    page.get_by_role("button", name="Try the same file again").click()
    assert wait_for_phase(page, "completed", "failed", "cancelled") == "completed"

    # The stream breaks after a few events, so the resume request carried the key too.
    record = page.evaluate("pageRecord")
    assert "reconnecting" in record["phases"]
    done = record["events"][-1]
    assert done["event"] == "done"
    assert len(line_texts(page)) > 0

    with page.expect_download() as download_info:
        page.get_by_role("link", name="SRT").click()
    download = download_info.value
    assert download.suggested_filename == "demo.srt"
    srt_cues = parse_srt(Path(download.path()).read_text("utf-8"))
    assert words(" ".join(text for _, _, text in srt_cues)) == words(" ".join(line_texts(page)))
