"""Unusual and damaged media, end to end against a real server and the real model.

Every test builds its own input with espeak-ng, ffmpeg or numpy, so the expected text
and timings are known. The speech is espeak-ng reading plain words that Whisper tiny.en
transcribes with few errors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import wave
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest

from service.evaluation import normalize, word_error_rate
from service.splitter import PAD_SECONDS
from tests.helpers import (
    FFMPEG,
    Event,
    ServerProcess,
    ffmpeg,
    files_under,
    post_file,
    start_server,
    transcribe,
    wrap_in_mp4,
)

FIRST = ("We walked to the market on a sunny morning and bought fresh milk and apples. "
         "Then we went home and made lunch for the whole family.")
SECOND = ("Please open the window because the room is very warm today. "
          "The train leaves the station at nine in the morning.")
THIRD = ("My brother likes to read books about ships and the sea. "
         "He wants to be a sailor when he grows up.")

MAX_WER = 0.15
"""Word error rate allowed for the espeak-ng speech. tiny.en (int8, CPU) scored 0 to 0.1 on it."""

RATE = 16_000
FFPROBE = shutil.which("ffprobe") or "ffprobe"
CLEANUP_SECONDS = 5.0
"""How long a finished job may take to remove its folder after the `done` event."""


# --- Building inputs ---------------------------------------------------------------


def _speak(text: str, path: Path) -> Path:
    """Write `text` spoken by espeak-ng as a 16 kHz mono 16-bit WAV."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text],
                   check=True, capture_output=True)
    ffmpeg("-i", str(raw), "-ar", str(RATE), "-ac", "1", "-c:a", "pcm_s16le", str(path))
    raw.unlink()
    return path


def _read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path)) as reader:
        assert reader.getframerate() == RATE
        assert reader.getnchannels() == 1
        return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")


