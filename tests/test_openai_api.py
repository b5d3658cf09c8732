"""The OpenAI-compatible endpoint, driven by the official `openai` package, unchanged."""

from __future__ import annotations

import io

import pytest
import srt
import webvtt
from openai import APIError, BadRequestError, OpenAI

from tests.helpers import ffmpeg


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def plain_text(client, demo_video) -> str:
    with demo_video.open("rb") as handle:
        return client.audio.transcriptions.create(model="whisper-1", file=handle).text


def _create(client, demo_video, **options):
    with demo_video.open("rb") as handle:
        return client.audio.transcriptions.create(model="whisper-1", file=handle, **options)


def test_json_has_text(plain_text):
    assert "lighthouse" in plain_text.lower()


def test_text_format_equals_json_text(client, demo_video, plain_text):
    assert _create(client, demo_video, response_format="text").strip() == plain_text


def test_verbose_json_fields(client, demo_video, plain_text):
    result = _create(client, demo_video, response_format="verbose_json",
                     timestamp_granularities=["word", "segment"])
    assert result.text == plain_text
    assert result.language == "english"
    assert result.duration == pytest.approx(67.8, abs=0.5)
    assert len(result.segments) >= 3
    starts = [segment.start for segment in result.segments]
    assert starts == sorted(starts)
    for segment in result.segments:
        assert segment.end > segment.start
        assert segment.avg_logprob <= 0
        assert segment.compression_ratio > 0
        assert 0 <= segment.no_speech_prob <= 1
    assert len(result.words) >= 100
    assert result.words[0].word.lower() == "the"
    assert all(word.end >= word.start for word in result.words)


def test_verbose_json_without_words(client, demo_video):
    result = _create(client, demo_video, response_format="verbose_json")
    assert getattr(result, "words", None) is None


def test_srt_parses_and_matches_text(client, demo_video, plain_text):
    subtitles = list(srt.parse(_create(client, demo_video, response_format="srt")))
    assert [cue.index for cue in subtitles] == list(range(1, len(subtitles) + 1))
    for earlier, later in zip(subtitles, subtitles[1:]):
        assert earlier.end <= later.start
    assert " ".join(cue.content for cue in subtitles) == plain_text


def test_vtt_parses_and_matches_text(client, demo_video, plain_text):
    body = _create(client, demo_video, response_format="vtt")
    assert body.startswith("WEBVTT\n")
    captions = webvtt.from_buffer(io.StringIO(body)).captions
    for earlier, later in zip(captions, captions[1:]):
        assert earlier.end_in_seconds <= later.start_in_seconds
    assert " ".join(caption.text for caption in captions) == plain_text


def test_stream_deltas_join_to_text(client, demo_video, plain_text):
    deltas, done = [], []
    for event in _create(client, demo_video, stream=True):
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done.append(event.text)
    assert len(deltas) >= 2
    assert "".join(deltas) == plain_text
    assert done == [plain_text]


def test_unknown_model_rejected(client, demo_video):
    with pytest.raises(BadRequestError) as raised:
        _create_with_model(client, demo_video, "large-v9")
    assert "large-v9" in str(raised.value)


def _create_with_model(client, demo_video, model):
    with demo_video.open("rb") as handle:
        return client.audio.transcriptions.create(model=model, file=handle)


def test_invalid_response_format_rejected(client, demo_video):
    with pytest.raises(BadRequestError):
        _create(client, demo_video, response_format="docx")


def test_no_audio_rejected_before_stream(client, tmp_path):
    video = tmp_path / "picture-only.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=5", "-t", "1", "-c:v", "libx264",
           "-preset", "ultrafast", str(video))
    with pytest.raises(APIError) as raised:
        with video.open("rb") as handle:
            client.audio.transcriptions.create(model="whisper-1", file=handle, stream=True)
    assert "no audio stream" in str(raised.value)
