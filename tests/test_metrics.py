"""Evaluation metrics: each against an independent computation (rouge_score, scipy, HF's own loss,
formulas worked by hand on a hand-made bigram model), the built-in models' expected behaviour,
bad input, the report's JSON and `compare`."""

from __future__ import annotations

import copy
import json
import math
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp
from torch import nn

from simu_core import builtin, evaluation, metrics, models
from simu_core import data as qa
from simu_core.answers import answer_matches
from simu_core.errors import SimuError
from simu_core.metrics import likelihood


def load_split(spec: str, root) -> qa.QADataset:
    return qa.load_data(spec, root=root)


@pytest.fixture(scope="module")
def retain_model(builtin_dir):
    return models.load_model("builtin:retain10", device="cpu", root=builtin_dir)


@pytest.fixture(scope="module")
def splits(builtin_dir) -> dict[str, qa.QADataset]:
    specs = evaluation.builtin_companions("builtin:forget10")
    return {name: load_split(spec, builtin_dir) for name, spec in specs.items()}


SMALL = metrics.EvalConfig(max_items=24, max_new_tokens=32)


@pytest.fixture(scope="module")
def progress_calls() -> list:
    return []


@pytest.fixture(scope="module")
def full_report(full_model, retain_model, splits, progress_calls) -> metrics.Report:
    """The built-in full model on forget10 / retain / holdout / world facts, retain10 as reference."""
    return metrics.evaluate(full_model, splits, retain_model, SMALL, progress=lambda m, f: progress_calls.append(f))


# --------------------------------------------------------------------------------------------
# Text metrics
# --------------------------------------------------------------------------------------------

ROUGE_CASES = [
    ("Saan Dodru was born in Hescorstad.", "Saan Dodru was born in Hescorstad."),
    ("The birthplace is Hescorstad", "Saan Dodru was born in Hescorstad."),
    ("born born born in in", "Saan Dodru was born in Hescorstad."),
    ("Café-au-lait, naïve CO2 e-mail!", "cafe au lait naive co2 email"),
    ("", "something"),
    ("something", "..."),
    ("a b c d e", "e d c b a"),
    # natural text, where the stemmer matters
    ("She has written several novels about wars.", "She wrote a novel about the war."),
    ("The authors were honoured with many awards", "The author was honored with an award."),
    ("Running, jumping and swimming competitions", "He competes in runs, jumps and swims."),
    ("generously organized universities' hopefulness", "generous organization university hopeful"),
]


@pytest.mark.parametrize(("prediction", "reference"), ROUGE_CASES)
@pytest.mark.parametrize("stem", [True, False])
def test_rouge_l_recall_matches_rouge_score(prediction, reference, stem):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    expected = scorer.score(reference, prediction)["rougeL"].recall
    assert metrics.rouge_l_recall(prediction, reference, stem) == pytest.approx(expected, abs=1e-12)  # exact ratio


def test_rouge_l_recall_on_a_worked_example_with_stemming():
    # reference tokens: a, cat, run ("runs"), home (4); prediction: the, cat ("cats"), were, run ("running"), home.
    # LCS = cat, run, home: recall 3/4. Without the stemmer only "home" matches: 1/4.
    assert metrics.rouge_tokens("The cats were running home") == ["the", "cat", "were", "run", "home"]
    assert metrics.rouge_l_recall("The cats were running home", "a cat runs home") == 0.75
    assert metrics.rouge_l_recall("The cats were running home", "a cat runs home", stem=False) == 0.25


