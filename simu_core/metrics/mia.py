"""Membership inference: per-example attack scores and the numbers computed from them.

Attack scores (`MIA_ATTACKS`), all oriented "higher = more likely a NON-member":
- `loss`: mean answer NLL (LOSS attack);
- `zlib`: mean answer NLL / zlib-compressed size of the answer (`zlib_score`);
- `min_k`: Min-K% Prob, -mean of the k-fraction lowest answer-token log-probabilities;
- `min_k_pp`: Min-K%++, the same over the normalised token scores (log p(x_t) - mu_t) / sigma_t
  (`min_k_score` does both). Both score the answer tokens only, without the closing EOS (as
  open-unlearning's `tokenwise_logprobs`); `loss` and `zlib` use the mean NLL with the EOS (as its
  LOSS and zlib attacks, which call `evaluate_probability`).

Numbers: `roc_auc` of forget (label 0) vs holdout (label 1), so AUC -> 1 when the model still
recognises the forget set and 0.5 when forget and holdout look alike (open-unlearning's convention,
`mia/utils.py`: "auc is 1 when the forget data is much more likely than the holdout data").
MUSE computes its AUC the other way round (members scored higher, forget labelled 0: its AUC -> 0 when
the forget set is recognised), i.e. AUC_MUSE = 1 - AUC here. `privleak` is MUSE's
100 (AUC_MUSE - AUC_MUSE_ref) / AUC_MUSE_ref written in this orientation: 100 (r - a) / (1 - r) with
a = AUC of the model, r = AUC of the retain reference (open-unlearning's `privacy.privleak` does the
same conversion). About -100 for a model that still holds the forget set (MUSE's un-unlearned
models), 0 when it looks like the retain model, large positive = over-unlearning (the forget set is
now *less* familiar than under the retain model). `mia_score` = LUME's 1 - 2 |AUC - 0.5|.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def min_k_score(token_scores: np.ndarray, k: float) -> np.ndarray:
    """[N] = -mean of the k-fraction lowest token scores of each row ([N, A], NaN = not scored).

    The count is max(1, floor(k * n_tokens)), as in open-unlearning; a row with no scored token
    gives NaN. With log-probs this is Min-K% Prob; with Min-K%++'s normalised scores it is Min-K%++.
    Higher = more likely a non-member.
    """
    present = ~np.isnan(token_scores)
    n = present.sum(1)
    count = np.maximum(1, np.floor(n * k).astype(int))
    ranked = np.sort(np.where(present, token_scores, np.inf), axis=1)
    take = np.arange(token_scores.shape[1])[None] < count[:, None]
    score = -np.where(take & (n[:, None] > 0), ranked, 0.0).sum(1) / count
    return np.where(n > 0, score, np.nan)


def zlib_score(mean_nll: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """[N] zlib attack score: mean answer NLL / zlib-compressed length of the answer text in bytes."""
    sizes = np.array([len(zlib.compress(text.encode("utf-8"))) for text in texts])
    return mean_nll / sizes


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve = P(score(positive) > score(negative)) + P(tie) / 2 (Mann-Whitney).

    NaN scores (examples that could not be scored) are left out.
    """
    from scipy.stats import rankdata

    negatives, positives = np.asarray(negatives, dtype=float), np.asarray(positives, dtype=float)
    negatives, positives = negatives[~np.isnan(negatives)], positives[~np.isnan(positives)]
    scores = np.concatenate([negatives, positives])
    ranks = rankdata(scores)  # average ranks handle ties
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE PrivLeak in percent: 100 (r - a) / (1 - r), a = `auc`, r = `reference_auc` (this module's orientation).

    Equals MUSE's 100 (a' - r') / r' with MUSE's AUCs a' = 1 - a, r' = 1 - r. ~-100: the forget set is
    still recognised (leak); 0: like the retain model; > 0: over-unlearned. Undefined (ZeroDivisionError)
    for r = 1.
    """
    return 100.0 * (reference_auc - auc) / (1.0 - reference_auc)


def mia_score(auc: float) -> float:
    """LUME MIA score 1 - 2 |AUC - 0.5| (1 = forget and holdout indistinguishable)."""
    return 1.0 - 2.0 * abs(auc - 0.5)
