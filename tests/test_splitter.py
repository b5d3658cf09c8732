"""PauseSplitter on synthetic audio whose speech and pauses are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_workers.segments import SAMPLE_RATE
from service.splitter import WINDOW, PauseSplitter, SplitConfig

WINDOWS_PER_SECOND = SAMPLE_RATE / WINDOW


def _pattern(spans: list[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Build audio and VAD probabilities from ("speech" | "pause", seconds) spans.

    Each sample contains its own index modulo 30000, so a test can check that a piece
    contains exactly the samples of its span.
    """
    probs = []
    for kind, seconds in spans:
        count = round(seconds * WINDOWS_PER_SECOND)
        probs += [0.9 if kind == "speech" else 0.05] * count
    probs_array = np.array(probs, dtype=np.float32)
    audio = (np.arange(len(probs) * WINDOW) % 30000).astype(np.int16)
    return audio, probs_array


def _split(audio, probs, config, block_windows=64):
    splitter = PauseSplitter(config)
    pieces = []
    for start in range(0, len(probs), block_windows):
        block_probs = probs[start:start + block_windows]
        block = audio[start * WINDOW:(start + len(block_probs)) * WINDOW]
        pieces += splitter.feed(block, block_probs)
    pieces += splitter.finish()
    return pieces


def _pause_windows(spans):
    """Return (start, end) sample ranges of the pauses in `spans`."""
    ranges, position = [], 0
    for kind, seconds in spans:
        length = round(seconds * WINDOWS_PER_SECOND) * WINDOW
        if kind == "pause":
            ranges.append((position, position + length))
        position += length
    return ranges


CONFIG = SplitConfig(first_segment_seconds=8, segment_seconds=20, max_segment_seconds=30,
                     min_pause_seconds=0.3)

SPANS = [("pause", 0.5), ("speech", 6), ("pause", 0.4), ("speech", 4), ("pause", 1.0),
         ("speech", 12), ("pause", 0.6), ("speech", 9), ("pause", 2.0), ("speech", 5),
         ("pause", 0.5), ("speech", 1.0), ("pause", 0.3)]


def test_spans_tile_the_whole_audio():
    audio, probs = _pattern(SPANS)
    pieces = _split(audio, probs, CONFIG)
    assert pieces[0].span_start == 0
    for earlier, later in zip(pieces, pieces[1:]):
        assert earlier.span_end == later.span_start
    assert pieces[-1].span_end == len(audio)


def test_cuts_fall_inside_pauses():
    audio, probs = _pattern(SPANS)
    pieces = _split(audio, probs, CONFIG)
    pauses = _pause_windows(SPANS)
    for piece in pieces[:-1]:
        assert any(start <= piece.span_end <= end for start, end in pauses), piece.span_end


def test_first_piece_is_short_for_early_words():
    audio, probs = _pattern(SPANS)
    first = _split(audio, probs, CONFIG)[0]
    assert first.span_end / SAMPLE_RATE <= 2 * CONFIG.first_segment_seconds


def test_pieces_hold_exact_samples():
    audio, probs = _pattern(SPANS)
    for piece in _split(audio, probs, CONFIG):
        expected = audio[piece.audio_start:piece.audio_end].astype("<i2").tobytes()
        assert piece.pcm == expected
        assert piece.span_start <= piece.audio_start < piece.audio_end <= piece.span_end


def test_silence_is_trimmed_with_padding():
    audio, probs = _pattern(SPANS)
    first = _split(audio, probs, CONFIG)[0]
    # 0.5 s of leading silence, 0.4 s of padding kept before the speech.
    assert first.audio_start == pytest.approx(0.1 * SAMPLE_RATE, abs=WINDOW)


def test_last_short_piece_is_kept():
    audio, probs = _pattern(SPANS)
    pieces = _split(audio, probs, CONFIG)
    last_speech_end = len(audio) - round(0.3 * WINDOWS_PER_SECOND) * WINDOW
    assert pieces[-1].has_speech
    assert pieces[-1].audio_end >= last_speech_end


