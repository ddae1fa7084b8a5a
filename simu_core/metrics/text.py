"""Text metrics on strings (pure functions): ROUGE-L recall, exact match, repetition rate.

ROUGE-L recall = LCS(prediction, reference) / |reference| over rouge_score's tokens: lower-cased,
non-alphanumerics to spaces, and (by default, as TOFU and MUSE: `RougeScorer(["rougeL"],
use_stemmer=True)`) every word of more than 3 characters Porter-stemmed ("running" -> "run",
"authors" -> "author"). The tokenisation and the stemmer are rouge_score's own (its `tokenize`
module and nltk's PorterStemmer, the pair `use_stemmer=True` uses), so the numbers are rouge_score's
to the last bit; the stems are cached per word and the LCS is computed here, which keeps ~1000 answers
well under a second. `stem=False` gives rouge_score's `use_stemmer=False`. Exact match
(`same_answer`) compares whole stripped, lower-cased answers, as LUME does; the free-form rules
(first sentence, contained) are in `simu_core.answers`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache, lru_cache

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


class _CachedStemmer:
    """nltk's PorterStemmer (the default mode, as rouge_score builds it) with a per-word cache."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stem = lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)


@cache
def _stemmer() -> _CachedStemmer:
    return _CachedStemmer()


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    """rouge_score's tokens: lower-case, non-alphanumerics to spaces, split; with `stem`, words of more
    than 3 characters Porter-stemmed (rouge_score's use_stemmer=True)."""
    if not stem:
        return _NON_ALNUM.sub(" ", text.lower()).split()
    from rouge_score import tokenize

    return tokenize.tokenize(text, _stemmer())


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


def rouge_l_recall(prediction: str, reference: str, stem: bool = True) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / |reference| in rouge tokens (0 if either is empty).

    `stem`: Porter-stem the tokens (TOFU / MUSE, rouge_score's use_stemmer=True).
    """
    ref, pred = rouge_tokens(reference, stem), rouge_tokens(prediction, stem)
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
