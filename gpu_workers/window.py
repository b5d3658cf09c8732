"""Decode segments that fit in one Whisper window, several in one model call.

The splitter cuts at pauses into segments of at most 29.5 s, so each one is a single pass
of Whisper's encoder and a single beam search. `WhisperModel.transcribe` would give the
same words, but it also spends time the service does not need. It requests timestamp
tokens from the decoder to place its sentences, and it runs a second voice-activity pass
over audio the splitter has already trimmed. On the 10-minute benchmark video this module
uses an eighth less CPU, with a lower word error rate (see docs/benchmarks.md).

What it does instead:
- The decoder writes text tokens only. Each word's time comes from aligning those
  tokens against the encoder output afterwards (faster-whisper's cross-attention
  alignment, as for `word_timestamps=True`), which costs about a tenth of the CPU of a
  window decode (`bench.window_cost`).
  `gpu_workers.cues` then groups the words into sentence cues.
- Segments are stacked into one batch, so one beam search serves them all. The local
  pool and a GPU both run a batch faster than its parts in turn. A GPU also encodes and
  aligns the batch in one call, and a CPU takes those steps one segment at a time.
- Faster-whisper's quality checks still apply: a decode that is too repetitive or too
  unlikely is flagged, and the caller decodes that segment again with
  `WhisperModel.transcribe` and its fallback to higher temperatures. So is a decode
  where Whisper doubts there is speech at all, which then meets the voice-activity
  filter of `transcribe` (the splitter sends only audio with speech, so this is rare).

This leans on methods of `WhisperModel` that `transcribe` itself uses (`encode`,
`get_prompt`, `add_word_timestamps`); pyproject.toml pins faster-whisper for that reason.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

from gpu_workers.segments import SAMPLE_RATE, SegmentInput, Word

WINDOW_SECONDS = 30.0
"""The length of audio that Whisper's encoder takes in one pass."""

MAX_AUDIO_SECONDS = 29.5
"""The longest segment decoded in one window; longer ones take `transcribe`.

Without timestamp tokens, Whisper dropped whole sentences when speech ran to the very
end of the window: fixed 30.0 s cuts of the 10-minute benchmark video gave 50 % word
error rate, 29.9 s cuts 13 %, and 29.5 s cuts 12 %, as good as `transcribe`.
"""

# Faster-whisper's defaults for when a decode is suspect, as in `transcribe`.
COMPRESSION_RATIO_THRESHOLD = 2.4
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class WindowDecode:
    """The result of one segment's window decode, with word times from the segment's start."""

    text: str
    language: str
    words: tuple[Word, ...]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    needs_fallback: bool
    """The text is too repetitive or too unlikely; decode again with temperature fallback."""


def fits_one_window(segment: SegmentInput) -> bool:
    """Return True when `WindowDecoder` can decode the segment as `transcribe` would."""
    options = segment.options
    return segment.duration <= MAX_AUDIO_SECONDS and not options.temperature


