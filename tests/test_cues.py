"""Grouping timed words into subtitle cues (`gpu_workers.cues`)."""

from __future__ import annotations

from gpu_workers.cues import MAX_CUE_CHARACTERS, cue_text, group_words
from gpu_workers.segments import Word


def words_from(text: str, *, start: float = 0.0, step: float = 0.3,
               pauses: dict[int, float] | None = None) -> list[Word]:
    """One Word per space-separated token, `step` seconds each, with extra silence before chosen words."""
    words, time = [], start
    for index, token in enumerate(text.split()):
        time += (pauses or {}).get(index, 0.0)
        words.append(Word(start=round(time, 3), end=round(time + step - 0.05, 3), word=" " + token,
                          probability=0.9))
        time += step
    return words


def test_every_word_in_one_cue():
    words = words_from("One two three. Four five, six seven? Eight nine ten eleven twelve.")
    cues = group_words(words)
    assert [word for cue in cues for word in cue] == words


def test_cues_end_after_sentences():
    cues = group_words(words_from("I came. I saw! Did I conquer? Yes."))
    assert [cue_text(cue) for cue in cues] == ["I came.", "I saw!", "Did I conquer?", "Yes."]


def test_closing_quote_ends_sentence():
    cues = group_words(words_from('He said "stop." Then he left.'))
    assert [cue_text(cue) for cue in cues] == ['He said "stop."', "Then he left."]


def test_long_pause_ends_cue():
    words = words_from("so we waited and then it rained", pauses={4: 1.5})
    cues = group_words(words)
    assert [cue_text(cue) for cue in cues] == ["so we waited and", "then it rained"]


def test_short_pause_keeps_cue():
    words = words_from("so we waited and then it rained", pauses={4: 0.3})
    assert len(group_words(words)) == 1


def test_long_sentence_breaks_at_comma():
    text = ("This licence applies to the software, to its documentation and to every "
            "other work that the owner places under its terms without exception here")
    cues = group_words(words_from(text))
    assert len(cues) > 1
    assert all(len(cue_text(cue)) <= MAX_CUE_CHARACTERS for cue in cues)
    assert cue_text(cues[0]).endswith("software,")


def test_long_text_breaks_at_limit():
    text = " ".join(["word"] * 60)
    cues = group_words(words_from(text))
    assert all(len(cue_text(cue)) <= MAX_CUE_CHARACTERS for cue in cues)
    assert sum(len(cue) for cue in cues) == 60


def test_no_words_no_cues():
    assert group_words([]) == []
