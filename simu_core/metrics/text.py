"""Text metrics on strings (pure functions): ROUGE-L recall, exact match, repetition rate.

ROUGE-L recall is implemented here (no dependency), with rouge_score's default tokenisation
(lower-case, non-alphanumerics to spaces, no stemming); exact match compares stripped,
lower-cased answers, as LUME does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation: lower-case, non-alphanumerics to spaces, split (no stemming)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a| |b|) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / |reference| in rouge tokens (0 if either is empty)."""
    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not ref or not pred:
        return 0.0
    return lcs_length(ref, pred) / len(ref)


def repetition_rate(text: str, n: int = 2) -> float:
    """1 - distinct n-grams / n-grams over whitespace words (lower-cased); 0 for fewer than n+1 words.

    0 means no n-gram repeats; a degenerate "the the the the" gives 1 - 1/3 for n = 2.
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def same_answer(prediction: str, reference: str) -> bool:
    """Exact match: the two answers are equal once stripped and lower-cased."""
    return prediction.strip().lower() == reference.strip().lower()
