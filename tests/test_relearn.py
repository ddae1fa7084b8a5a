"""The relearning attack: a seeded partition, the original left alone, fine-tuning that brings facts back."""

from __future__ import annotations

import pytest

from simu_core import data as qa
from simu_core.errors import SimuError
from simu_core.models import load_model
from simu_core.relearn import RelearnConfig, known_share, relearning_attack, split_halves


@pytest.fixture(scope="module")
def forget(builtin_dir):
    return qa.QADataset("forget", qa.load_data("builtin:forget10", root=builtin_dir).items[:24])


def test_the_halves_are_a_seeded_partition(forget):
    trained, heldout = split_halves(forget, 0.5, seed=3)
    questions = trained.questions() + heldout.questions()
    half = len(forget) // 2
    assert (len(trained), len(heldout)) == (half, len(forget) - half)
    assert sorted(questions) == sorted(forget.questions())
    assert split_halves(forget, 0.5, seed=3)[0].items == trained.items  # same seed, same halves
    assert split_halves(forget, 0.5, seed=4)[0].items != trained.items
    assert len(split_halves(forget, 0.99, seed=0)[1]) == 1  # never an empty held-out half


@pytest.mark.parametrize("size,share", [(1, 0.5), (10, 1.0), (10, 0.0)])
def test_an_attack_that_cannot_hold_out_anything_is_refused(forget, size, share):
    with pytest.raises(SimuError, match="relearning attack|strictly between"):
        split_halves(qa.QADataset("f", forget.items[:size]), share, seed=0)


def test_no_steps_change_nothing_and_the_model_is_left_alone(full_model, forget):
    result = relearning_attack(full_model, full_model.model, forget, RelearnConfig(steps=0, max_new_tokens=24))
    assert result["heldout_after"] == result["heldout_before"] and result["trained_after"] == result["trained_before"]
    assert result["losses"] == [] and result["n_trained"] + result["n_heldout"] == len(forget)


def test_fine_tuning_teaches_a_model_that_never_knew_them_the_trained_facts(builtin_dir, forget):
    # retain10 never saw forget10's authors: it knows none of the facts, and 40 steps on a half teach it
    # those (the training signal is real); what the held-out half does is what the attack measures.
    never = load_model("builtin:retain10", device="cpu", root=builtin_dir)
    never.model.requires_grad_(False)  # as the app and the runs hand models over: frozen
    assert known_share(never, never.model, forget, 24) == 0.0
    result = relearning_attack(never, never.model, forget, RelearnConfig(steps=40, lr=3e-3, max_new_tokens=24))
    assert result["trained_before"] == 0.0 and result["trained_after"] >= 0.5
    assert result["losses"][-1] < result["losses"][0] / 2


def test_cli_relearn_attacks_a_model_folder_and_reports_both_halves(builtin_dir, capsys):
    import json

    from simu_core.cli import main

    argv = ["relearn", "--model", str(builtin_dir / "models" / "retain10"), "--forget",
            str(builtin_dir / "data" / "forget10.jsonl"), "--steps", "2", "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heldout_before"] == 0.0 and len(summary["losses"]) == 2
    assert summary["n_trained"] + summary["n_heldout"] == len(qa.load_data("builtin:forget10", root=builtin_dir))


@pytest.mark.parametrize("given", [[], ["--run", "x", "--model", "y"]])
def test_cli_relearn_needs_exactly_one_model(given, capsys):
    from simu_core.cli import main

    assert main(["relearn", *given]) == 2
    assert "--run RUN_FOLDER or --model SPEC" in capsys.readouterr().err