def _write_pcm(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(samples.astype("<i2").tobytes())
    return path


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def _seconds(samples: np.ndarray) -> float:
    return len(samples) / RATE


def _speech_onset(samples: np.ndarray) -> float:
    """Return the time of the first sample louder than 2 % of full scale."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 0.02 * 32768)
    return float(loud[0]) / RATE


def _top_level_boxes(path: Path) -> list[str]:
    """Return the types of an MP4 file's top-level boxes, in file order."""
    boxes = []
    data = path.read_bytes()
    position = 0
    while position + 8 <= len(data):
        size = int.from_bytes(data[position:position + 4], "big")
        boxes.append(data[position + 4:position + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[position + 8:position + 16], "big")
        elif size == 0:
            size = len(data) - position
        position += size
    return boxes


def _ffprobe_streams(path: Path) -> list[dict]:
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-show_streams", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout)["streams"]


def _video_with_audio(audio_inputs: list[list[str]], output: Path, *audio_options: str,
                      seconds: float | None = None, webm: bool = False) -> Path:
    """Mux a small gray picture with audio inputs, each a list of ffmpeg input options.

    The output lasts `seconds`, or as long as its shortest stream when that is None.
    """
    args = ["-f", "lavfi", "-i", "color=c=gray:size=160x120:rate=5"]
    for audio in audio_inputs:
        args += audio
    args += ["-map", "0:v"]
    for number in range(1, len(audio_inputs) + 1):
        args += ["-map", f"{number}:a"]
    if webm:
        args += ["-c:v", "libvpx", "-deadline", "realtime", "-b:v", "50k"]
    else:
        args += ["-c:v", "libx264", "-preset", "ultrafast"]
    args += ["-shortest"] if seconds is None else ["-t", str(seconds)]
    ffmpeg(*args, *audio_options, str(output))
    return output


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three sentences as 16 kHz mono WAV files, keyed by their text."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("speech")
    return {text: _speak(text, folder / f"speech-{number}.wav")
            for number, text in enumerate((FIRST, SECOND, THIRD))}


@pytest.fixture(scope="module")
def two_sentences(speech: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FIRST then SECOND with half a second between them, about 16 s in all."""
    samples = np.concatenate([_read_pcm(speech[FIRST]), _silence(0.5), _read_pcm(speech[SECOND])])
    return _write_pcm(tmp_path_factory.mktemp("two") / "two-sentences.wav", samples)


# --- Reading results -----------------------------------------------------------------


def _named(events: list[Event], name: str) -> list[dict]:
    return [event.data for event in events if event.name == name]


def _assert_completed(events: list[Event]) -> dict:
    """Check the stream's shape and return the `done` data."""
    names = [event.name for event in events]
    assert names[0] == "job"
    assert names[-1] == "done"
    assert _named(events, "error") == []
    done = events[-1].data
    assert done["status"] == "completed"
    return done


def _cues(events: list[Event]) -> list[dict]:
    segments = sorted(_named(events, "segment"), key=lambda segment: segment["start"])
    return [cue for segment in segments for cue in segment["cues"]]


def _wait_until_empty(root: Path) -> list[Path]:
    """Return the files left under `root`, after giving a finished job time to clean up."""
    deadline = time.monotonic() + CLEANUP_SECONDS
    while files_under(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return files_under(root)


def _post(server: ServerProcess, path: Path) -> httpx.Response:
    with httpx.Client(timeout=60) as client:
        return post_file(client, f"{server.url}/v1/transcriptions", path)


def _assert_rejected(server: ServerProcess, response: httpx.Response, status: int, code: str,
                     filename: str) -> str:
    """Check that the upload was rejected with a JSON error and left no file, and return
    the error message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert filename in error["message"]
    assert _wait_until_empty(server.temp_root) == []
    return error["message"]


# --- Truncated files and the MP4 index -------------------------------------------------


def test_truncated_mp4_rejected_as_incomplete(server, two_sentences, tmp_path):
    whole = wrap_in_mp4(two_sentences, tmp_path / "whole.mp4")
    assert _top_level_boxes(whole).index("moov") > _top_level_boxes(whole).index("mdat")
    data = whole.read_bytes()
    half = tmp_path / "recording.mp4"
    half.write_bytes(data[: len(data) // 2])

    message = _assert_rejected(server, _post(server, half), 422, "incomplete_file", "recording.mp4")

    assert "incomplete" in message


def test_truncated_webm_transcribed_up_to_cut(server, two_sentences, tmp_path):
    whole = _video_with_audio([["-i", str(two_sentences)]], tmp_path / "whole.webm",
                              "-c:a", "libopus", webm=True)
    data = whole.read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: int(len(data) * 0.6)])

    events = transcribe(server.url, cut)

    done = _assert_completed(events)
    assert done["truncated"] is True
    assert any("cut short" in note for note in done["notes"]), done["notes"]
    words = set(normalize(done["text"]))
    assert {"market", "sunny", "morning", "apples", "lunch", "family"} <= words, done["text"]
    # The cut falls inside SECOND's first sentence, so its second one never decodes.
    assert not {"train", "station"} & words, done["text"]
    assert _wait_until_empty(server.temp_root) == []


def _make_m4a(source: Path, output: Path) -> Path:
    ffmpeg("-i", str(source), "-c:a", "aac", str(output))
    return output


@pytest.mark.parametrize(("name", "make"), [("index-at-end.mp4", wrap_in_mp4),
                                            ("index-at-end.m4a", _make_m4a)], ids=["mp4", "m4a"])
def test_index_at_end_transcribed(server, two_sentences, tmp_path, name, make):
    media = make(two_sentences, tmp_path / name)
    boxes = _top_level_boxes(media)
    assert boxes.index("moov") > boxes.index("mdat"), boxes

    events = transcribe(server.url, media)

    done = _assert_completed(events)
    assert done["truncated"] is False
    assert word_error_rate(f"{FIRST} {SECOND}", done["text"]) <= MAX_WER, done["text"]


# --- Which audio stream ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "codec"), [("silent.mkv", "libx264"), ("silent.webm", "libvpx")],
                         ids=["mkv", "webm"])
def test_video_without_audio_rejected(server, tmp_path, name, codec):
    video = tmp_path / name
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=5", "-t", "2", "-c:v", codec,
           *(["-preset", "ultrafast"] if codec == "libx264" else ["-deadline", "realtime"]),
           str(video))

    message = _assert_rejected(server, _post(server, video), 422, "no_audio_stream", name)

    assert "no audio stream" in message


@pytest.fixture(scope="module", params=["mkv", "mp4"])
def two_tracks(request, speech, tmp_path_factory) -> Path:
    """A video with FIRST on audio track 0 (eng) and THIRD on track 1 (deu, the default)."""
    output = tmp_path_factory.mktemp("tracks") / f"two-tracks.{request.param}"
    _video_with_audio(
        [["-i", str(speech[FIRST])], ["-i", str(speech[THIRD])]], output,
        "-c:a", "aac",
        "-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=deu",
        "-disposition:a:1", "default", "-disposition:a:0", "0",
        seconds=9,
    )
    audio = [stream for stream in _ffprobe_streams(output) if stream["codec_type"] == "audio"]
    assert [stream["disposition"]["default"] for stream in audio] == [0, 1]
    return output


def test_default_audio_track_used(server, two_tracks):
    events = transcribe(server.url, two_tracks)

    job = events[0].data
    assert job["audio_tracks"] == 2
    assert job["audio_track"] == 1
    assert job["audio_stream_index"] == 2
    assert job["audio_language"] == "deu"
    done = _assert_completed(events)
    assert word_error_rate(THIRD, done["text"]) <= MAX_WER, done["text"]


def test_audio_track_field_picks_track(server, two_tracks):
    events = transcribe(server.url, two_tracks, data={"audio_track": "0"})

    job = events[0].data
    assert job["audio_track"] == 0
    assert job["audio_stream_index"] == 1
    assert job["audio_language"] == "eng"
    done = _assert_completed(events)
    assert word_error_rate(FIRST, done["text"]) <= MAX_WER, done["text"]


# --- No speech at all ---------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "anullsrc=r=16000:cl=mono",
    # Pink noise at an amplitude of 0.01, about -40 dBFS.
    "anoisesrc=color=pink:amplitude=0.01:r=16000:seed=7",
], ids=["silence", "faint-noise"])
def test_no_speech_gives_no_segments(server, tmp_path, source):
    audio = tmp_path / "quiet.wav"
    ffmpeg("-f", "lavfi", "-i", source, "-t", "30", "-c:a", "pcm_s16le", str(audio))

    events = transcribe(server.url, audio)

    done = _assert_completed(events)
    assert _named(events, "segment") == []
    assert done["segments"] == 0
    assert done["text"] == ""


def _repeated_lines(texts: list[str]) -> dict[str, int]:
    """Return each normalised sentence that occurs three or more times, with its count."""
    sentences = [" ".join(normalize(sentence))
                 for text in texts for sentence in re.split(r"[.!?\n]+", text)]
    counts = Counter(sentence for sentence in sentences if sentence)
    return {sentence: count for sentence, count in counts.items() if count >= 3}


def test_silent_gap_invents_nothing(server, speech, tmp_path):
    before, after = _read_pcm(speech[FIRST]), _read_pcm(speech[SECOND])
    gap_start = _seconds(before)
    gap_end = gap_start + 120.0
    audio = _write_pcm(tmp_path / "gap.wav", np.concatenate([before, _silence(120.0), after]))

    events = transcribe(server.url, audio)

    done = _assert_completed(events)
    # One second inside each edge: segments keep PAD_SECONDS of silence around speech.
    inside_start, inside_end = gap_start + 1.0, gap_end - 1.0
    for segment in _named(events, "segment"):
        if segment["text"]:
            assert segment["end"] <= inside_start or segment["start"] >= inside_end, segment
    for cue in _cues(events):
        assert cue["end"] <= inside_start or cue["start"] >= inside_end, cue
    assert _repeated_lines([cue["text"] for cue in _cues(events)]) == {}
    after_gap = " ".join(cue["text"] for cue in _cues(events) if cue["start"] >= inside_end)
    assert word_error_rate(SECOND, after_gap) <= MAX_WER, after_gap
    assert word_error_rate(f"{FIRST} {SECOND}", done["text"]) <= MAX_WER, done["text"]


def test_music_has_no_repeated_lines(server, tmp_path):
    # Two voices a fifth apart step through five notes, three a second, over a low drone,
    # with a 3 Hz tremolo. Unlike steady chords, this passes the splitter's voice
    # detector (it made two segments when this test was written), so Whisper hears it.
    step = "floor(mod(3*t,5))"
    tremolo = "(0.5+0.5*sin(2*PI*3*t))"
    melody = (f"0.2*sin(2*PI*(196+49*{step})*t)*{tremolo}"
              f" + 0.1*sin(2*PI*(392+98*{step})*t)*{tremolo}"
              " + 0.05*sin(2*PI*98*t)")
    audio = tmp_path / "music.wav"
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc='{melody}':s={RATE}:d=30", "-c:a", "pcm_s16le",
           str(audio))

    events = transcribe(server.url, audio)

    done = _assert_completed(events)
    assert _repeated_lines([cue["text"] for cue in _cues(events)]) == {}, done["text"]
    assert _repeated_lines([done["text"]]) == {}, done["text"]


# --- Unusual sample rates and channel layouts ----------------------------------------------


def _telephone(speech: dict[str, Path], folder: Path) -> tuple[Path, str]:
    output = folder / "call.wav"
    ffmpeg("-i", str(speech[SECOND]), "-ar", "8000", "-c:a", "pcm_mulaw", str(output))
    return output, SECOND


def _surround_centre(speech: dict[str, Path], folder: Path) -> tuple[Path, str]:
    output = _video_with_audio([["-i", str(speech[THIRD])]], folder / "centre.mkv",
                               "-af", "aresample=48000,pan=5.1|FC=c0", "-c:a", "aac")
    return output, THIRD


def _surround_everywhere(speech: dict[str, Path], folder: Path) -> tuple[Path, str]:
    output = _video_with_audio([["-i", str(speech[THIRD])]], folder / "all.mkv",
                               "-af", "aresample=48000,pan=5.1|FL=c0|FR=c0|FC=c0|LFE=c0|BL=c0|BR=c0",
                               "-c:a", "aac")
    return output, THIRD


def _phase_inverted(speech: dict[str, Path], folder: Path) -> tuple[Path, str]:
    output = folder / "inverted.wav"
    ffmpeg("-i", str(speech[THIRD]), "-af", "pan=stereo|c0=c0|c1=-1*c0", "-c:a", "pcm_s16le",
           str(output))
    return output, THIRD


@pytest.mark.parametrize(("make", "channels", "sample_rate"), [
    (_telephone, 1, 8000),
    (_surround_centre, 6, 48000),
    (_surround_everywhere, 6, 48000),
    (_phase_inverted, 2, 16000),
], ids=["mulaw-8khz", "surround-centre", "surround-all", "stereo-phase-inverted"])
def test_unusual_layout_transcribed(server, speech, tmp_path, make, channels, sample_rate):
    media, text = make(speech, tmp_path)
    audio = [stream for stream in _ffprobe_streams(media) if stream["codec_type"] == "audio"]
    assert (audio[0]["channels"], int(audio[0]["sample_rate"])) == (channels, sample_rate)

    events = transcribe(server.url, media)

    assert events[0].data["audio_channels"] == channels
    done = _assert_completed(events)
    assert word_error_rate(text, done["text"]) <= MAX_WER, done["text"]


# --- Timeline --------------------------------------------------------------------------------


def test_late_audio_on_video_timeline(server, speech, tmp_path):
    delay = 4.0
    samples = np.concatenate([_silence(1.5), _read_pcm(speech[THIRD])])
    audio = _write_pcm(tmp_path / "late.wav", samples)
    onset = _speech_onset(samples)
    # The reference has the same AAC audio starting with the picture, so both decode to
    # the same samples and only the timeline differs.
    on_time = _video_with_audio([["-i", str(audio)]], tmp_path / "on-time.mp4",
                                "-c:a", "aac", seconds=13)
    late = _video_with_audio([["-itsoffset", str(delay), "-i", str(audio)]],
                             tmp_path / "late-audio.mp4", "-c:a", "aac", seconds=13)
    audio_stream = next(s for s in _ffprobe_streams(late) if s["codec_type"] == "audio")
    assert float(audio_stream["start_time"]) == pytest.approx(delay, abs=0.1)

    reference = transcribe(server.url, on_time, data={"word_timestamps": "true"})
    events = transcribe(server.url, late, data={"word_timestamps": "true"})

    done = _assert_completed(events)
    assert word_error_rate(THIRD, done["text"]) <= MAX_WER, done["text"]
    first_cue = _cues(events)[0]
    # A segment keeps PAD_SECONDS before the speech, and Whisper often starts the first
    # cue at the segment's first sample, so the cue may begin up to that much early.
    assert delay + onset - PAD_SECONDS - 0.3 <= first_cue["start"] <= delay + onset + 0.3
    expected = [cue["start"] + delay for cue in _cues(reference)]
    assert [cue["start"] for cue in _cues(events)] == pytest.approx(expected, abs=0.3)
    expected_words = [word["start"] + delay for cue in _cues(reference) for word in cue["words"]]
    words = [word["start"] for cue in _cues(events) for word in cue["words"]]
    assert len(words) == len(expected_words)
    assert words == pytest.approx(expected_words, abs=0.3)


# --- File names ------------------------------------------------------------------------------


UNUSUAL_NAMES = [
    "réunion café – 日本語.wav",
    "name with  two spaces.wav",
    "it's \"quoted\".wav",
    "-y -i evil.wav",
    "`touch streamscribe-pwned`;$(touch streamscribe-pwned).wav",
]

ATTR_CHARS = re.compile(r"(?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+")
"""RFC 8187 `value-chars`: what may follow UTF-8'' in an extended header parameter."""


def _parse_content_disposition(header: str) -> tuple[str, dict[str, str]]:
    """Split an RFC 6266 Content-Disposition value into its type and parameters.

    Raises AssertionError on anything the grammar does not allow.
    """
    token = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    quoted = r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"'
    match = re.fullmatch(rf"({token})((?:\s*;\s*{token}\*?=(?:{token}|{quoted}))*)\s*", header)
    assert match, f"Content-Disposition does not parse: {header!r}"
    params = {}
    for name, value in re.findall(rf"({token}\*?)=({token}|{quoted})", match.group(2)):
        assert name.lower() not in params, f"duplicate parameter {name!r} in {header!r}"
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[name.lower()] = value
    return match.group(1).lower(), params


@pytest.fixture(scope="module")
def plain_name_text(server, speech) -> str:
    events = transcribe(server.url, speech[THIRD], filename="plain.wav")
    return _assert_completed(events)["text"]


@pytest.mark.parametrize("name", [*UNUSUAL_NAMES, "$(touch {marker}).wav"],
                         ids=["non-ascii", "spaces", "quotes", "leading-dash", "shell-in-name",
                              "shell-with-path"])
def test_unusual_filename(server, speech, plain_name_text, tmp_path, name):
    marker = tmp_path / "pwned"
    sent = name.replace("{marker}", str(marker))
    # The service keeps only the last path component of a client's file name.
    expected_filename = sent.rsplit("/", 1)[-1]

    events = transcribe(server.url, speech[THIRD], filename=sent)

    assert events[0].data["filename"] == expected_filename
    done = _assert_completed(events)
    assert done["text"] == plain_name_text
    assert not marker.exists()
    for folder in (Path.cwd(), Path(__file__).resolve().parent.parent):
        assert not (folder / "streamscribe-pwned").exists()

    response = httpx.get(f"{server.url}/v1/jobs/{done['job_id']}/transcript.srt", timeout=30)
    assert response.status_code == 200
    raw = next(value for key, value in response.headers.raw if key.lower() == b"content-disposition")
    header = raw.decode("ascii")
    assert header.isprintable()
    kind, params = _parse_content_disposition(header)
    assert kind == "attachment"
    assert params["filename"].isascii()
    assert params["filename"].endswith(".srt")
    charset, _, encoded = params["filename*"].partition("''")
    assert charset.upper() == "UTF-8"
    assert ATTR_CHARS.fullmatch(encoded), encoded
    stem = expected_filename.rsplit(".", 1)[0]
    assert unquote(encoded, encoding="utf-8", errors="strict") == f"{stem}.srt"


# --- Duration limit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_second_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    process = start_server(tmp_path_factory.mktemp("short-limit"), max_duration_seconds=10)
    yield process
    process.stop()


def _twenty_seconds(speech: dict[str, Path], path: Path) -> Path:
    samples = np.concatenate([_read_pcm(speech[FIRST]), _silence(0.5), _read_pcm(speech[THIRD])])
    samples = np.concatenate([samples, _silence(20.0 - _seconds(samples))])
    return _write_pcm(path, samples)


def _assert_rejected_before_start(server: ServerProcess, response: httpx.Response,
                                  filename: str) -> None:
    message = _assert_rejected(server, response, 413, "duration_too_long", filename)
    assert "10 s" in message
    assert f"started: {filename!r}" not in server.log()


def test_duration_over_limit_rejected(ten_second_server, speech, tmp_path):
    audio = _twenty_seconds(speech, tmp_path / "twenty.wav")

    _assert_rejected_before_start(ten_second_server, _post(ten_second_server, audio), "twenty.wav")


def test_duration_limit_headerless_webm(ten_second_server, speech, tmp_path):
    """A WebM written to a pipe, as a live recording is, has no duration in its header."""
    source = _twenty_seconds(speech, tmp_path / "twenty.wav")
    recording = tmp_path / "recording.webm"
    with recording.open("wb") as handle:
        subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(source), "-c:a", "libopus",
                        "-f", "webm", "pipe:1"], stdout=handle, check=True)
    probed = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "format=duration",
                             "-of", "csv=p=0", str(recording)], capture_output=True, text=True)
    assert probed.stdout.strip() == "N/A"

    _assert_rejected_before_start(ten_second_server, _post(ten_second_server, recording),
                                  "recording.webm")
