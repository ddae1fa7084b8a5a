"""The built-in metrics, registered in report order (the order below is the order of the report's keys).

Each entry wires what one metric reads (`inputs.SplitInputs` for per-example metrics,
`inputs.SummaryContext` for summary metrics) to a formula of its family (`text`, `likelihood`,
`mia`). Definitions: /work/shared/references.md section 5 (TOFU / MUSE / Min-K% / Min-K%++ / LUME).
Adding a metric is one function plus its decorator line (`@example_metric` for per-example values,
`@summary_metric` for one number across splits), here or in any module imported after this one.
"""

from __future__ import annotations

import numpy as np

from simu_core.answers import answer_contained, answer_matches, gives_answer
from simu_core.errors import SimuError
from simu_core.metrics.inputs import MetricSkipped, SplitInputs, SummaryContext
from simu_core.metrics.likelihood import (
    UTILITY_COMPONENTS,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    truth_ratio_score,
    truth_ratio_values,
)
from simu_core.metrics.mia import MIA_ATTACKS, mia_score, min_k_score, privleak, roc_auc, zlib_score
from simu_core.metrics.registry import example_metric, summary_metric
from simu_core.metrics.text import repetition_rate, rouge_l_recall, same_answer
from simu_core.targets import fact_encode, value_span

# --------------------------------------------------------------------------------------------
# Per-example metrics
# --------------------------------------------------------------------------------------------


@example_metric("rouge_l", "generation", "lower", "higher")
def _rouge_l(s: SplitInputs) -> np.ndarray:
    """ROUGE-L recall of the greedy answer against the gold answer (Porter-stemmed: EvalConfig.rouge_stemmer)."""
    stem = s.cfg.rouge_stemmer
    return np.array([rouge_l_recall(g, it["answer"], stem) for g, it in zip(s.generations, s.items, strict=True)])


@example_metric("exact_match", "generation", "lower", "higher")
def _exact_match(s: SplitInputs) -> np.ndarray:
    """1 if the greedy answer gives the gold answer: its first sentence(s), normalised, equal the normalised
    gold answer (EvalConfig.exact_match "first_answer"), or the whole answer does, stripped and lower-cased
    ("whole", LUME's rule); else 0."""
    match = answer_matches if s.cfg.exact_match == "first_answer" else same_answer
    return np.array([float(match(g, it["answer"])) for g, it in zip(s.generations, s.items, strict=True)])


@example_metric("knows", "generation", "lower", "higher")
def _knows(s: SplitInputs) -> np.ndarray:
    """1 if the greedy answer gives the fact by `answers.gives_answer`, the real-knowledge benchmark's rule:
    the answer begins with an accepted answer (1 on every kept fact before
    unlearning); else 0. Skipped on data without accepted answers, where it would repeat exact_match."""
    if not any(it.get("accepted_answers") for it in s.items):
        raise MetricSkipped("only for items with accepted answers (the real-knowledge benchmark); see exact_match")
    return np.array([float(gives_answer(g, it)) for g, it in zip(s.generations, s.items, strict=True)])


@example_metric("knows_paraphrased", "generation", "lower", "higher")
def _knows_paraphrased(s: SplitInputs) -> np.ndarray:
    """1 if the greedy answer to any of the item's paraphrased questions gives the fact (`answers.gives_answer`,
    the rule of `knows`): a fact forgotten under one wording may still come out under another. Skipped on
    data without `paraphrased_questions` (the built-in authors have none)."""
    return np.array([float(any(gives_answer(g, it) for g in answers))
                     for answers, it in zip(s.paraphrase_generations, s.items, strict=True)])  # fmt: skip


@example_metric("answer_contained", "generation", "lower", "higher")
def _answer_contained(s: SplitInputs) -> np.ndarray:
    """1 if the normalised gold answer occurs, as whole words, anywhere in the normalised greedy answer, else 0."""
    return np.array([float(answer_contained(g, it["answer"])) for g, it in zip(s.generations, s.items, strict=True)])


@example_metric("prob", "likelihood", "lower", "higher")
def _prob(s: SplitInputs) -> np.ndarray:
    """Length-normalised answer probability p(a|q)^(1/|a|) = exp(-mean token NLL)."""
    return np.exp(-s.answer.mean_nll)


@example_metric("exact_memorization", "likelihood", "lower", "higher")
def _exact_memorization(s: SplitInputs) -> np.ndarray:
    """Teacher-forced token accuracy: share of the answer tokens (EOS left out) the argmax predicts."""
    return exact_memorization(s.answer.correct, s.answer.n_answer)


