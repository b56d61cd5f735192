"""VQA answers: normalisation, soft scores and the answer vocabulary.

Written from the published description of the VQA v2 evaluation (Antol et al. 2015 / Goyal et
al. 2017, "VQA evaluation" page), not copied from its script:

* normalisation (:func:`normalize_answer`): newlines/tabs become spaces; punctuation marks are
  removed when they touch a space or when the answer holds a digit-comma-digit number ("1,000"),
  and become a space otherwise ("yes/no" -> "yes no"); a period is removed unless a digit follows
  it ("3.5" stays); then the text is lowercased and split on whitespace, number words
  ("none", "zero" ... "ten") become digits, the articles "a", "an", "the" are dropped and a
  contraction written without its apostrophe ("dont", "couldnt've") gets it back ("don't").
  Apostrophes, colons and ``#$%&*`` are kept, as in the official list of punctuation.
* soft score (:func:`soft_score`): the official accuracy of an answer given the human answers is
  the mean, over the leave-one-out subsets of the (usually 10) humans, of
  ``min(1, #humans in the subset who gave it / 3)``. With 10 humans an answer given by
  n of them scores 0.3, 0.6, 0.9, 1.0 for n = 1, 2, 3, >= 4.
* vocabulary (:func:`build_answer_vocab`): the common UNITER / bottom-up-attention recipe counts
  each question's normalised ``multiple_choice_answer`` over train+val and keeps those seen at
  least 9 times (3,129 answers on the full VQA v2); labels go by decreasing count, ties by the
  answer text, so the order is reproducible. :func:`load_answer_vocab` reads a given vocabulary:
  one answer per line, a JSON list, or a JSON ``{answer: label}`` object (UNITER's ans2label).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# The official evaluation's punctuation set; apostrophe, period, colon and #$%&* are not in it.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions as they should be written; every spelling of one with some or all apostrophes
# dropped maps back to it. "it's", "we're", "i'll", ... are absent: "its", "were", "ill" are words.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll",
    "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am",
    "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock",
    "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've", "she'll", "she's", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've",
    "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
# Apostrophe-free spellings that are ordinary words in an answer ("shed", "lets") stay as written.
_REAL_WORDS = frozenset({"hell", "shed", "shell", "lets", "wed", "well", "were", "ill", "its", "id"})


def _contraction_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for word in _CONTRACTIONS:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for r in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, r):
                variant = "".join(ch for i, ch in enumerate(word) if i not in drop)
                if variant in _REAL_WORDS:
                    continue
                out.setdefault(variant, word)
    return out


CONTRACTIONS: dict[str, str] = _contraction_map()

_NUMBER_WITH_COMMA = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    has_number_comma = _NUMBER_WITH_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p not in text:
            continue
        if has_number_comma or (p + " ") in text or (" " + p) in text:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


@functools.lru_cache(maxsize=1 << 18)  # human answers repeat a lot ("yes", "2"): most calls are hits
def normalize_answer(answer: str) -> str:
    """Normalise one answer the way the official VQA evaluation compares answers."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def soft_score(count: int, num_humans: int = 10) -> float:
    """Official VQA accuracy of an answer that ``count`` of ``num_humans`` people gave.

    Mean over the ``num_humans`` leave-one-out subsets of ``min(1, matches / 3)``: leaving out
    one of the ``count`` matching humans leaves ``count - 1`` matches, leaving out any other human
    leaves ``count``.
    """
    if num_humans <= 0:
        raise ValueError(f"soft_score: num_humans must be positive, got {num_humans}")
    if not 0 <= count <= num_humans:
        raise ValueError(f"soft_score: count {count} outside [0, {num_humans}]")
    if num_humans == 1:  # no leave-one-out subset exists; fall back to the plain min(1, n/3)
        return min(1.0, count / 3.0)
    total = count * min(1.0, (count - 1) / 3.0) + (num_humans - count) * min(1.0, count / 3.0)
    return total / num_humans


def answer_scores(answers: Sequence[str], *, normalized: bool = False) -> dict[str, float]:
    """Soft score of every distinct (normalised) answer among the human ``answers``."""
    norm = list(answers) if normalized else [normalize_answer(a) for a in answers]
    counts = Counter(norm)
    return {a: soft_score(n, len(norm)) for a, n in counts.items()}


def build_answer_vocab(multiple_choice_answers: Iterable[str], *, min_count: int = 9) -> list[str]:
    """Answers whose normalised form occurs at least ``min_count`` times, most frequent first."""
    counts = Counter(normalize_answer(a) for a in multiple_choice_answers)
    counts.pop("", None)  # an answer of only punctuation/articles is no class
    kept = [(a, n) for a, n in counts.items() if n >= min_count]
    kept.sort(key=lambda an: (-an[1], an[0]))
    return [a for a, _ in kept]


def load_answer_vocab(path: str | os.PathLike) -> list[str]:
    """Read a vocabulary file: one answer per line, a JSON list, or a JSON {answer: label} map.

    The answers are returned in label order; they are used as written (they were normalised when
    the vocabulary was made). Duplicates or gaps in the labels are errors naming the file.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(data, Mapping):
            labels = sorted(data.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else -1)
            for i, (ans, lab) in enumerate(labels):
                if not isinstance(lab, int) or isinstance(lab, bool) or lab != i:
                    raise ValueError(f"{name}: labels must be the integers 0..{len(labels) - 1}; answer {ans!r} has {lab!r}")
            vocab = [a for a, _ in labels]
        elif isinstance(data, list):
            vocab = data
        else:
            raise ValueError(f"{name}: expected a JSON list of answers or an {{answer: label}} object, got {type(data).__name__}")
        for i, a in enumerate(vocab):
            if not isinstance(a, str):
                raise ValueError(f"{name}: entry {i} is {type(a).__name__}, expected a string answer")
    else:
        vocab = [line.rstrip("\r\n") for line in text.splitlines()]
        while vocab and vocab[-1] == "":
            vocab.pop()
        for i, a in enumerate(vocab):
            if a == "":
                raise ValueError(f"{name}: line {i + 1}: empty answer")
    seen: dict[str, int] = {}
    for i, a in enumerate(vocab):
        if a in seen:
            raise ValueError(f"{name}: answer {a!r} appears twice (entries {seen[a]} and {i})")
        seen[a] = i
    if not vocab:
        raise ValueError(f"{name}: the answer vocabulary is empty")
    return vocab


def save_answer_vocab(vocab: Sequence[str], path: str | os.PathLike) -> None:
    """Write a vocabulary as a JSON list (answer i has label i)."""
    from vlframe.io import atomic_write

    text = json.dumps(list(vocab), ensure_ascii=False, indent=0) + "\n"
    atomic_write(path, lambda f: f.write(text), binary=False)
