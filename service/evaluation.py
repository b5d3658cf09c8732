"""Word error rate with English text normalisation, for tests and benchmarks.

Normalising removes differences a reader would not call errors: case, punctuation,
British or American spelling ("colour"/"color", "organise"/"organize"), and
hyphenation.
"""

from __future__ import annotations

import re
import unicodedata

# British spellings mapped to American ones. Only whole words are replaced, so the
# list names the common families rather than trying to be a dictionary.
_SPELLINGS = {
    "colour": "color", "colours": "colors", "favour": "favor", "favourite": "favorite",
    "honour": "honor", "labour": "labor", "neighbour": "neighbor", "neighbours": "neighbors",
    "behaviour": "behavior", "harbour": "harbor", "humour": "humor", "flavour": "flavor",
    "rumour": "rumor", "vapour": "vapor", "armour": "armor", "endeavour": "endeavor",
    "centre": "center", "centres": "centers", "metre": "meter", "metres": "meters",
    "theatre": "theater", "litre": "liter", "fibre": "fiber", "defence": "defense",
    "offence": "offense", "licence": "license", "practise": "practice", "grey": "gray",
    "tyre": "tire", "kerb": "curb", "programme": "program", "catalogue": "catalog",
    "dialogue": "dialog", "analyse": "analyze", "travelled": "traveled",
    "travelling": "traveling", "cancelled": "canceled", "jewellery": "jewelry",
    "cheque": "check", "plough": "plow", "aluminium": "aluminum", "mould": "mold",
    "ageing": "aging", "whilst": "while", "amongst": "among",
}
_ISE = re.compile(r"^(\w{3,})is(e|es|ed|ing|ation|ations)$")
_ISE_EXCEPTIONS = {
    "advertise", "advise", "arise", "comprise", "compromise", "demise", "despise",
    "devise", "disguise", "enterprise", "excise", "exercise", "expertise", "franchise",
    "improvise", "merchandise", "premise", "promise", "revise", "rise", "supervise",
    "surmise", "surprise", "televise", "wise", "otherwise", "likewise", "noise", "raise",
    "praise", "cruise", "bruise", "concise", "precise", "paradise", "treatise", "poise",
}


def _americanise(word: str) -> str:
    if word in _SPELLINGS:
        return _SPELLINGS[word]
    match = _ISE.match(word)
    if match:
        stem = match.group(1)
        base = stem + "ise"
        if base not in _ISE_EXCEPTIONS and not any(base.endswith(e) for e in _ISE_EXCEPTIONS):
            return f"{stem}iz{match.group(2)}"
    return word


def normalize(text: str) -> list[str]:
    """Return the words of `text`, lower-cased, without punctuation, in American spelling."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("’", "'").replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    words = [word.strip("'") for word in text.split()]
    return [_americanise(word) for word in words if word]


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Return the word-level edit distance (substitutions, deletions, insertions)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, start=1):
            current[j] = min(
                previous[j] + 1,
                current[j - 1] + 1,
                previous[j - 1] + (ref_word != hyp_word),
            )
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Return the word error rate of `hypothesis` against `reference`, from 0 up (can pass 1)."""
    ref_words = normalize(reference)
    if not ref_words:
        raise ValueError("the reference text has no words")
    return word_errors(ref_words, normalize(hypothesis)) / len(ref_words)