def test_speech_without_pause_is_cut_at_hard_maximum():
    audio, probs = _pattern([("speech", 70)])
    pieces = _split(audio, probs, CONFIG)
    lengths = [(piece.span_end - piece.span_start) / SAMPLE_RATE for piece in pieces]
    assert len(pieces) >= 3
    assert lengths[0] <= 2 * CONFIG.first_segment_seconds + 0.1
    assert all(length <= CONFIG.max_segment_seconds + 0.1 for length in lengths)


def test_quietest_window_chosen_without_pause():
    audio, probs = _pattern([("speech", 40)])
    dip = int(12 * WINDOWS_PER_SECOND)
    probs[dip] = 0.4
    first = _split(audio, probs, CONFIG)[0]
    assert first.span_end == dip * WINDOW


def _second_cut(spans) -> float:
    """Return where the second piece ends, in seconds from its start."""
    audio, probs = _pattern(spans)
    second = _split(audio, probs, CONFIG)[1]
    return (second.span_end - second.span_start) / SAMPLE_RATE


FIRST_PIECE = [("speech", 7), ("pause", 1.0)]


def test_short_gap_beats_distant_pause():
    # After the first piece, the only pause lies 8.5 s before the target of 20 s.
    # A gap of 128 ms between words lies at the target.
    spans = FIRST_PIECE + [("speech", 11), ("pause", 1.0), ("speech", 8), ("pause", 0.128),
                           ("speech", 15)]
    assert _second_cut(spans) == pytest.approx(0.5 + 11 + 1.0 + 8 + 0.064, abs=0.05)


def test_pause_beats_nearer_short_gap():
    spans = FIRST_PIECE + [("speech", 18), ("pause", 0.5), ("speech", 1.5), ("pause", 0.128),
                           ("speech", 15)]
    assert _second_cut(spans) == pytest.approx(0.5 + 18 + 0.25, abs=0.05)


def test_single_quiet_window_is_not_a_gap():
    # One window under the silence threshold is a dip inside speech, not a gap. The
    # cut goes to the pause before the target instead.
    audio, probs = _pattern(FIRST_PIECE + [("speech", 12), ("pause", 1.0), ("speech", 25)])
    start = round(8 * WINDOWS_PER_SECOND) + round(20 * WINDOWS_PER_SECOND)
    probs[start] = 0.05
    second = _split(audio, probs, CONFIG)[1]
    assert (second.span_end - second.span_start) / SAMPLE_RATE == pytest.approx(0.5 + 12 + 0.5, abs=0.05)


def test_silent_audio_gives_no_speech_pieces():
    audio, probs = _pattern([("pause", 95)])
    pieces = _split(audio, probs, CONFIG)
    assert pieces
    assert not any(piece.has_speech for piece in pieces)
    assert pieces[-1].span_end == len(audio)


def test_blip_of_noise_is_not_sent():
    audio, probs = _pattern([("pause", 5), ("speech", 0.064), ("pause", 5)])
    pieces = _split(audio, probs, CONFIG)
    assert not any(piece.has_speech for piece in pieces)


def test_no_piece_inside_long_gap():
    spans = [("speech", 10), ("pause", 120), ("speech", 10)]
    audio, probs = _pattern(spans)
    pieces = [piece for piece in _split(audio, probs, CONFIG) if piece.has_speech]
    gap_start, gap_end = 10 * SAMPLE_RATE, 130 * SAMPLE_RATE
    pad = 0.5 * SAMPLE_RATE
    for piece in pieces:
        inside = max(0, min(piece.audio_end, gap_end - pad) - max(piece.audio_start, gap_start + pad))
        assert inside == 0


def test_feed_rejects_partial_windows():
    splitter = PauseSplitter(CONFIG)
    with pytest.raises(ValueError):
        splitter.feed(np.zeros(100, dtype=np.int16), np.zeros(1, dtype=np.float32))


def test_config_rejects_target_over_maximum():
    with pytest.raises(ValueError):
        SplitConfig(segment_seconds=50, max_segment_seconds=45)