@example_metric("extraction_strength", "likelihood", "lower", "higher")
def _extraction_strength(s: SplitInputs) -> np.ndarray:
    """ES = 1 - k*/|y|: the share of the answer (EOS left out) whose whole suffix the argmax predicts."""
    return extraction_strength(s.answer.correct, s.answer.n_answer)


@example_metric("fact_probe", "likelihood", "lower", "higher")
def _fact_probe(s: SplitInputs) -> np.ndarray:
    """1 if, teacher-forced on the gold answer, the argmax predicts every token of the fact's value
    ("Rosford" in "... was born in Rosford."; the span of `targets.value_span`), else 0: the fact can still be
    read off the model when a broken answer template hides it from greedy exact match. Skipped unless every
    item's value span is known (the built-in authors, or a `fact_span` / `value` column)."""
    try:  # a bad fact_span / value column skips this metric, not the whole report
        spans = [value_span(item) for item in s.items]
        if not s.items or any(span is None for span in spans):
            raise MetricSkipped(
                "needs the fact's value in every answer (built-in authors, or a fact_span / value column)"
            )
        masks = [fact_encode(s.loaded.tokenizer, s.loaded.fmt, it["question"], it["answer"], span).scored
                 for it, span in zip(s.items, spans, strict=True)]  # fmt: skip
    except SimuError as err:
        raise MetricSkipped(str(err)) from err
    correct = s.answer.correct
    known = []
    for row, scored in enumerate(masks):
        fact = np.array(scored)
        width = min(len(fact), correct.shape[1])  # an answer cut at EvalConfig.max_length loses its tail
        known.append(float(fact[:width].any() and correct[row, :width][fact[:width]].all()))
    return np.array(known)


@example_metric(
    "truth_ratio", "truth_ratio", "higher", "higher", aggregate=lambda values, s: truth_ratio_score(values, s.role)
)
def _truth_ratio(s: SplitInputs) -> np.ndarray:
    """R = P(perturbed)/P(true), true = paraphrase (forget, retain) or original answer (real authors, world facts);
    split score forget mean(min(R,1/R)), else mean(max(0,1-R))."""
    base, _, _ = s.variants
    return truth_ratio_values(base, s.perturbed_mean_nll())


@example_metric("prob_vs_perturbed", "truth_ratio", "lower", "higher")
def _prob_vs_perturbed(s: SplitInputs) -> np.ndarray:
    """p(true) / (p(true) + sum p(perturbed)), length-normalised (TOFU's Prob on world facts)."""
    _, pert, owner = s.variants
    p_true = np.exp(-s.answer.mean_nll)
    return p_true / (p_true + np.bincount(owner, np.exp(-pert), len(s.items)))


@example_metric("mia_loss", "membership")
def _mia_loss(s: SplitInputs) -> np.ndarray:
    """LOSS attack score: mean answer NLL (higher = more likely a non-member)."""
    return s.answer.mean_nll


@example_metric("mia_zlib", "membership")
def _mia_zlib(s: SplitInputs) -> np.ndarray:
    """zlib attack score: mean answer NLL / zlib-compressed length of the answer in bytes."""
    return zlib_score(s.answer.mean_nll, [it["answer"] for it in s.items])


@example_metric("mia_min_k", "membership")
def _mia_min_k(s: SplitInputs) -> np.ndarray:
    """Min-K% Prob: -mean of the k lowest answer-token log-probs, EOS left out (k = EvalConfig.min_k)."""
    return min_k_score(s.answer.answer_only(s.answer.log_probs), s.cfg.min_k)


@example_metric("mia_min_k_pp", "membership")
def _mia_min_k_pp(s: SplitInputs) -> np.ndarray:
    """Min-K%++: -mean of the k lowest (log p(x_t) - mu_t) / sigma_t over the answer tokens, EOS left out."""
    return min_k_score(s.answer.answer_only(s.answer.minkpp), s.cfg.min_k)


@example_metric("repetition", "fluency", "", "lower")
def _repetition(s: SplitInputs) -> np.ndarray:
    """Repetition rate of the greedy answer: 1 - distinct n-grams / n-grams (n = EvalConfig.repetition_n)."""
    return np.array([repetition_rate(g, s.cfg.repetition_n) for g in s.generations])


def _token_weighted_perplexity(values: np.ndarray, s: SplitInputs) -> float:
    return float(np.exp(s.answer.nll_sum.sum() / s.answer.n_tokens.sum()))


