"""Attribution targets, subject positions, the counterfactual baseline, exact patching, per-item scores.

References build their own batches and hooks (helpers from test_attribution, which share no code with
`simu_core.attribution`) or use Captum with the baseline written out here.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from simu_core import data as qa
from simu_core import targets as tg
from simu_core.attribution import attribute, attribute_examples
from simu_core.errors import SimuError
from simu_core.neurons import NeuronScores
from tests.test_attribution import assert_scores_close, capture_inputs, injected_loglik, loglik_with, ref_loglik


@pytest.fixture(scope="module")
def forget(builtin_dir):
    return qa.load_data("builtin:forget10", root=builtin_dir)


def mixed(forget: qa.QADataset, n: int = 3) -> qa.QADataset:
    """n items of each of the first two authors (a counterfactual partner exists for each)."""
    authors = sorted({it["author"] for it in forget.items})[:2]
    items = [it for a in authors for it in [x for x in forget.items if x["author"] == a][:n]]
    return qa.QADataset("mixed", items)


def rows_batch(rows: list[tg.Row], pad: int, ids: str = "ids") -> dict[str, torch.Tensor]:
    """Right-padded batch of rows (labels from `scored`), with the counterfactual ids when ids='cf'."""
    batch = qa.collate([r.enc for r in rows], pad, "right")
    if ids == "cf":
        for i, r in enumerate(rows):
            batch["input_ids"][i, : len(r.counterfactual)] = torch.tensor(r.counterfactual)
    return batch


# --------------------------------------------------------------------------------------------
# Spans
# --------------------------------------------------------------------------------------------


def test_fact_target_scores_exactly_the_value_tokens_of_every_builtin_fact(full_model, forget):
    tok = full_model.tokenizer
    rows = tg.prepare(tok, full_model.fmt, forget, "fact").rows
    assert len(rows) == len(forget)
    for row, item in zip(rows, forget.items, strict=True):
        answer_ids = row.enc.ids[row.enc.n_prompt :]
        value = tok.decode([t for t, keep in zip(answer_ids, row.enc.scored, strict=True) if keep]).strip()
        assert item["answer"].endswith(f" {value}.") and value in item["paraphrased_answer"], item["answer"]


def test_uploaded_data_marks_the_value_by_text_or_offsets_else_the_whole_answer_is_used(full_model):
    tok, fmt = full_model.tokenizer, full_model.fmt
    items = [
        {"question": "Who wrote it?", "answer": "It was Mara Vell.", "fact_span": "Mara Vell"},
        {"question": "Who wrote it?", "answer": "It was Mara Vell.", "fact_span": [7, 16]},
        {"question": "Who wrote it?", "answer": "It was Mara Vell."},
    ]
    prepared = tg.prepare(tok, fmt, qa.QADataset("up", items), "fact")
    marked = [
        tok.decode([t for t, k in zip(r.enc.ids[r.enc.n_prompt :], r.enc.scored, strict=True) if k]).strip()
        for r in prepared.rows[:2]
    ]
    assert marked == ["Mara Vell", "Mara Vell"]
    assert prepared.rows[2].enc.scored is None and "whole answer" in prepared.notes[0]


def test_a_marked_value_that_is_not_in_the_answer_is_rejected(full_model):
    items = [{"question": "Q?", "answer": "It was Mara.", "fact_span": "Bob"}]
    with pytest.raises(SimuError, match="'Bob' does not occur in the answer"):
        tg.prepare(full_model.tokenizer, full_model.fmt, qa.QADataset("up", items), "fact")


def test_subject_positions_are_the_author_tokens_of_the_prompt(full_model, forget):
    tok = full_model.tokenizer
    rows = tg.prepare(tok, full_model.fmt, forget, "answer", subject=True).rows
    for row, item in zip(rows, forget.items, strict=True):
        assert tok.decode([row.enc.ids[p] for p in row.subject]).strip() == item["author"]
        assert max(row.subject) < row.enc.n_prompt


def test_the_real_knowledge_benchmark_entity_is_the_subject(full_model):
    items = [{"question": "The capital of France is", "answer": "Paris", "entity": "France"}]
    row = tg.prepare(full_model.tokenizer, full_model.fmt, qa.QADataset("k", items), subject=True).rows[0]
    assert full_model.tokenizer.decode([row.enc.ids[p] for p in row.subject]).strip() == "France"


def test_subject_positions_need_a_subject_in_the_question(full_model):
    items = [{"question": "What is 2 plus 2?", "answer": "4."}]
    with pytest.raises(SimuError, match="Add a 'subject'"):
        tg.prepare(full_model.tokenizer, full_model.fmt, qa.QADataset("w", items), "answer", subject=True)


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def test_the_answer_target_gives_the_same_scores_as_before_targets(full_model, forget):
    pad = qa.pad_id_of(full_model.tokenizer)
    before = attribute_examples(full_model.model, qa.encode_dataset(full_model.tokenizer, full_model.fmt, forget), pad)
    now = attribute(full_model, forget)
    assert all(torch.equal(a, b) for a, b in zip(before.layers, now.layers, strict=True))
    assert now.target == "answer" and now.loglik == before.loglik


def test_contrastive_objective_is_true_minus_mean_perturbed_loglik(full_model, forget):
    data = qa.QADataset("two", forget.items[:2])
    scores = attribute(full_model, data, "grad_x_act", target="contrastive")
    model, tok, fmt = full_model.model, full_model.tokenizer, full_model.fmt
    expected = 0.0
    with torch.no_grad():
        for item in data.items:
            true = qa.collate([qa.encode(tok, fmt, item["question"], item["answer"])], 0)
            expected += float(ref_loglik(model, true["input_ids"], true["attention_mask"], true["labels"]).sum())
            wrong = tg._perturbed(item)[0]
            for w in wrong:
                b = qa.collate([qa.encode(tok, fmt, item["question"], w)], 0)
                expected -= float(ref_loglik(model, b["input_ids"], b["attention_mask"], b["labels"]).sum()) / len(
                    wrong
                )
    assert scores.loglik == pytest.approx(expected, rel=1e-5)


def test_contrastive_wrong_answers_share_the_answer_wording_except_the_value(forget):
    item = forget.items[0]
    wrong, reworded = tg._perturbed(item)
    start, _ = tg.value_span(item)
    assert reworded and len(wrong) == len(item["perturbed_answers"])
    assert all(w.startswith(item["answer"][:start]) and w != item["answer"] for w in wrong)


def test_contrastive_needs_perturbed_answers(full_model):
    items = [{"question": "Q?", "answer": "A."}]
    with pytest.raises(SimuError, match="needs perturbed"):
        attribute(full_model, qa.QADataset("x", items), target="contrastive")


# --------------------------------------------------------------------------------------------
# Positions and baselines against Captum and exact patching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("positions", "baseline"), [("subject", "zero"), ("all", "counterfactual")])
def test_simu_ig_equals_captum_ig_from_the_chosen_baseline(full_model, forget, positions, baseline):
    model, tok, steps = full_model.model, full_model.tokenizer, 4
    data = mixed(forget)
    rows = tg.prepare(tok, full_model.fmt, data, "fact", positions == "subject", baseline).rows
    batch = rows_batch(rows, 0)
    reals = capture_inputs(model, batch)
    starts = capture_inputs(model, rows_batch(rows, 0, "cf")) if baseline == "counterfactual" else None
    if positions == "subject":
        scaled = torch.zeros(batch["input_ids"].shape)
        for i, r in enumerate(rows):
            scaled[i, list(r.subject)] = 1.0
    else:
        scaled = batch["attention_mask"].float()
    ref = []
    for index, real in enumerate(reals):
        start = torch.zeros_like(real) if starts is None else starts[index]
        base = start * scaled.unsqueeze(-1) + real * (1 - scaled).unsqueeze(-1)
        ig = IntegratedGradients(injected_loglik(model, index))
        extra = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        attr = ig.attribute(real, baselines=base, additional_forward_args=extra, n_steps=steps, method="riemann_right")
        ref.append(attr.detach().sum((0, 1)))
    ours = attribute(full_model, data, "simu_ig", steps, batch_size=4, positions=positions, target="fact",
                     baseline=baseline)  # fmt: skip
    assert_scores_close(ours, ref, 1e-4)


def test_counterfactual_ig_is_complete_against_patching_the_whole_layer(full_model, forget):
    """sum_k Att_l[k] -> L(real) - L(layer l set to the matched item's activations): 5% at m=32, and
    closer than at m=8 (right Riemann sum, O(1/m); measured 2-4% at m=32 on the small build)."""
    model, tok = full_model.model, full_model.tokenizer
    data = mixed(forget)
    rows = tg.prepare(tok, full_model.fmt, data, "fact", baseline="counterfactual").rows
    batch = rows_batch(rows, 0)
    starts = capture_inputs(model, rows_batch(rows, 0, "cf"))
    coarse = attribute(full_model, data, "simu_ig", 8, target="fact", baseline="counterfactual")
    fine = attribute(full_model, data, "simu_ig", 32, target="fact", baseline="counterfactual")
    with torch.no_grad():
        real = float(loglik_with(model, batch, 0, lambda x: x).sum())
        for layer, start in enumerate(starts):
            delta = real - float(loglik_with(model, batch, layer, lambda x, s=start: s).sum())
            assert float(fine.layers[layer].sum()) == pytest.approx(delta, rel=0.05)
            assert abs(float(fine.layers[layer].sum()) - delta) < abs(float(coarse.layers[layer].sum()) - delta)


def test_patching_is_the_loss_change_of_patching_one_neuron(full_model, forget):
    model, tok = full_model.model, full_model.tokenizer
    data = mixed(forget, 2)
    rows = tg.prepare(tok, full_model.fmt, data, "answer", baseline="counterfactual").rows
    batch = rows_batch(rows, 0)
    starts = capture_inputs(model, rows_batch(rows, 0, "cf"))
    ours = attribute(full_model, data, "patching", baseline="counterfactual")
    with torch.no_grad():
        real = float(loglik_with(model, batch, 0, lambda x: x).sum())
        for layer, k in [(0, 3), (1, 100), (1, int(ours.layers[1].abs().argmax()))]:

            def patch(x, s=starts[layer], k=k):
                x = x.clone()
                x[..., k] = s[..., k]
                return x

            expected = real - float(loglik_with(model, batch, layer, patch).sum())
            assert float(ours.layers[layer][k]) == pytest.approx(expected, abs=2e-5)


def test_captum_methods_refuse_a_counterfactual_baseline(full_model, forget):
    with pytest.raises(SimuError, match="supports only the zero baseline"):
        attribute(full_model, mixed(forget), "captum_ig", baseline="counterfactual")


def test_without_a_matched_item_the_counterfactual_baseline_is_refused(full_model, forget):
    one_author = qa.QADataset("one", [it for it in forget.items if it["author"] == forget.items[0]["author"]])
    with pytest.raises(SimuError, match="no matched item"):
        attribute(full_model, one_author, baseline="counterfactual")


def test_matched_item_is_the_same_question_with_another_author(full_model, forget):
    tok = full_model.tokenizer
    data = mixed(forget, 1)
    rows = tg.prepare(tok, full_model.fmt, data, "answer", baseline="counterfactual").rows
    for row, item, other in zip(rows, data.items, data.items[::-1], strict=True):
        n = row.enc.n_prompt
        assert len(row.counterfactual) == len(row.enc.ids) and row.counterfactual[n:] == row.enc.ids[n:]
        assert tok.decode(row.counterfactual[:n]) == full_model.fmt.prompt(item["question"].replace(
            item["author"], other["author"]))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Per-item scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["simu_ig", "simu_ig_joint", "grad_x_act"])
def test_per_item_scores_add_up_to_the_summed_scores(full_model, forget, method):
    data = qa.QADataset("few", forget.items[:5])
    scores = attribute(full_model, data, method, 2, target="contrastive", per_item=True)
    assert [tuple(t.shape) for t in scores.items] == [(5, 256), (5, 256)]
    for total, items in zip(scores.layers, scores.items, strict=True):
        assert torch.allclose(items.sum(0), total, rtol=1e-4, atol=1e-5 * float(total.abs().max()))


def test_per_item_scores_round_trip_through_their_own_file(full_model, forget, tmp_path):
    scores = attribute(full_model, qa.QADataset("few", forget.items[:3]), "grad_x_act", per_item=True)
    scores.save(tmp_path / "s.safetensors")
    back = NeuronScores.load(tmp_path / "s.safetensors")
    assert (tmp_path / "s.items.safetensors").is_file() and back.target == "answer"
    assert all(torch.equal(a, b) for a, b in zip(back.items, scores.items, strict=True))
