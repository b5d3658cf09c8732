"""Group timed words into subtitle cues.

A segment decoded in one Whisper window comes back as one run of text with a time for
every word (from the model's cross-attention), not as Whisper's own timestamped
sentences. `group_words` turns those words into cues a reader can follow. A cue ends
after a sentence, at a clear pause, or before it grows past two subtitle lines. In the
last case it breaks after the last comma, when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_workers.segments import Word

SENTENCE_END = (".", "?", "!", "。", "？", "！", "…")
CLAUSE_END = (",", ";", ":", "，", "；", "：", "、")

MAX_CUE_CHARACTERS = 84
"""Two subtitle lines of 42 characters, the usual broadcast limit."""

PAUSE_SECONDS = 0.8
"""A silence between two words at least this long ends a cue."""

MIN_CLAUSE_CHARACTERS = 20
"""A cue broken at a comma keeps at least this much text, so no cue is a stray word."""


def _text(words: Sequence[Word]) -> str:
    return "".join(word.word for word in words).strip()


def _ends_with(word: Word, marks: tuple[str, ...]) -> bool:
    return word.word.rstrip().rstrip("\"'”’)]").endswith(marks)


def _clause_break(words: Sequence[Word]) -> int | None:
    """Return how many leading words to keep when breaking after a comma, or None."""
    for index in range(len(words) - 1, 0, -1):
        if _ends_with(words[index - 1], CLAUSE_END) and len(_text(words[:index])) >= MIN_CLAUSE_CHARACTERS:
            return index
    return None


def group_words(
    words: Sequence[Word],
    *,
    max_characters: int = MAX_CUE_CHARACTERS,
    pause_seconds: float = PAUSE_SECONDS,
) -> list[list[Word]]:
    """Split words, in spoken order, into cues; every word lands in exactly one cue."""
    cues: list[list[Word]] = []
    current: list[Word] = []
    for word in words:
        if current and word.start - current[-1].end >= pause_seconds:
            cues.append(current)
            current = []
        elif current and len(_text([*current, word])) > max_characters:
            keep = _clause_break(current)
            if keep is None:
                cues.append(current)
                current = []
            else:
                cues.append(current[:keep])
                current = current[keep:]
        current.append(word)
        if _ends_with(word, SENTENCE_END):
            cues.append(current)
            current = []
    if current:
        cues.append(current)
    return cues


def cue_text(words: Sequence[Word]) -> str:
    """Return the text of a cue, spaced as Whisper spelled its words."""
    return _text(words)
