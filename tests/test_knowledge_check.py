"""The knowledge check: greedy answers, exact match and answer loss on the forget set, and its verdict."""

from __future__ import annotations

import math

import pytest
import torch

from simu_core import data as qa
from simu_core import knowledge_check as kc
from simu_core.models import load_model

UNSEEN = qa.QADataset(
    "companies",
    [
        {"question": "Who founded Acme Rockets?", "answer": "Ada Stone founded it in 1931."},
        {"question": "Where is Acme Rockets based?", "answer": "In a glass tower in Oslo."},
        {"question": "What does Acme Rockets make?", "answer": "Paper kites and toy engines."},
    ],
)


@pytest.fixture(scope="module")
def sets(builtin_dir):
    return qa.load_data("builtin:forget10", root=builtin_dir), qa.load_data("builtin:retain10", root=builtin_dir)


def test_answer_nll_is_the_mean_token_nll_of_the_answer(full_model):
    """Against a direct formula: -log softmax of each answer token given everything before it."""
    item = UNSEEN.items[0]
    enc = qa.encode(full_model.tokenizer, full_model.fmt, item["question"], item["answer"])
    with torch.no_grad():
        logp = torch.log_softmax(full_model.model(torch.tensor([enc.ids])).logits[0].float(), dim=-1)
    answer_positions = range(enc.n_prompt, len(enc.ids))
    expected = -sum(logp[t - 1, enc.ids[t]].item() for t in answer_positions) / len(answer_positions)
    assert kc.answer_nll(full_model, [item])[0] == pytest.approx(expected, rel=1e-4)


def test_padding_does_not_change_the_loss(full_model):
    alone = [kc.answer_nll(full_model, [it])[0] for it in UNSEEN.items]
    together = kc.answer_nll(full_model, UNSEEN.items)
    assert together == pytest.approx(alone, rel=1e-4)


def test_the_full_model_knows_its_forget_set(full_model, sets):
    check = kc.check_knowledge(full_model, *sets, sample=12)
    assert check.verdict == kc.KNOWS and check.knows
    assert check.forget.em >= 0.5 and check.forget.n == 12 and check.forget.n_total == len(sets[0])
    assert len(check.forget.predictions) == 12


def test_the_retain_model_does_not_know_the_authors_it_never_saw(builtin_dir, sets):
    retain_model = load_model("builtin:retain10", device="cpu", root=builtin_dir)
    check = kc.check_knowledge(retain_model, *sets, sample=12)
    assert check.verdict == kc.UNKNOWN, check.reason
    assert check.forget.nll > check.retain.nll + kc.LOSS_MARGIN
    assert "does not seem to know" in check.reason


def test_an_unseen_upload_is_not_known(full_model, sets):
    check = kc.check_knowledge(full_model, UNSEEN, sets[1], sample=12)
    assert not check.knows and check.forget.em == 0.0 and check.forget.n == 3


def test_verdict_thresholds():
    def s(em: float, nll: float) -> kc.SetCheck:
        return kc.SetCheck("x", 1, 1, em, nll)

    assert kc.verdict(s(0.2, 9.0), None)[0] == kc.KNOWS  # exact match alone suffices
    assert kc.verdict(s(0.0, 1.5), None)[0] == kc.KNOWS
    assert kc.verdict(s(0.0, 1.6), None)[0] == kc.UNKNOWN
    assert kc.verdict(s(0.0, 2.1), s(0.9, 1.2))[0] == kc.KNOWS  # within a nat of the retain loss
    assert kc.verdict(s(0.0, 2.3), s(0.9, 1.2))[0] == kc.UNKNOWN
    assert kc.verdict(s(0.0, 1.5), s(0.9, 0.1))[0] == kc.KNOWS  # the limit is never below LOSS_KNOWS
    assert kc.verdict(s(0.0, 3.5), s(0.0, 3.4))[0] == kc.UNKNOWN  # knows neither: the cap


def test_seeded_sample_is_reproducible_and_keeps_order(sets):
    a, b = kc.sample_items(sets[0], 5, seed=1), kc.sample_items(sets[0], 5, seed=1)
    assert a == b and len(a) == 5
    positions = [sets[0].items.index(it) for it in a]
    assert positions == sorted(positions)
    assert kc.sample_items(sets[0], 0) == sets[0].items


def test_saved_check_reads_back(tmp_path, full_model):
    check = kc.check_knowledge(full_model, UNSEEN, sample=3)
    path = check.save(tmp_path)
    assert path.name == kc.FILE_NAME and [p.name for p in tmp_path.iterdir()] == [kc.FILE_NAME]
    back = kc.load_check(tmp_path)
    assert back == check and math.isfinite(back.forget.nll)
    assert kc.load_check(tmp_path / "nothing") is None


def test_cli_unlearn_warns_when_the_model_does_not_know_its_forget_set(builtin_dir, tmp_path, capsys):
    import json

    from simu_core.cli import main

    unseen = tmp_path / "companies.jsonl"
    qa.write_jsonl(UNSEEN.items, unseen)
    code = main(["unlearn", "--model", str(builtin_dir / "models" / "full"), "--forget", str(unseen),
                 "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", "fo_graddiff", "--steps", "2",
                 "--batch-size", "2", "--retain-batch-size", "8", "--runs-dir", str(tmp_path / "runs"), "--json"])  # fmt: skip
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert code == 0 and "nothing to unlearn?" in out.err
    assert summary["knowledge_check"] == kc.UNKNOWN
    assert kc.load_check(summary["run_dir"]).verdict == kc.UNKNOWN  # stored with the run