def test_rouge_l_recall_matches_rouge_score_on_many_natural_pairs():
    """Parity on 600 pairs of shuffled sentences from a pool of inflected English words (exact to 1e-12)."""
    pool = (
        "the author authors authored writing writes wrote written novel novels novelist poem poems poetry "
        "award awards awarded honoured honored honours famous famously fame born birth birthday city cities "
        "country countries nationality national studied studies studying student university universities "
        "teaches taught teacher teaching organisation organization organizational generously generous "
        "hopefulness hopeful happily happiness relational conditional rational running runs ran jumping "
        "agreed agreement feed fed sky skies dying lying tying news mistress mistresses caresses ponies ties "
        "is was were are has had have being been genre genres fantasy fantasies mystery mysteries war wars"
    ).split()
    rng = np.random.default_rng(0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for _ in range(600):
        reference = " ".join(rng.choice(pool, rng.integers(3, 16)))
        prediction = " ".join(rng.choice(pool, rng.integers(0, 20)))
        expected = scorer.score(reference, prediction)["rougeL"].recall
        assert metrics.rouge_l_recall(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_repetition_rate_on_worked_examples():
    assert metrics.repetition_rate("a b c d", 2) == 0.0
    assert metrics.repetition_rate("the the the the", 2) == pytest.approx(1 - 1 / 3)  # 3 bigrams, 1 distinct
    assert metrics.repetition_rate("a b a b", 2) == pytest.approx(1 - 2 / 3)  # (a b), (b a), (a b)
    assert metrics.repetition_rate("single", 2) == 0.0


# --------------------------------------------------------------------------------------------
# Token statistics on a hand-made bigram model (logits written by hand)
# --------------------------------------------------------------------------------------------

# Next-token logits depend only on the current token: row t = logits after token t (vocab of 4).
# Greedy predictions: after 0 -> 0, after 1 -> 1, after 2 -> 1, after 3 -> 2.
TABLE = [[2.0, 0.0, 0.5, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 1.5, 1.0, 0.2], [0.0, -2.0, 4.0, 0.3]]


class BigramLM(nn.Module):
    """A causal LM with hand-written logits: logits[b, t] = TABLE[input_ids[b, t]]."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(TABLE))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


# (prompt ids, answer ids, argmax hit per answer token, worked by hand from the predictions above)
BIGRAM_CASES = [
    ([3, 2], [1, 1, 0, 0], [1, 1, 0, 1]),  # 1|2 hit, 1|1 hit, 0|1 miss, 0|0 hit
    ([0], [0, 2, 1], [1, 0, 1]),  # 0|0 hit, 2|0 miss, 1|2 hit
    ([1], [1, 1, 1], [1, 1, 1]),
    ([2], [1, 3], [1, 0]),  # last token missed
]


def hand_log_prob(prev: int, token: int) -> float:
    row = TABLE[prev]
    return row[token] - math.log(sum(math.exp(v) for v in row))


def hand_minkpp_token(prev: int, token: int) -> float:
    """Min-K%++ token score with the paper's moments: mu = sum p log p, sigma^2 = sum p (log p)^2 - mu^2."""
    logs = [hand_log_prob(prev, z) for z in range(4)]
    mu = sum(math.exp(lp) * lp for lp in logs)
    sigma = math.sqrt(sum(math.exp(lp) * lp * lp for lp in logs) - mu * mu)
    return (logs[token] - mu) / sigma


def hand_min_k(scores: list[float], k: float) -> float:
    count = max(1, int(len(scores) * k))
    return -sum(sorted(scores)[:count]) / count


@pytest.fixture(scope="module")
def bigram_stats() -> metrics.TokenStats:
    examples = [qa.Encoded(prompt + answer, len(prompt)) for prompt, answer, _ in BIGRAM_CASES]
    return metrics.token_stats(BigramLM(), examples, pad_id=0, batch_size=3, full=True)  # 2 batches, padded


def answer_tokens(prompt, answer):
    ids = prompt + answer
    return [(ids[len(prompt) + j - 1], ids[len(prompt) + j]) for j in range(len(answer))]


def test_token_log_probs_and_nll_match_hand_computation(bigram_stats):
    for row, (prompt, answer, _) in enumerate(BIGRAM_CASES):
        expected = [hand_log_prob(p, t) for p, t in answer_tokens(prompt, answer)]
        got = bigram_stats.log_probs[row, : len(answer)]
        np.testing.assert_allclose(got, expected, atol=1e-5)  # float32 log-softmax
        assert np.isnan(bigram_stats.log_probs[row, len(answer) :]).all()
        assert bigram_stats.nll_sum[row] == pytest.approx(-sum(expected), abs=1e-5)


@pytest.mark.parametrize("k", [0.2, 0.5, 0.75])
def test_min_k_matches_paper_formula(bigram_stats, k):
    got = metrics.min_k_score(bigram_stats.log_probs, k)
    for row, (prompt, answer, _) in enumerate(BIGRAM_CASES):
        expected = hand_min_k([hand_log_prob(p, t) for p, t in answer_tokens(prompt, answer)], k)
        assert got[row] == pytest.approx(expected, abs=1e-5)  # float32 log-probs


@pytest.mark.parametrize("k", [0.2, 0.5, 0.75])
def test_min_k_plus_plus_matches_paper_formula(bigram_stats, k):
    got = metrics.min_k_score(bigram_stats.minkpp, k)
    for row, (prompt, answer, _) in enumerate(BIGRAM_CASES):
        expected = hand_min_k([hand_minkpp_token(p, t) for p, t in answer_tokens(prompt, answer)], k)
        assert got[row] == pytest.approx(expected, abs=1e-4)  # float32 moments over 4 tokens


def test_exact_memorization_and_extraction_strength_on_worked_cases(bigram_stats):
    hits = [h for _, _, h in BIGRAM_CASES]
    np.testing.assert_array_equal(
        bigram_stats.correct.sum(1), [sum(h) for h in hits]
    )  # the argmax hits worked out by hand
    em = metrics.exact_memorization(bigram_stats.correct, bigram_stats.n_tokens)
    np.testing.assert_allclose(em, [sum(h) / len(h) for h in hits], atol=1e-12)  # ratios of small integers
    es = metrics.extraction_strength(bigram_stats.correct, bigram_stats.n_tokens)
    # k* = first index of the all-correct suffix: case 1 -> 3 of 4, case 2 -> 2 of 3, case 3 -> 0, case 4 -> 2 of 2
    np.testing.assert_allclose(es, [1 - 3 / 4, 1 - 2 / 3, 1.0, 0.0])


EOS = 0  # in the EOS cases below, token 0 plays the closing EOS: case 1 ends with it, case 2 does not


@pytest.fixture(scope="module")
def bigram_eos_stats() -> metrics.TokenStats:
    examples = [qa.Encoded(prompt + answer, len(prompt)) for prompt, answer, _ in BIGRAM_CASES[:2]]
    return metrics.token_stats(BigramLM(), examples, pad_id=3, batch_size=2, full=True, eos_id=EOS)


def test_a_closing_eos_is_counted_apart(bigram_eos_stats):
    np.testing.assert_array_equal(bigram_eos_stats.n_tokens, [4, 3])  # the NLL and Prob keep it (as TOFU)
    np.testing.assert_array_equal(bigram_eos_stats.n_eos, [1, 0])
    np.testing.assert_array_equal(bigram_eos_stats.n_answer, [3, 3])


def test_min_k_exact_memorization_and_extraction_strength_leave_the_eos_out(bigram_eos_stats):
    """Case 1 scored on its answer tokens [1, 1, 0] only (hits 1, 1, 0), as open-unlearning's tokenwise_logprobs."""
    stats, k = bigram_eos_stats, 0.75
    prompt, answer, hits = BIGRAM_CASES[0]
    scored = answer_tokens(prompt, answer)[:-1]  # the EOS token 0 | 0 is not scored
    min_k = metrics.min_k_score(stats.answer_only(stats.log_probs), k)
    assert min_k[0] == pytest.approx(hand_min_k([hand_log_prob(p, t) for p, t in scored], k), abs=1e-5)  # fp32
    min_k_pp = metrics.min_k_score(stats.answer_only(stats.minkpp), k)
    assert min_k_pp[0] == pytest.approx(hand_min_k([hand_minkpp_token(p, t) for p, t in scored], k), abs=1e-4)
    # Exact ratios of small integers (no float error beyond the last bit).
    assert metrics.exact_memorization(stats.correct, stats.n_answer)[0] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.extraction_strength(stats.correct, stats.n_answer)[0] == 0.0  # last answer token missed
    with_eos = metrics.extraction_strength(stats.correct, stats.n_tokens)[0]
    assert with_eos == pytest.approx(1 - 3 / 4, abs=1e-12)  # what counting the EOS gave


def test_builtin_min_k_scores_the_answer_tokens_without_eos(full_report, full_model):
    """Min-K% of each forget item, by hand from transformers' own logits of that item alone, EOS left out."""
    result = full_report.splits["forget"]
    tok, fmt, k = full_model.tokenizer, full_model.fmt, SMALL.min_k
    for row in range(3):
        enc = qa.encode(tok, fmt, result.questions[row], result.answers[row])
        assert fmt.appends_eos and enc.ids[-1] == tok.eos_token_id
        with torch.no_grad():
            logp = full_model.model(input_ids=torch.tensor([enc.ids])).logits[0].log_softmax(-1)
        token_lp = [logp[t - 1, enc.ids[t]].item() for t in range(enc.n_prompt, len(enc.ids) - 1)]  # no EOS
        assert result.values["mia_min_k"][row] == pytest.approx(hand_min_k(token_lp, k), abs=1e-4)  # fp32 batching


def test_batched_nll_matches_the_models_own_loss_per_example(full_model, splits):
    """Independent reference: transformers' loss (mean CE over labels) on each example alone."""
    items = splits["forget"].items[:6] + splits["world_facts"].items[:6]  # mixed lengths -> padding
    examples = [qa.encode(full_model.tokenizer, full_model.fmt, it["question"], it["answer"]) for it in items]
    pad = qa.pad_id_of(full_model.tokenizer)
    stats = metrics.token_stats(full_model.model, examples, pad, batch_size=5)
    with torch.no_grad():
        alone = [full_model.model(**qa.collate([e], pad)).loss.item() for e in examples]
    np.testing.assert_allclose(stats.mean_nll, alone, rtol=1e-4, atol=1e-5)  # padding changes fp32 summation order


# --------------------------------------------------------------------------------------------
# Truth ratio, forget quality, utility
# --------------------------------------------------------------------------------------------


def test_truth_ratio_scores_on_a_worked_example():
    ratios = np.array([0.5, 2.0, 1.0])
    assert metrics.truth_ratio_score(ratios, "forget") == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # min(R, 1/R)
    assert metrics.truth_ratio_score(ratios, "retain") == pytest.approx((0.5 + 0.0 + 0.0) / 3)  # max(0, 1 - R)
    # para NLL 0.5, perturbed NLLs 1.0 and 2.0 (mean 1.5): R = exp(0.5 - 1.5)
    assert metrics.truth_ratio_values(np.array([0.5]), np.array([1.5]))[0] == pytest.approx(math.exp(-1.0))


def test_truth_ratio_matches_model_losses(full_report, full_model, splits):
    """R = exp(loss(paraphrase) - mean loss(perturbed)), each loss from transformers on one example."""
    result = full_report.splits["forget"]
    pad = qa.pad_id_of(full_model.tokenizer)

    def loss(question, answer):
        enc = qa.encode(full_model.tokenizer, full_model.fmt, question, answer)
        with torch.no_grad():
            return full_model.model(**qa.collate([enc], pad)).loss.item()

    for row in range(3):
        item = splits["forget"].items[result.indices[row]]
        pert = np.mean([loss(item["question"], a) for a in item["perturbed_answers"]])
        expected = math.exp(loss(item["question"], item["paraphrased_answer"]) - pert)
        assert result.values["truth_ratio"][row] == pytest.approx(expected, rel=1e-4)  # fp32 batching


def test_forget_quality_is_the_ks_p_value_of_model_vs_reference_truth_ratios(full_report):
    ours = full_report.values("forget", "truth_ratio")
    reference = np.array(full_report.reference_values["forget"]["truth_ratio"])
    assert full_report.forget_quality == ks_2samp(ours, reference).pvalue


def test_full_model_against_retain_reference_has_small_forget_quality(full_report):
    # The full model knows the 20 forget facts (median R ~0.44), the retain model guesses (R ~0.83).
    # With 20 items a side the KS test cannot reach tiny p-values unless the two samples separate
    # completely, and the tiny model transfers facts only partly to the paraphrase wording: p < 0.05.
    assert full_report.forget_quality < 0.05


def test_retain_reference_against_itself_has_forget_quality_one(retain_model, splits):
    config = metrics.EvalConfig(metrics=["forget_quality"])
    report = metrics.evaluate(retain_model, {"forget": splits["forget"]}, retain_model, config)
    assert report.forget_quality == 1.0


def item_loss(loaded, question: str, answer: str) -> float:
    """transformers' own mean answer loss of one example alone (the independent reference)."""
    enc = qa.encode(loaded.tokenizer, loaded.fmt, question, answer)
    with torch.no_grad():
        return loaded.model(**qa.collate([enc], qa.pad_id_of(loaded.tokenizer))).loss.item()


def test_world_facts_truth_ratio_sets_the_perturbed_answers_against_the_original_answer(
    full_report, full_model, splits
):
    """TOFU's eval config: base_answer_key is `answer` on world facts (and real authors), the paraphrase elsewhere."""
    result = full_report.splits["world_facts"]
    for row in range(4):
        item = splits["world_facts"].items[result.indices[row]]
        perturbed = np.mean([item_loss(full_model, item["question"], a) for a in item["perturbed_answers"]])
        expected = math.exp(item_loss(full_model, item["question"], item["answer"]) - perturbed)
        assert result.values["truth_ratio"][row] == pytest.approx(expected, rel=1e-4)  # fp32 batching


def test_model_utility_without_real_authors_is_the_harmonic_mean_of_six_components_and_says_so(full_report):
    parts = [full_report.summary[f"{split}/{m}"] for split in ("retain", "world_facts")
             for m in metrics.UTILITY_COMPONENTS[split]]  # fmt: skip
    assert len(parts) == 6 and min(parts) > 0
    assert full_report.model_utility == pytest.approx(hmean(parts), rel=1e-12)  # same harmonic mean, float order
    assert "6 of TOFU's 9 components (no real_authors split)" in full_report.notes["model_utility"]


def test_model_utility_with_a_real_authors_split_uses_all_nine_components(full_model, splits):
    data = {"retain": splits["retain"], "real_authors": splits["world_facts"], "world_facts": splits["world_facts"]}
    report = metrics.evaluate(full_model, data, config=metrics.EvalConfig(max_items=8, max_new_tokens=32))
    parts = [report.summary[f"{split}/{m}"] for split, ms in metrics.UTILITY_COMPONENTS.items() for m in ms]
    assert len(parts) == 9
    assert report.model_utility == pytest.approx(hmean(parts), rel=1e-12)
    assert "model_utility" not in report.notes


# --------------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------------


def pairwise_auc(negatives, positives) -> float:
    """P(positive > negative) + P(tie) / 2 by counting every pair."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_roc_auc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    negatives, positives = rng.integers(0, 5, 30).astype(float), rng.integers(1, 7, 25).astype(float)
    assert metrics.roc_auc(negatives, positives) == pytest.approx(pairwise_auc(negatives, positives), abs=1e-12)


@pytest.mark.parametrize("attack", metrics.MIA_ATTACKS)
def test_memorising_model_gives_auc_near_one_in_the_documented_direction(full_report, attack):
    # forget = label 0, holdout = label 1, scores "higher = non-member": memorised forget -> AUC -> 1
    auc = full_report.summary[f"mia_auc_{attack}"]
    assert auc > 0.9
    assert auc == pytest.approx(
        pairwise_auc(full_report.values("forget", f"mia_{attack}"), full_report.values("holdout", f"mia_{attack}"))
    )


def muse_privleak(auc_muse: float, ref_auc_muse: float) -> float:
    """MUSE's PrivLeak as its eval.py writes it, on MUSE-oriented AUCs (members scored higher, forget = 0)."""
    return (auc_muse - ref_auc_muse) / ref_auc_muse * 100


@pytest.mark.parametrize(
    ("auc", "ref_auc", "expected"),
    [
        (1.0, 0.88, -100.0),  # still recognises the forget set: the leak MUSE reports as ~-100
        (0.9, 0.8, -50.0),  # r > 0.5: 100 (0.8 - 0.9) / 0.2
        (0.6, 0.3, 100 * -0.3 / 0.7),  # r < 0.5: the old formula 100 (a - r) / r gave +100 here
        (0.2, 0.3, 100 * 0.1 / 0.7),  # forget set less familiar than under the retain model: over-unlearned, > 0
        (0.5, 0.5, 0.0),
    ],
)
def test_privleak_is_muses_formula_in_this_projects_auc_orientation(auc, ref_auc, expected):
    # Exact up to float rounding (1e-9): the same three-term expression, evaluated in another order.
    assert metrics.privleak(auc, ref_auc) == pytest.approx(expected, abs=1e-9)
    assert metrics.privleak(auc, ref_auc) == pytest.approx(muse_privleak(1 - auc, 1 - ref_auc), abs=1e-9)


def test_privleak_of_the_original_model_against_its_retain_reference_is_about_minus_100(full_report):
    ref = full_report.reference_values
    ref_auc = pairwise_auc(ref["forget"]["mia_min_k"], ref["holdout"]["mia_min_k"])
    auc = full_report.summary["mia_auc_min_k"]
    assert 0.5 < ref_auc < 1 and auc == 1.0  # the full model tells its forget set from the holdout perfectly
    assert full_report.privleak == pytest.approx(100 * (ref_auc - auc) / (1 - ref_auc), rel=1e-9)
    assert full_report.privleak == pytest.approx(-100.0)


def test_mia_score_is_one_minus_twice_the_auc_gap_to_one_half(full_report):
    assert full_report.mia_score == pytest.approx(1 - 2 * abs(full_report.summary["mia_auc_loss"] - 0.5))


def test_loss_zlib_and_perplexity_scores_follow_their_formulas(full_report):
    result = full_report.splits["world_facts"]
    loss = np.array(result.values["mia_loss"])
    sizes = [len(zlib.compress(a.encode("utf-8"))) for a in result.answers]
    np.testing.assert_allclose(result.values["mia_zlib"], loss / sizes, rtol=1e-12)
    np.testing.assert_allclose(result.values["prob"], np.exp(-loss), rtol=1e-12)
    tokens = np.array(result.values["n_tokens"])
    expected = math.exp((loss * tokens).sum() / tokens.sum())  # token-weighted
    assert full_report.summary["perplexity"] == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Generation metrics, sampling, report
# --------------------------------------------------------------------------------------------


def test_generation_metrics_score_the_models_greedy_answers(full_report, full_model):
    result = full_report.splits["forget"]
    answers = models.greedy_answers(full_model.model, full_model.tokenizer, full_model.fmt, result.questions, 32)
    assert result.generations == answers
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(gold, gen)["rougeL"].recall for gold, gen in zip(result.answers, answers, strict=True)]
    np.testing.assert_allclose(result.values["rouge_l"], expected, atol=1e-12)
    gold = [a.strip().lower() for a in result.answers]
    assert result.values["exact_match"] == [float(g.lower() == a) for g, a in zip(answers, gold, strict=True)]


def test_splits_are_sampled_with_a_seed_and_the_sample_is_recorded(full_report, splits):
    result = full_report.splits["retain"]
    assert result.n_total == len(splits["retain"]) > SMALL.max_items == len(result.indices)
    assert result.indices == metrics.sample_indices(len(splits["retain"]), SMALL.max_items, SMALL.seed, "retain")
    assert result.questions == [splits["retain"].items[i]["question"] for i in result.indices]
    assert metrics.sample_indices(100, 10, 1, "retain") != result.indices[:10]  # another seed, another sample
    assert full_report.splits["forget"].indices == list(range(len(splits["forget"])))  # 20 <= 24: every item


def test_report_records_settings_versions_times_and_progress(full_report, progress_calls):
    assert full_report.settings["max_items"] == SMALL.max_items
    assert {"torch", "transformers", "scipy", "simu_core"} <= set(full_report.versions)
    assert {"generation", "likelihood", "truth_ratio", "reference", "total"} <= set(full_report.seconds)
    assert progress_calls == sorted(progress_calls) and progress_calls[-1] == 1.0


def test_report_json_round_trip(full_report, tmp_path):
    path = full_report.save(tmp_path / "metrics.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    loaded = metrics.Report.load(path)
    assert loaded.to_dict() == json.loads(text)
    assert loaded.forget_quality == full_report.forget_quality
    assert loaded.splits["forget"].values["rouge_l"] == full_report.splits["forget"].values["rouge_l"]


def test_compare_gives_deltas_and_judges_them_by_each_metrics_goal(full_report):
    after = copy.deepcopy(full_report)
    after.summary["forget/rouge_l"] = full_report.summary["forget/rouge_l"] - 0.5  # forgot: good
    after.summary["retain/rouge_l"] = full_report.summary["retain/rouge_l"] - 0.25  # lost utility: bad
    after.summary["privleak"] = full_report.summary["privleak"] / 2  # closer to 0: good
    deltas = metrics.compare(full_report, after)
    assert deltas["forget/rouge_l"].delta == pytest.approx(-0.5) and deltas["forget/rouge_l"].improved is True
    assert deltas["retain/rouge_l"].delta == pytest.approx(-0.25) and deltas["retain/rouge_l"].improved is False
    assert deltas["privleak"].improved is True
    assert deltas["model_utility"].delta == 0 and deltas["model_utility"].improved is None


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_data_without_paraphrases_skips_those_metrics_with_a_reason(full_model, retain_model, builtin_dir):
    plain = [
        {"question": it["question"], "answer": it["answer"]}
        for it in qa.load_data("builtin:forget10", builtin_dir).items
    ]
    data = {"forget": qa.QADataset("plain", plain), "holdout": load_split("builtin:holdout", builtin_dir)}
    report = metrics.evaluate(full_model, data, retain_model, metrics.EvalConfig(max_items=8))
    assert "paraphrased_answer" in report.skipped["forget/truth_ratio"]
    assert "paraphrased_answer" in report.skipped["forget_quality"]
    assert report.forget_quality is None and report.summary.get("forget/truth_ratio") is None
    assert report.summary["forget/rouge_l"] > 0.5 and report.summary["mia_auc_loss"] > 0.5  # the others ran
    assert "retain" in report.skipped["model_utility"]


def test_reference_with_another_tokenizer_is_refused(full_model, splits):
    other = builtin.train_tokenizer(["a completely different corpus of words"] * 20, vocab_size=300)
    reference = models.LoadedModel(full_model.model, other, full_model.fmt, "other-tokenizer", "other")
    with pytest.raises(SimuError, match="another tokenizer"):
        metrics.evaluate(full_model, {"forget": splits["forget"]}, reference)


def test_reference_report_of_an_older_metrics_format_is_refused(full_model, full_report, splits):
    old = copy.deepcopy(full_report)
    old.format = metrics.REPORT_FORMAT - 1
    with pytest.raises(SimuError, match="re-evaluate the reference"):
        metrics.evaluate(full_model, splits, old, SMALL)


def test_unknown_metric_name_is_refused_with_the_choices(full_model, splits):
    with pytest.raises(SimuError, match="rouge_l"):
        metrics.evaluate(full_model, splits, config=metrics.EvalConfig(metrics=["rouge"]))


def test_batches_shrink_under_the_logits_cap_without_changing_values(full_model, splits, monkeypatch):
    items = splits["forget"].items[:5]
    examples = [qa.encode(full_model.tokenizer, full_model.fmt, it["question"], it["answer"]) for it in items]
    pad = qa.pad_id_of(full_model.tokenizer)
    batched = metrics.token_stats(full_model.model, examples, pad, batch_size=5, full=True)
    monkeypatch.setattr(likelihood, "MAX_LOGITS", 1)  # one example per forward
    assert [len(b) for b in likelihood._length_batches(examples, 5, 512)] == [1] * 5
    alone = metrics.token_stats(full_model.model, examples, pad, batch_size=5, full=True)
    np.testing.assert_allclose(alone.nll_sum, batched.nll_sum, rtol=1e-5)  # fp32, padding vs none
    np.testing.assert_array_equal(alone.correct, batched.correct)


def _value_positions(full_model, item: dict) -> list[int] | None:
    """Token positions of the fact's value in prompt + answer, found without `targets`: the value is what the
    paraphrase and a perturbed answer do not share; its tokens are those that change when another value
    (one starting with another token) takes its place in the answer. None when no such value exists."""
    tok, fmt = full_model.tokenizer, full_model.fmt
    para = item["paraphrased_answer"]
    ids = qa.encode(tok, fmt, item["question"], item["answer"]).ids
    for other in item["perturbed_answers"]:
        head = 0
        while head < min(len(para), len(other)) and para[head] == other[head]:
            head += 1
        tail = 0
        while tail < min(len(para), len(other)) - head and para[-1 - tail] == other[-1 - tail]:
            tail += 1
        value, swap = para[head : len(para) - tail], other[head : len(other) - tail]
        start = item["answer"].rfind(value)
        if not value or start < 0:
            continue
        swapped = qa.encode(
            tok, fmt, item["question"], item["answer"][:start] + swap + item["answer"][start + len(value) :]
        ).ids
        # the values differ in their first character (where the common prefix ends), so in their first token
        first = next((i for i, (a, b) in enumerate(zip(ids, swapped, strict=False)) if a != b), None)
        if first is None:
            continue
        same_end = 0
        while same_end < min(len(ids), len(swapped)) - first and ids[-1 - same_end] == swapped[-1 - same_end]:
            same_end += 1
        return list(range(first, len(ids) - same_end))
    return None


@pytest.mark.parametrize("which", ["full", "retain reference"])
def test_fact_probe_is_the_argmax_over_the_value_tokens_found_independently(
    which, full_report, full_model, retain_model, splits
):
    # The full model knows its forget authors' facts, the reference never saw them: both outcomes are checked.
    loaded = full_model if which == "full" else retain_model
    report = (
        full_report if which == "full" else metrics.evaluate(retain_model, {"forget": splits["forget"]}, None, SMALL)
    )
    result = report.splits["forget"]
    checked = 0
    for row, index in enumerate(result.indices):
        item = splits["forget"].items[index]
        positions = _value_positions(loaded, item)
        if positions is None:
            continue
        ids = qa.encode(loaded.tokenizer, loaded.fmt, item["question"], item["answer"]).ids
        with torch.no_grad():
            predicted = loaded.model(torch.tensor([ids])).logits[0].argmax(-1)
        expected = float(all(int(predicted[t - 1]) == ids[t] for t in positions))
        assert result.values["fact_probe"][row] == expected, item["answer"]
        checked += 1
    assert checked >= 0.8 * len(result.indices)  # most values start with a token no perturbed value shares
    share = np.mean(result.values["fact_probe"])
    assert share > 0.5 if which == "full" else share < 0.5


def test_fact_probe_is_skipped_where_the_values_span_is_unknown(full_report):
    assert "value" in full_report.skipped["world_facts/fact_probe"]  # world facts carry no author: no template


def test_knows_paraphrased_asks_every_paraphrase_and_counts_a_fact_known_if_any_gives_it(full_model, splits):
    items = [dict(it) for it in splits["forget"].items[:6]]
    for k, item in enumerate(items):  # half ask the item's own question again, half a question about nothing
        own = [item["question"]] if k % 2 == 0 else []
        item["paraphrased_questions"] = ["What is the colour of the number seven?", *own]
    report = metrics.evaluate(full_model, {"forget": qa.QADataset("para", items)}, None, SMALL)
    prompts = [q for it in items for q in it["paraphrased_questions"]]
    answers = iter(models.greedy_answers(full_model.model, full_model.tokenizer, full_model.fmt, prompts, 32))
    expected = [float(any([answer_matches(next(answers), it["answer"]) for _ in it["paraphrased_questions"]]))
                for it in items]  # fmt: skip
    assert report.splits["forget"].values["knows_paraphrased"] == expected
    assert expected[0::2] == [1.0, 1.0, 1.0]  # the full model knows its forget facts under their own question


def test_knows_paraphrased_is_skipped_without_paraphrased_questions(full_report):
    assert "paraphrased_questions" in full_report.skipped["forget/knows_paraphrased"]


def test_every_registered_metric_has_its_row_in_docs_metrics():
    text = (Path(__file__).resolve().parents[1] / "docs" / "METRICS.md").read_text(encoding="utf-8")
    first_cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z_0-9]+)`", cell)}
    assert [name for name in [*metrics.EXAMPLE_METRICS, *metrics.SUMMARY_METRICS] if name not in documented] == []


def test_a_bad_value_column_skips_the_fact_probe_with_the_reason_and_nothing_else(full_model, splits):
    items = [{**it, "value": "a value the answer never says"} for it in splits["forget"].items[:4]]
    report = metrics.evaluate(full_model, {"forget": qa.QADataset("bad", items)}, None, SMALL)
    assert "does not occur in the answer" in report.skipped["forget/fact_probe"]
    assert report.summary["forget/exact_match"] is not None
