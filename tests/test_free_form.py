"""Free-form answers on a real model that goes on after the answer: exact match scores the first
sentence, the early stop waits for it, and completion-style formats stop generating at a newline.

The model is the small built-in `full`, fine-tuned for a few seconds (40 full-batch AdamW steps on the
20 forget items) to follow each answer with its paraphrase: in the QA format as
"answer paraphrase<EOS>", in a completion-style format ("... {question}", no EOS) as
"answer\\nparaphrase". Generation is real (`models.greedy_answers`); nothing is mocked.
"""

from __future__ import annotations

import copy

import pytest
import torch

from simu_core import data as qa
from simu_core import metrics, models
from simu_core.answers import match_rate
from simu_core.methods import preset_config
from simu_core.unlearn import forget_exact_match, greedy_exact_match, unlearn

COMPLETION = qa.PromptFormat("Answer the question. {question}")


@pytest.fixture(scope="module")
def forget(builtin_dir) -> qa.QADataset:
    return qa.load_data("builtin:forget10", root=builtin_dir)


@pytest.fixture(scope="module")
def retain(builtin_dir) -> qa.QADataset:
    return qa.QADataset("retain", qa.load_data("builtin:retain10", root=builtin_dir).items[:64])


@pytest.fixture(scope="module")
def chatty(full_model, forget) -> tuple[models.LoadedModel, models.LoadedModel]:
    """(the model in the QA format, the same model in the completion format)."""
    tok, fmt = full_model.tokenizer, full_model.fmt
    targets = [(it["question"], it["answer"], it["paraphrased_answer"]) for it in forget.items]
    examples = [qa.encode(tok, fmt, q, f"{a} {p}") for q, a, p in targets]
    examples += [qa.encode(tok, COMPLETION, q, f"{a}\n{p}") for q, a, p in targets]
    batch = qa.collate(examples, qa.pad_id_of(tok))
    torch.manual_seed(0)
    model = copy.deepcopy(full_model.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(40):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    qa_model = models.LoadedModel(model, tok, fmt, "chatty", full_model.source)
    return qa_model, models.LoadedModel(model, tok, COMPLETION, "chatty-completion", full_model.source)


def answers_of(loaded: models.LoadedModel, dataset: qa.QADataset, **kw) -> list[str]:
    return models.greedy_answers(loaded.model, loaded.tokenizer, loaded.fmt, dataset.questions(), 48, **kw)


def test_the_chatty_model_goes_on_after_the_gold_answer(chatty, forget):
    answers = answers_of(chatty[0], forget)
    went_on = [
        a.startswith(gold) and len(a) > len(gold) + 10 for a, gold in zip(answers, forget.answers(), strict=True)
    ]
    assert sum(went_on) >= 18  # of 20


def test_exact_match_scores_the_first_sentence_of_an_answer_that_goes_on(chatty, forget):
    config = metrics.EvalConfig(metrics=["exact_match", "answer_contained"])
    report = metrics.evaluate(chatty[0], {"forget": forget}, config=config)
    assert report.summary["forget/exact_match"] >= 0.9
    assert report.summary["forget/answer_contained"] >= 0.9
    whole = metrics.evaluate(chatty[0], {"forget": forget}, config=metrics.EvalConfig(metrics=["exact_match"],
                             exact_match="whole"))  # fmt: skip
    assert whole.summary["forget/exact_match"] == 0.0  # LUME's whole-answer rule: every answer went on


@pytest.mark.parametrize("which", ["original", "chatty_qa", "chatty_completion"])
def test_early_stop_exact_match_is_the_first_answer_match_of_real_generations(full_model, chatty, forget, which):
    """`forget_exact_match` (teacher-forced shortcut for reproduced EOS-closed answers, generation for the
    rest) equals the first-answer match rate of plainly generated answers."""
    loaded = {"original": full_model, "chatty_qa": chatty[0], "chatty_completion": chatty[1]}[which]
    examples = qa.encode_dataset(loaded.tokenizer, loaded.fmt, forget)
    generated = match_rate(answers_of(loaded, forget), forget.answers())
    assert forget_exact_match(loaded, loaded.model, forget, examples) == generated
    assert generated >= 0.8


def test_the_whole_answer_rule_would_have_stopped_unlearning_before_it_began(chatty, forget):
    loaded = chatty[0]
    examples = qa.encode_dataset(loaded.tokenizer, loaded.fmt, forget)
    assert greedy_exact_match(loaded.model, examples, qa.pad_id_of(loaded.tokenizer)) == 0.0  # the old early stop
    assert forget_exact_match(loaded, loaded.model, forget, examples) >= 0.9


def test_early_stop_waits_until_the_first_answers_are_forgotten(chatty, forget, retain):
    config = preset_config("ga", lr=1e-3, steps=60, batch_size=8, eval_every=2, probe_every=0, stop_forget_em=0.05)
    result = unlearn(chatty[0], forget, retain, config)
    evals = [r.forget_em for r in result.history if r.forget_em is not None]
    assert evals[0] >= 0.9  # not met at the first check: the answers still hold the facts
    assert result.stop_reason == "forget_target" and evals[-1] <= 0.05 < min(evals[:-1])
    assert len(result.history) < 60


def test_metrics_generation_stops_at_the_first_newline_for_completion_formats(chatty, forget):
    loaded = chatty[1]
    assert loaded.fmt.completion_style and not loaded.fmt.appends_eos
    report = metrics.evaluate(loaded, {"forget": forget}, config=metrics.EvalConfig(metrics=["exact_match"]))
    generations = report.splits["forget"].generations
    assert generations == answers_of(loaded, forget, stop_at_newline=True)
    assert not any("\n" in g for g in generations)
    free = answers_of(loaded, forget, stop_at_newline=False)  # without the stop the paraphrase follows
    assert sum("\n" in a for a in free) >= 18
    assert report.summary["forget/exact_match"] >= 0.8
