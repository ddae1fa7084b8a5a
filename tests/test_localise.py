"""The localisation check: loss rises measured with independent hooks, the random masks it compares
against, its z-scores, and bad inputs."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from simu_core import data as qa
from simu_core.arch import neuron_layers
from simu_core.attribution import attribute
from simu_core.errors import SimuError
from simu_core.localise import localise
from simu_core.masks import make_mask, random_mask_like
from simu_core.neurons import NeuronMask


@pytest.fixture(scope="module")
def sets(builtin_dir):
    forget = qa.load_data("builtin:forget10", root=builtin_dir)
    retain = qa.load_data("builtin:retain10", root=builtin_dir)
    return forget, qa.QADataset("retain", retain.items[:40])


def ref_answer_nll(loaded, dataset, mask: NeuronMask | None, scale: float = 0.0) -> float:
    """Mean answer-token NLL with plain hooks that multiply the selected neurons by `scale`."""
    model, handles = loaded.model, []
    if mask is not None:
        for layer, m in zip(neuron_layers(model), mask.layers, strict=True):
            factor = torch.where(m, scale, 1.0)
            handles.append(layer.down.register_forward_pre_hook(lambda mod, args, f=factor: (args[0] * f,)))
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for e in qa.encode_dataset(loaded.tokenizer, loaded.fmt, dataset):
                b = qa.collate([e], 0)
                logits = model(input_ids=b["input_ids"]).logits[0, :-1]
                total += float(F.cross_entropy(logits, b["labels"][0, 1:], ignore_index=-100, reduction="sum"))
                n += int((b["labels"] != -100).sum())
    finally:
        for h in handles:
            h.remove()
    return total / n


@pytest.fixture(scope="module")
def mask(full_model, sets):
    return make_mask(attribute(full_model, sets[0], "grad_x_act", target="fact"), "layer_top", 5)


def test_loss_rises_equal_independent_hooks(full_model, sets, mask):
    forget, retain = sets
    got = localise(full_model, mask, forget, retain, n_random=2, scale=0.5)
    for role, data in (("forget", forget), ("retain", retain)):
        before = ref_answer_nll(full_model, data, None)
        assert got.base[role]["answer"] == pytest.approx(before, rel=1e-5)
        rise = ref_answer_nll(full_model, data, mask, 0.5) - before
        assert got.rises["answer"][f"{role}_rise"] == pytest.approx(rise, rel=1e-4, abs=1e-6)


def test_random_masks_are_the_seeded_same_size_masks_and_z_is_against_them(full_model, sets, mask):
    forget, retain = sets
    got = localise(full_model, mask, forget, retain, n_random=3, seed=7)
    second = localise(full_model, random_mask_like(mask, 8), forget, retain, n_random=2)
    assert got.random["answer"]["forget_rise"][1] == pytest.approx(second.rises["answer"]["forget_rise"], rel=1e-6)
    values = got.random["fact"]["forget_rise"]
    expected = (got.rises["fact"]["forget_rise"] - statistics.fmean(values)) / statistics.stdev(values)
    assert got.z["fact"]["forget_rise"] == pytest.approx(expected)


def test_neurons_chosen_by_fact_attribution_hurt_the_forget_facts_more_than_random_ones(full_model, sets, mask):
    got = localise(full_model, mask, *sets, n_random=10)
    assert got.z["fact"]["forget_rise"] > 2  # measured +16 on the small build (top 5 per layer)


def test_fact_tokens_are_only_the_values_for_builtin_items(full_model, sets, mask):
    got = localise(full_model, mask, *sets, n_random=2)
    assert got.notes == [] and got.base["forget"]["fact"] != got.base["forget"]["answer"]


def test_empty_masks_and_too_few_random_masks_are_refused(full_model, sets, mask):
    empty = NeuronMask([torch.zeros_like(m) for m in mask.layers], "none")
    with pytest.raises(SimuError, match="selects no neuron"):
        localise(full_model, empty, *sets)
    with pytest.raises(SimuError, match="at least 2 random masks"):
        localise(full_model, mask, *sets, n_random=1)


@pytest.fixture
def cli_home(builtin_dir, tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "builtin").symlink_to(builtin_dir)
    monkeypatch.setenv("SIMU_HOME", str(tmp_path / "home"))
    return tmp_path


def test_cli_attribute_a_target_mask_by_consistency_then_localise(cli_home, capsys):
    import json

    from simu_core.cli import main

    def run(*args: str) -> dict:
        assert main([*args, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    f, r, m = (str(cli_home / name) for name in ("f.safetensors", "r.safetensors", "m.safetensors"))
    common = ["--model", "builtin:full", "--method", "grad_x_act", "--target", "fact", "--positions", "subject",
              "--per-item", "--device", "cpu"]  # fmt: skip
    assert run("attribute", *common, "--data", "builtin:forget10", "--out", f)["target"] == "fact"
    run("attribute", *common, "--data", "builtin:retain10", "--out", r)
    mask = run("mask", "--forget-scores", f, "--retain-scores", r, "--aggregate", "consistency", "--top-k", "2",
               "--rule", "layer_top", "--value", "3", "--out", m)  # fmt: skip
    assert mask["counts"] == [3, 3] and mask["params"]["aggregate"] == "consistency"
    out = run("localise", "--mask", m, "--random", "3", "--retain-limit", "30", "--device", "cpu")
    assert set(out["z"]) == {"answer", "fact"} and out["neurons"] == 6


def test_stage2_forget_tokens_fact_ascends_on_the_value_tokens_only(full_model, sets):
    """With the whole forget set in one batch, step 1's forget loss is the original model's mean NLL over
    the forget term's tokens: the value tokens with forget_tokens='fact', every answer token by default."""
    from simu_core import targets as tg
    from simu_core.methods import preset_config
    from simu_core.unlearn import unlearn

    forget = sets[0]
    losses = {}
    for tokens in ("answer", "fact"):
        cfg = preset_config("ga", steps=1, batch_size=64, lr=1e-6, device="cpu", forget_tokens=tokens)
        losses[tokens] = unlearn(full_model, forget, None, cfg).history[0].forget_loss
    total, n = 0.0, 0
    with torch.no_grad():
        for e in tg.prepare(full_model.tokenizer, full_model.fmt, forget, "fact").rows:
            b = qa.collate([e.enc], 0)
            logits = full_model.model(input_ids=b["input_ids"]).logits[0, :-1]
            total += float(F.cross_entropy(logits, b["labels"][0, 1:], ignore_index=-100, reduction="sum"))
            n += int((b["labels"] != -100).sum())
    # float32 over one padded batch vs one item at a time: 1e-3 relative; the two token sets differ far more
    assert losses["fact"] == pytest.approx(total / n, rel=1e-3)
    assert losses["answer"] == pytest.approx(ref_answer_nll(full_model, forget, None), rel=1e-3)
    assert abs(losses["fact"] - losses["answer"]) > 0.05 * losses["answer"]


def test_unknown_forget_tokens_are_named(full_model, sets):
    from simu_core.methods import preset_config
    from simu_core.unlearn import unlearn

    with pytest.raises(SimuError, match="unknown forget_tokens 'all'"):
        unlearn(full_model, sets[0], None, preset_config("ga", steps=1, forget_tokens="all"))


def test_new_settings_at_their_defaults_leave_saved_configs_as_before():
    from simu_core.config import MaskConfig, UnlearnConfig, from_dict, to_dict

    saved = to_dict(UnlearnConfig())
    assert "forget_tokens" not in saved and "target" not in saved["mask"] and "aggregate" not in saved["mask"]
    changed = UnlearnConfig(forget_tokens="fact", mask=MaskConfig(target="fact"))
    back = UnlearnConfig.from_json(to_dict(changed))
    assert back.forget_tokens == "fact" and back.mask.target == "fact"
    assert from_dict(MaskConfig, to_dict(MaskConfig())) == MaskConfig()
