"""Window decoding (`gpu_workers.window`) and batched calls in the local pool, on the real model."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import gpu_workers.window
from gpu_workers.segments import SAMPLE_RATE, SegmentInput, SegmentResult, TranscribeOptions
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.backends.local import LocalBackend
from service.evaluation import word_error_rate
from tests.helpers import DEMO_VIDEO


@pytest.fixture(scope="module")
def demo_pcm() -> bytes:
    """The demo video's audio as 16 kHz mono int16."""
    if not DEMO_VIDEO.is_file():
        pytest.skip("sample_media/demo.mp4 is missing; run python sample_media/make_demo.py")
    return subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(DEMO_VIDEO), "-vn", "-ac", "1",
         "-ar", str(SAMPLE_RATE), "-f", "s16le", "-"],
        capture_output=True, check=True,
    ).stdout


@pytest.fixture(scope="module")
def transcriber() -> SegmentTranscriber:
    return SegmentTranscriber(ModelConfig(num_workers=2))


def piece(pcm: bytes, start: float, end: float, index: int = 0, **options: object) -> SegmentInput:
    """The audio from `start` to `end` seconds as a segment placed at `start` on the timeline."""
    first, last = int(start * SAMPLE_RATE) * 2, int(end * SAMPLE_RATE) * 2
    return SegmentInput(index=index, offset=start, pcm=pcm[first:last],
                        options=TranscribeOptions(**options))


class Recorder:
    """Wraps a method and records the argument of each call."""

    def __init__(self, method):
        self.method = method
        self.calls: list[object] = []
        self._lock = threading.Lock()

    def __call__(self, argument):
        with self._lock:
            self.calls.append(argument)
        return self.method(argument)


def assert_cues_in_order(result: SegmentResult) -> None:
    assert result.cues, "expected at least one cue"
    previous_end = result.start
    for cue in result.cues:
        assert result.start <= cue.start <= cue.end <= result.end
        assert cue.start >= previous_end - 0.01
        previous_end = cue.end


def test_window_matches_sequential_path(transcriber, demo_pcm, monkeypatch):
    segment = piece(demo_pcm, 0.0, 27.0)
    decode = Recorder(transcriber.window.decode)
    monkeypatch.setattr(transcriber.window, "decode", decode)
    windowed = transcriber.transcribe(segment)
    sequential = transcriber.transcribe_sequentially(segment)

    assert len(decode.calls) == 1, "a 27 s segment is decoded in one window"
    assert not windowed.failed
    assert windowed.language == "en"
    # The two differ at most in a few words, here around the cut at 27 s.
    assert word_error_rate(sequential.text, windowed.text) <= 0.1
    assert_cues_in_order(windowed)
    assert len(windowed.cues) >= 2, "27 s of speech is more than one sentence"
    assert all(not cue.words for cue in windowed.cues), "words only when asked for"
    assert windowed.text == " ".join(cue.text for cue in windowed.cues)


def test_words_fall_inside_cues(transcriber, demo_pcm):
    result = transcriber.transcribe(piece(demo_pcm, 10.0, 30.0, word_timestamps=True))
    assert_cues_in_order(result)
    for cue in result.cues:
        assert cue.words
        assert cue.text == "".join(word.word for word in cue.words).strip()
        for word in cue.words:
            assert cue.start <= word.start <= word.end <= cue.end


def test_batch_results_keep_input_order(transcriber, demo_pcm):
    segments = [piece(demo_pcm, 0.0, 12.0, index=7), piece(demo_pcm, 20.0, 45.0, index=3),
                piece(demo_pcm, 45.0, 67.0, index=5)]
    together = transcriber.transcribe_batch(segments)
    alone = [transcriber.transcribe(segment) for segment in segments]
    assert [result.index for result in together] == [7, 3, 5]
    for batched, single in zip(together, alone):
        assert word_error_rate(single.text, batched.text) <= 0.05
        assert_cues_in_order(batched)