@example_metric("perplexity", "fluency", "", "lower", aggregate=_token_weighted_perplexity)
def _perplexity(s: SplitInputs) -> np.ndarray:
    """Answer perplexity exp(mean NLL); the split number is token-weighted exp(sum NLL / tokens)."""
    return np.exp(s.answer.mean_nll)


# --------------------------------------------------------------------------------------------
# Summary metrics (one number across splits)
# --------------------------------------------------------------------------------------------


@summary_metric("forget_quality", "summary", "higher")
def _forget_quality(ctx: SummaryContext) -> float:
    """KS-test p-value between the forget truth ratios of the model and of the retain reference (TOFU)."""
    return forget_quality(ctx.values("forget", "truth_ratio"), ctx.reference_values("forget", "truth_ratio"))


@summary_metric("model_utility", "summary", "higher")
def _model_utility(ctx: SummaryContext) -> float:
    """Harmonic mean of Prob, ROUGE-L recall and truth-ratio score on retain, real authors and world facts
    (TOFU's 9 numbers; splits the data lacks are left out, and the report's notes say which)."""
    present = [split for split in UTILITY_COMPONENTS if split in ctx.splits]
    if not present:
        raise MetricSkipped(f"needs at least one of the splits {', '.join(UTILITY_COMPONENTS)}")
    parts = {}
    for split in present:
        for metric in UTILITY_COMPONENTS[split]:
            try:
                parts[f"{split}/{metric}"] = ctx.split_summary(split, metric)
            except MetricSkipped as skip:
                raise MetricSkipped(f"component {split}/{metric} is missing: {skip}") from skip
    total = sum(len(metrics) for metrics in UTILITY_COMPONENTS.values())
    if len(parts) < total:
        absent = [split for split in UTILITY_COMPONENTS if split not in present]
        ctx.notes["model_utility"] = (
            f"{len(parts)} of TOFU's {total} components (no {' / '.join(absent)} split): {', '.join(parts)}"
        )
    return harmonic_mean(list(parts.values()))


def _mia_auc(ctx: SummaryContext, attack: str, reference: bool = False) -> float:
    """AUC of forget (label 0) vs holdout (label 1) on "higher = non-member" scores."""
    get = ctx.reference_values if reference else ctx.values
    forget, holdout = get("forget", f"mia_{attack}"), get("holdout", f"mia_{attack}")
    return roc_auc(forget, holdout)


def _register_auc(attack: str) -> None:
    def auc(ctx: SummaryContext) -> float:
        return _mia_auc(ctx, attack)

    auc.__doc__ = f"AUC of the {attack} attack, forget (0) vs holdout (1): 1 = forget set recognised, 0.5 = alike."
    summary_metric(f"mia_auc_{attack}", "membership")(auc)


for _attack in MIA_ATTACKS:
    _register_auc(_attack)


@summary_metric("privleak", "membership", "zero")
def _privleak(ctx: SummaryContext) -> float:
    """MUSE PrivLeak = 100 (r - a) / (1 - r) on the Min-K% AUCs of the model (a) and the retain reference (r);
    about -100: the forget set still leaks, 0: like the retain model, > 0: over-unlearned."""
    attack = ctx.cfg.privleak_attack
    auc = _mia_auc(ctx, attack)
    if ctx.has_reference:
        ref_auc = _mia_auc(ctx, attack, reference=True)
    else:
        ref_auc = 0.5
        ctx.notes["privleak"] = "no reference model: reference AUC taken as 0.5 (as open-unlearning does)"
    if ref_auc == 1:
        raise MetricSkipped(
            "the reference model's AUC is 1 (it tells forget from holdout perfectly), so PrivLeak's "
            "denominator 1 - AUC_ref is 0; use a reference that never saw the forget set"
        )
    return privleak(auc, ref_auc)


@summary_metric("mia_score", "membership", "higher")
def _mia_score(ctx: SummaryContext) -> float:
    """LUME MIA score 1 - 2 |AUC - 0.5| (1 = forget and holdout indistinguishable)."""
    return mia_score(_mia_auc(ctx, ctx.cfg.mia_score_attack))


@summary_metric("perplexity", "fluency", "lower")
def _world_perplexity(ctx: SummaryContext) -> float:
    """Token-weighted perplexity of the world-facts answers (general text outside the authors)."""
    return ctx.split_summary("world_facts", "perplexity")