class WindowDecoder:
    """Decodes batches of segments of at most `WINDOW_SECONDS` with one loaded model."""

    def __init__(self, model: WhisperModel) -> None:
        self.model = model
        self.multilingual = bool(model.model.is_multilingual)
        # On a CPU, the workers that share this decoder take turns at the encoder (see `_encode`).
        self._encoder_turn = threading.Lock()

    def decode(self, segments: Sequence[SegmentInput]) -> list[WindowDecode]:
        """Decode the segments in one batch; they must share their `TranscribeOptions`."""
        if not segments:
            return []
        options = segments[0].options
        if any(segment.options != options for segment in segments):
            raise ValueError("a window batch takes segments with the same options")
        if not all(fits_one_window(segment) for segment in segments):
            raise ValueError(f"window decoding takes segments of at most {MAX_AUDIO_SECONDS:g} s "
                             "at temperature 0")
        model = self.model
        frames = [self._frames(segment) for segment in segments]
        encoder_output, item_outputs = self._encode([self._features(segment) for segment in segments])
        languages = self._languages(encoder_output, options.language, len(segments))
        # One tokenizer serves the batch: text decoding does not depend on the language,
        # and only the prompt's language token does, which is set per segment below.
        tokenizer = Tokenizer(model.hf_tokenizer, self.multilingual, task="transcribe",
                              language=languages[0])
        previous = tokenizer.encode(" " + options.prompt.strip()) if options.prompt else []
        prompt = model.get_prompt(tokenizer, previous, without_timestamps=True)
        prompts = [list(prompt) for _ in segments]
        if self.multilingual:
            position = prompt.index(tokenizer.language)
            for item, language in zip(prompts, languages):
                item[position] = tokenizer.tokenizer.token_to_id(f"<|{language}|>")

        results = model.model.generate(
            encoder_output,
            prompts,
            beam_size=options.beam_size,
            patience=1,
            length_penalty=1,
            max_length=model.max_length,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            return_scores=True,
            return_no_speech_prob=True,
        )
        tokens = [[token for token in result.sequences_ids[0] if token < tokenizer.eot]
                  for result in results]
        if item_outputs is None:
            words = self._align(tokenizer, encoder_output, tokens, frames)
        else:
            # On a CPU, one alignment call per item peaked 17 MB above the resident set,
            # against 70 MB for a batch of two. Two 29 s windows took 0.18 s of CPU
            # this way against 0.23 s as a batch.
            words = [self._align(tokenizer, output, [item_tokens], [count])[0]
                     for output, item_tokens, count in zip(item_outputs, tokens, frames)]

        decodes = []
        for result, item_tokens, item_words, language in zip(results, tokens, words, languages):
            length = len(result.sequences_ids[0])
            avg_logprob = float(result.scores[0]) * length / (length + 1)
            text = tokenizer.decode(item_tokens).strip()
            compression_ratio = get_compression_ratio(text)
            no_speech = result.no_speech_prob > NO_SPEECH_THRESHOLD
            silent = no_speech and avg_logprob <= LOG_PROB_THRESHOLD
            suspect = compression_ratio > COMPRESSION_RATIO_THRESHOLD or avg_logprob < LOG_PROB_THRESHOLD
            # Whisper writes a confident "you" over digital silence. When it doubts there
            # is speech at all, `transcribe` with its voice-activity filter decides.
            suspect = suspect or (no_speech and options.vad_filter)
            decodes.append(WindowDecode(
                text="" if silent else text,
                language=language,
                words=() if silent else item_words,
                avg_logprob=avg_logprob,
                compression_ratio=compression_ratio,
                no_speech_prob=float(result.no_speech_prob),
                needs_fallback=suspect and not silent,
            ))
        return decodes

    def _features(self, segment: SegmentInput) -> np.ndarray:
        # The audio is padded with silence to a full window before the log-mel
        # spectrogram, as Whisper was trained. Padding the spectrogram with zeros instead
        # (faster-whisper's way) cost 0.6 points of word error rate and 7 % more CPU on
        # the 10-minute benchmark video, from longer decodes.
        window = int(WINDOW_SECONDS * SAMPLE_RATE)
        audio = segment.samples()[:window]
        audio = np.pad(audio, (0, window - len(audio)))
        return self.model.feature_extractor(audio)[:, : window // self.model.feature_extractor.hop_length]

    def _encode(self, features: list[np.ndarray]):
        """Run the encoder over the batch and return its output with each item's output.

        `generate` takes the batch output. `_align` takes the output of each item, which
        only the CPU path returns; on other devices the second value is None.
        """
        if self.model.model.device != "cpu":
            return self.model.encode(np.stack(features)), None
        # On a CPU, one item at a time costs no more time than the batch, and it keeps
        # the attention matrices of a single window alive at once (for tiny.en, six heads
        # of 1500 x 1500 floats per layer). With two workers decoding two segments per call, the
        # 10-minute benchmark video peaked at 586 and 597 MB in two runs, against 695
        # to 762 MB with batched encoding (`bench.compare`).
        # Workers also take turns at the encoder, the largest transient allocation of a
        # call, so one worker encodes while the other runs its beam search. Over two runs
        # each, the service peaked 30 to 45 MB lower at 10 and 60 minutes, in the same time.
        with self._encoder_turn:
            outputs = [np.asarray(self.model.encode(item[np.newaxis])) for item in features]
        items = [ctranslate2.StorageView.from_array(output) for output in outputs]
        if len(items) == 1:
            return items[0], items
        return ctranslate2.StorageView.from_array(np.concatenate(outputs)), items

    def _frames(self, segment: SegmentInput) -> int:
        hop = self.model.feature_extractor.hop_length
        return min(len(segment.pcm) // 2 // hop, int(WINDOW_SECONDS * SAMPLE_RATE) // hop)

    def _languages(self, encoder_output, language: str | None, count: int) -> list[str]:
        if not self.multilingual:
            # English-only models (".en") take no language token, so any other language
            # request gets English text rather than an error.
            return ["en"] * count
        if language:
            return [language] * count
        detected = self.model.model.detect_language(encoder_output)
        return [candidates[0][0][2:-2] for candidates in detected]

    def _align(self, tokenizer: Tokenizer, encoder_output, tokens: list[list[int]],
               frames: list[int]) -> list[tuple[Word, ...]]:
        """Time each word from the cross-attention of the decoded tokens."""
        if not any(tokens):
            return [() for _ in tokens]
        # faster-whisper times a batch as consecutive windows of one recording and
        # shortens a long first word after a pause. Spacing the segments a window apart
        # makes each one start after a pause, as it does in the audio.
        per_second = self.model.frames_per_second
        window_frames = int(WINDOW_SECONDS * per_second)
        segments = [
            [{"seek": index * window_frames, "start": index * WINDOW_SECONDS,
              "end": index * WINDOW_SECONDS + count / per_second, "tokens": item}]
            for index, (item, count) in enumerate(zip(tokens, frames))
        ]
        self.model.add_word_timestamps(segments, tokenizer, encoder_output, frames,
                                       PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, 0.0)
        return [
            tuple(Word(start=round(float(word["start"]) - index * WINDOW_SECONDS, 3),
                       end=round(float(word["end"]) - index * WINDOW_SECONDS, 3),
                       word=word["word"], probability=float(word["probability"]))
                  for word in item[0].get("words", ()))
            for index, item in enumerate(segments)
        ]
