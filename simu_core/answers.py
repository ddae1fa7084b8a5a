"""Matching free-form generated answers against short references (bottom layer: no torch, no model).

A completion-style model does not stop after the fact: "The capital of France is" continues
" Paris.\\n\\nThe city is ...". These functions cut out the answer and compare it leniently:

- `first_answer(text, sentences=1)`: the first non-empty line, cut after its first sentence(s)
  (rule below); `sentence_count(text)` counts sentences by the same rule.
- `normalise(text)`: SQuAD-style normalisation (lowercase, no punctuation, no articles, single
  spaces), plus accent folding ("Malé" = "Male", "Brasília" = "Brasilia").
- `answer_matches(prediction, reference)`: normalised first answer == normalised reference (the
  first answer has as many sentences as the reference: one for "Paris" or "The capital is Paris.").
- `answer_begins_with(prediction, reference)`: the normalised first answer starts with the whole
  normalised reference ("yen, which is the official currency" begins with "yen").
- `answer_contained(prediction, reference)`: the normalised reference occurs as whole words
  anywhere in the normalised prediction (the prediction as given, not only its first answer).

Sentence rule of `first_answer`: a sentence ends at ".", "!" or "?" (or a run of them) followed by
white space or the end of the line. A "." does not end a sentence when the word it closes is a
single letter (an initial: "F. Scott Fitzgerald", "J. R. R. Tolkien"), is a dotted abbreviation of
short letter groups ("D.C.", "U.S.", "e.g.", "Ph.D."), or is a common abbreviation of `ABBREVIATIONS` ("St.",
"Mt.", "Dr."...). A "." between digits ("3.14") is never followed by white space, so never ends one.
Known limit: a sentence that really ends with an initial or an abbreviation ("... in the U.S. It
...") runs on into the next one; matching by `answer_begins_with` is unaffected.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from simu_core.errors import SimuError

ABBREVIATIONS = frozenset(
    "st mt ft dr mr mrs ms prof jr sr vs no gen col lt sgt capt rev hon inc ltd co corp approx ca cf fig vol".split()
)
_ARTICLES = frozenset(("a", "an", "the"))
_DELETED = frozenset(".'\u2019\u2018`\u00b4")  # removed outright: "D.C." -> "DC", "Sana'a" -> "Sanaa"
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_DOTTED = re.compile(r"(?:[^\W\d_]{1,3}\.)+[^\W\d_]{1,3}")  # letters only, so "3.14" is not one


def first_line(text: str) -> str:
    """The first line of `text` with any text on it (stripped); "" when there is none."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _ends_sentence(line: str, match: re.Match) -> bool:
    """Whether the end mark at `match` closes a sentence (see the module docstring)."""
    if match.group() != ".":
        return True  # "!", "?", "?!" or an ellipsis
    before = line[: match.start()].split()
    word = before[-1].lstrip("\"'([{") if before else ""
    if len(word) == 1 and word.isalpha():
        return False  # an initial
    if _DOTTED.fullmatch(word):
        return False  # a dotted abbreviation: "D.C", "U.S", "e.g", "Ph.D"
    return word.lower() not in ABBREVIATIONS


def _sentence_ends(line: str) -> list[int]:
    """Positions just after each end mark of `line` that closes a sentence."""
    return [m.end() for m in _SENTENCE_END.finditer(line) if _ends_sentence(line, m)]


def sentence_count(text: str) -> int:
    """Sentences in `text` read as one line (line breaks as spaces): closed ones plus a trailing unclosed
    one; 0 for blank text. "Paris" and "Paris." have 1, "He was born in Paris. He writes." has 2."""
    line = " ".join(text.split())
    if not line:
        return 0
    ends = _sentence_ends(line)
    return len(ends) + (not ends or ends[-1] < len(line))


def first_answer(text: str, sentences: int = 1) -> str:
    """The first `sentences` sentences of the first non-empty line of a generated answer (stripped, end
    mark kept); the whole line when it has fewer."""
    line = first_line(text)
    ends = _sentence_ends(line)
    if sentences < 1 or len(ends) < sentences:
        return line
    return line[: ends[sentences - 1]].strip()


def normalise(text: str) -> str:
    """Lowercase, fold accents, drop punctuation and the articles a/an/the, collapse white space.

    "." and apostrophes are deleted ("D.C." -> "dc"); any other punctuation or symbol becomes a
    space ("Port-au-Prince" -> "port au prince").
    """
    folded = unicodedata.normalize("NFKD", text)
    chars = []
    for ch in folded:
        if unicodedata.combining(ch):
            continue
        if ch in _DELETED:
            continue
        chars.append(" " if unicodedata.category(ch)[0] in "PS" else ch)
    words = "".join(chars).lower().split()
    return " ".join(w for w in words if w not in _ARTICLES)


def answer_matches(prediction: str, reference: str) -> bool:
    """True when the normalised first answer of `prediction` equals the normalised `reference`.

    The first answer has as many sentences as the reference (one for a short answer such as "Paris",
    two for a two-sentence reference), so a prediction that reproduces the reference and then goes
    on matches, and one that stops short or runs on within the sentence does not.
    """
    ref = normalise(reference)
    return bool(ref) and normalise(first_answer(prediction, sentence_count(reference))) == ref


def answer_begins_with(prediction: str, reference: str) -> bool:
    """True when the normalised first answer of `prediction` (as many sentences as the reference) starts
    with the whole normalised `reference`."""
    ref = normalise(reference)
    if not ref:
        return False
    pred = normalise(first_answer(prediction, sentence_count(reference)))
    return pred == ref or pred.startswith(ref + " ")


def answer_contained(prediction: str, reference: str) -> bool:
    """True when the normalised `reference` occurs as whole words in the normalised `prediction`."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(prediction)} "


_RULES = {"match": answer_matches, "begins": answer_begins_with, "contained": answer_contained}


def gives_answer(prediction: str, item: dict) -> bool:
    """Whether `prediction` gives `item`'s answer. Items with `accepted_answers` (the real-knowledge
    benchmark) use the rule they were selected with: the answer begins with one of them; the others
    use `answer_matches` (the answer's first sentence(s) equal the gold answer, normalised)."""
    accepted = item.get("accepted_answers")
    if accepted:
        return any_reference(prediction, accepted, "begins")
    return answer_matches(prediction, item["answer"])


def any_reference(prediction: str, references: Sequence[str], rule: str = "match") -> bool:
    """True when `prediction` agrees with any of `references` under `rule` (match | begins | contained)."""
    if rule not in _RULES:
        raise SimuError(f"unknown answer rule '{rule}'. Choose one of: {', '.join(_RULES)}.")
    check = _RULES[rule]
    return any(check(prediction, ref) for ref in references)


def match_rate(predictions: Sequence[str], references: Sequence[str], rule: str = "match") -> float:
    """Fraction of predictions that agree with their reference under `rule` (0.0 for no items)."""
    if len(predictions) != len(references):
        raise SimuError(f"{len(predictions)} predictions for {len(references)} references; pass one of each per item.")
    if not references:
        return 0.0
    return sum(any_reference(p, [r], rule) for p, r in zip(predictions, references, strict=True)) / len(references)