def test_encoder_one_item_at_a_time_matches_batch(transcriber, demo_pcm):
    decoder = transcriber.window
    features = [decoder._features(piece(demo_pcm, 0.0, 12.0)),
                decoder._features(piece(demo_pcm, 20.0, 45.0))]
    output, items = decoder._encode(features)
    together = np.asarray(decoder.model.encode(np.stack(features)))
    assert np.asarray(output).shape == together.shape == (2, 1500, 384)
    np.testing.assert_allclose(np.asarray(output), together, atol=1e-4)
    assert len(items) == 2
    for index, item in enumerate(items):
        np.testing.assert_array_equal(np.asarray(item)[0], np.asarray(output)[index])


def test_cpu_encoder_runs_one_at_a_time(transcriber, demo_pcm, monkeypatch):
    decoder = transcriber.window
    features = [decoder._features(piece(demo_pcm, 0.0, 12.0))]
    encode = decoder.model.encode
    lock = threading.Lock()
    running = [0]
    max_running = [0]

    def slow_encode(batch):
        with lock:
            running[0] += 1
            max_running[0] = max(max_running[0], running[0])
        try:
            time.sleep(0.2)
            return encode(batch)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(decoder.model, "encode", slow_encode)
    threads = [threading.Thread(target=decoder._encode, args=(features,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max_running[0] == 1


def test_cpu_aligns_items_separately(transcriber, demo_pcm, monkeypatch):
    # One alignment call for a batch of two peaked at 70 MB above the resident set, one item at 17 MB.
    align = transcriber.model.add_word_timestamps
    batch_sizes = []

    def record(segments, *args):
        batch_sizes.append(len(segments))
        return align(segments, *args)

    monkeypatch.setattr(transcriber.model, "add_word_timestamps", record)
    segments = [piece(demo_pcm, 0.0, 12.0, index=0, word_timestamps=True),
                piece(demo_pcm, 20.0, 45.0, index=1, word_timestamps=True)]
    together = transcriber.transcribe_batch(segments)
    assert batch_sizes == [1, 1]
    for batched, segment in zip(together, segments):
        alone = transcriber.transcribe(segment)
        assert batched.text == alone.text
        batched_words = [(word.word, word.start, word.end) for cue in batched.cues for word in cue.words]
        alone_words = [(word.word, word.start, word.end) for cue in alone.cues for word in cue.words]
        assert batched_words == alone_words


def test_differing_options_decode_apart(transcriber, demo_pcm, monkeypatch):
    decode = Recorder(transcriber.window.decode)
    monkeypatch.setattr(transcriber.window, "decode", decode)
    segments = [piece(demo_pcm, 0.0, 10.0, index=0), piece(demo_pcm, 10.0, 20.0, index=1, word_timestamps=True),
                piece(demo_pcm, 20.0, 30.0, index=2)]
    results = transcriber.transcribe_batch(segments)
    assert sorted(len(batch) for batch in decode.calls) == [1, 2]
    assert [bool(result.cues[0].words) for result in results] == [False, True, False]


def test_long_or_warm_segments_go_sequential(transcriber, demo_pcm, monkeypatch):
    decode = Recorder(transcriber.window.decode)
    sequential = Recorder(transcriber.transcribe_sequentially)
    monkeypatch.setattr(transcriber.window, "decode", decode)
    monkeypatch.setattr(transcriber, "transcribe_sequentially", sequential)
    long_segment = piece(demo_pcm, 0.0, 40.0, index=0)
    warm = piece(demo_pcm, 0.0, 10.0, index=1, temperature=0.4)
    # Speech up to the window's very end loses sentences in a window decode.
    full_window = piece(demo_pcm, 20.0, 50.0, index=2)
    results = transcriber.transcribe_batch([long_segment, warm, full_window])
    assert decode.calls == []
    assert [segment.index for segment in sequential.calls] == [0, 1, 2]
    assert all(result.text for result in results)
    assert not any(result.failed for result in results)


def test_failed_quality_check_falls_back(transcriber, demo_pcm, monkeypatch):
    # With a threshold no decode can meet, every window decode counts as too unlikely.
    monkeypatch.setattr(gpu_workers.window, "LOG_PROB_THRESHOLD", 0.0)
    sequential = Recorder(transcriber.transcribe_sequentially)
    monkeypatch.setattr(transcriber, "transcribe_sequentially", sequential)
    segment = piece(demo_pcm, 0.0, 20.0)
    result = transcriber.transcribe(segment)
    assert sequential.calls == [segment]
    assert result.text
    assert not result.failed


def test_silence_gives_empty_result(transcriber):
    # Whisper alone writes "you" over digital silence; the voice-activity check stops it.
    silence = SegmentInput(index=0, offset=3.0, pcm=bytes(2 * SAMPLE_RATE * 10))
    result = transcriber.transcribe(silence)
    assert not result.failed
    assert result.text == ""
    assert result.cues == ()


# ------------------------------------------------------------ batches in the local pool

class BatchRecordingTranscriber:
    """The real transcriber, with each `transcribe_batch` call's segments recorded.

    A call that contains segment `raise_on` raises instead, as a crash in the model would.
    """

    def __init__(self, raise_on: int | None = None) -> None:
        self.raise_on = raise_on
        self.real: SegmentTranscriber | None = None
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()

    def load(self, config: ModelConfig) -> BatchRecordingTranscriber:
        self.real = SegmentTranscriber(config)
        return self

    def transcribe_batch(self, segments: list[SegmentInput]) -> list[SegmentResult]:
        with self._lock:
            self.batches.append([segment.index for segment in segments])
        if self.raise_on is not None and any(segment.index == self.raise_on for segment in segments):
            raise RuntimeError(f"injected crash in the call with segment {self.raise_on}")
        assert self.real is not None
        return self.real.transcribe_batch(segments)


async def run_map(backend: LocalBackend, segments: list[SegmentInput]) -> list[SegmentResult]:
    async def feed() -> AsyncIterator[SegmentInput]:
        for segment in segments:
            await asyncio.sleep(0)
            yield segment

    await backend.start()
    try:
        return [result async for result in backend.map(feed())]
    finally:
        await backend.close()


def demo_segments(pcm: bytes, count: int) -> list[SegmentInput]:
    seconds = len(pcm) / 2 / SAMPLE_RATE
    bounds = np.linspace(0.0, seconds, count + 1)
    return [piece(pcm, float(start), float(end), index=index)
            for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def test_pool_batches_after_first_result(demo_pcm):
    recorder = BatchRecordingTranscriber()
    backend = LocalBackend(ModelConfig(num_workers=2), 2, transcriber_factory=recorder.load,
                           batch_size=2)
    segments = demo_segments(demo_pcm, 9)
    results = asyncio.run(run_map(backend, segments))

    assert sorted(result.index for result in results) == list(range(9))
    assert not any(result.failed for result in results)
    assert all(result.text for result in results)
    assert [len(batch) for batch in recorder.batches[:2]] == [1, 1]
    assert max(len(batch) for batch in recorder.batches) == 2
    assert sorted(index for batch in recorder.batches for index in batch) == list(range(9))


def test_crashed_call_fails_only_its_segments(demo_pcm):
    recorder = BatchRecordingTranscriber(raise_on=4)
    backend = LocalBackend(ModelConfig(num_workers=2), 2, transcriber_factory=recorder.load,
                           batch_size=2)
    results = asyncio.run(run_map(backend, demo_segments(demo_pcm, 8)))

    crashed = next(batch for batch in recorder.batches if 4 in batch)
    failed = sorted(result.index for result in results if result.failed)
    assert failed == sorted(crashed)
    assert all("injected crash" in (result.error or "") for result in results if result.failed)
    assert sorted(result.index for result in results) == list(range(8))


def test_pool_keeps_blas_to_one_thread(demo_pcm):
    backend = LocalBackend(ModelConfig(num_workers=2), 2, batch_size=2)
    asyncio.run(run_map(backend, demo_segments(demo_pcm, 2)))

    blas = [library for library in threadpool_info() if library["user_api"] == "blas"]
    assert blas, "NumPy reports no BLAS library"
    assert all(library["num_threads"] == 1 for library in blas)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        LocalBackend(ModelConfig(), 1, batch_size=0)

