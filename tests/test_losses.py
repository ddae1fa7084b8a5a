"""Unlearning losses against Hugging Face's own LM loss and hand-worked values."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from simu_core import data as qa
from simu_core.errors import SimuError
from simu_core.losses import LOSSES, LossInputs, get_loss, npo_forget, sequence_logprob


@pytest.fixture(scope="module")
def batches(full_model, builtin_dir):
    tok, fmt, pad = full_model.tokenizer, full_model.fmt, qa.pad_id_of(full_model.tokenizer)
    forget = qa.encode_dataset(tok, fmt, qa.load_data("builtin:forget10", root=builtin_dir))[:6]
    retain = qa.encode_dataset(tok, fmt, qa.load_data("builtin:retain10", root=builtin_dir))[:8]
    return qa.collate(forget, pad), qa.collate(retain, pad)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _hf_loss(model, batch):
    """The model's own mean answer-token loss (transformers shifts labels itself)."""
    return float(model(**batch).loss)


# Tolerance 1e-5: the same float32 computation done by two code paths (reduction order differs).
def test_ga_is_minus_the_forget_lm_loss(full_model, batches):
    out = LOSSES["ga"](LossInputs(full_model.model, batches[0]))
    assert float(out.total) == pytest.approx(-_hf_loss(full_model.model, batches[0]), abs=1e-5)


def test_graddiff_is_minus_forget_plus_gamma_retain(full_model, batches):
    forget, retain = batches
    out = LOSSES["graddiff"](LossInputs(full_model.model, forget, retain, gamma=2.5))
    expected = -_hf_loss(full_model.model, forget) + 2.5 * _hf_loss(full_model.model, retain)
    assert float(out.total) == pytest.approx(expected, abs=1e-5)
    assert out.retain == pytest.approx(_hf_loss(full_model.model, retain), abs=1e-5)


def test_npo_at_the_reference_is_two_over_beta_log_two_per_sample(full_model, batches):
    beta = 0.3
    out = LOSSES["npo"](LossInputs(full_model.model, batches[0], None, full_model.model, gamma=0.0, beta=beta))
    assert float(out.total) == pytest.approx(2 / beta * math.log(2), abs=1e-5)


def test_npo_forget_term_matches_the_formula_on_hand_values():
    logp, logp_ref, beta = torch.tensor([-3.0, -1.0]), torch.tensor([-1.0, -1.0]), 0.5
    # -(2/b) log sigmoid(-b (logp - ref)): b(logp-ref) = -1 -> (2/0.5) * log(1 + e^-1); 0 -> 4 log 2
    expected = torch.tensor([4 * math.log1p(math.exp(-1.0)), 4 * math.log(2)])
    torch.testing.assert_close(npo_forget(logp, logp_ref, beta), expected)


def test_npo_uses_the_whole_answer_log_likelihood(full_model, batches):
    forget = batches[0]
    logits = full_model.model(input_ids=forget["input_ids"]).logits[:, :-1].log_softmax(-1)
    targets = forget["labels"][:, 1:]
    keep = targets != -100
    manual = (logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep).sum(1)
    torch.testing.assert_close(sequence_logprob(full_model.model, forget), manual, atol=1e-4, rtol=1e-5)


def test_kl_retain_is_zero_at_the_reference_and_matches_a_manual_kl(full_model, batches):
    forget, retain = batches
    same = LOSSES["kl_retain"](LossInputs(full_model.model, forget, retain, full_model.model, gamma=3.0))
    assert float(same.total) == pytest.approx(-_hf_loss(full_model.model, forget), abs=1e-5)

    other = copy.deepcopy(full_model.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = LOSSES["kl_retain"](LossInputs(other, forget, retain, full_model.model, gamma=1.0))
    keep = retain["labels"][:, 1:] != -100
    logp = full_model.model(**retain).logits[:, :-1][keep].log_softmax(-1)
    logq = other(**retain).logits[:, :-1][keep].log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()  # KL(p_ref || p_theta) per answer token
    assert float(out.total) == pytest.approx(-_hf_loss(other, forget) + float(kl), abs=1e-5)
    assert float(kl) > 1e-4  # the perturbation made the comparison non-trivial


def test_losses_needing_a_reference_say_so():
    with pytest.raises(SimuError, match="reference"):
        LOSSES["npo"](LossInputs(torch.nn.Linear(1, 1), {}))


def test_unknown_loss_names_the_choices():
    with pytest.raises(SimuError, match="graddiff"):
        get_loss("nope")
