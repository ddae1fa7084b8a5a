"""Trade-off curves: points at checkpoints along a run, their scores, MUSE's rule, the figure."""

from __future__ import annotations

import pytest

from simu_core import data as qa
from simu_core.figures import curve_points, tradeoff_figure, write_figures
from simu_core.methods import preset_config
from simu_core.metrics import EvalConfig, evaluate
from simu_core.metrics.curve import checkpoint_scores, first_reaching
from simu_core.unlearn import unlearn


@pytest.fixture(scope="module")
def sets(builtin_dir) -> dict[str, qa.QADataset]:
    return {name: qa.load_data(str(builtin_dir / "data" / f"{name}.jsonl")) for name in ("forget10", "world_facts")}


def test_checkpoint_scores_are_the_reports_exact_match_and_rouge_on_the_same_items(full_model, sets):
    """The quick scores equal the full evaluation's `exact_match` and `rouge_l` split numbers: the same
    seeded sample (`sample_indices`), the same greedy answers, the same rules (exact equality: same code
    path for the answers, means over the same items)."""
    points = checkpoint_scores(full_model, full_model.model, sets, max_items=12, max_new_tokens=32)
    report = evaluate(full_model, sets, config=EvalConfig(max_items=12, max_new_tokens=32,
                                                           metrics=["exact_match", "rouge_l", "fact_probe"]))  # fmt: skip
    for name in sets:
        for score in ("exact_match", "rouge_l"):
            assert points[f"{name}/{score}"] == pytest.approx(report.summary[f"{name}/{score}"], abs=1e-12)
    assert "world_facts/fact_probe" not in points  # no value spans there
    assert points["forget10/fact_probe"] == pytest.approx(report.summary["forget10/fact_probe"], abs=1e-12)


def test_a_run_records_a_point_every_n_steps_and_at_its_last(full_model, builtin_dir, sets):
    forget = qa.load_data(str(builtin_dir / "data" / "forget10.jsonl"))
    retain = qa.load_data(str(builtin_dir / "data" / "retain10.jsonl"))
    config = preset_config("fo_graddiff", steps=5, batch_size=4, retain_batch_size=4, curve_every=2, curve_items=4,
                           device="cpu")  # fmt: skip
    config.stop_forget_em = None
    result = unlearn(full_model, forget, retain, config, curve_sets={"world_facts": sets["world_facts"]})
    points = curve_points([r.to_dict() for r in result.history])
    assert [p["step"] for p in points] == [2, 4, 5]
    assert set(points[0]) == {"step", "forget/fact_probe", "retain/fact_probe"} | {
        f"{s}/{m}" for s in ("forget", "retain", "world_facts") for m in ("exact_match", "rouge_l")
    }  # world facts carry no fact-value template, so no probe
    off = unlearn(full_model, forget, retain, preset_config("fo_graddiff", steps=2, batch_size=4, device="cpu"))
    assert curve_points([r.to_dict() for r in off.history]) == []


def test_muse_rule_takes_the_first_checkpoint_at_or_below_the_reference():
    points = [{"step": 10, "forget/rouge_l": 0.9}, {"step": 20, "forget/rouge_l": 0.5},
              {"step": 30, "forget/rouge_l": 0.3}, {"step": 40, "forget/rouge_l": 0.5}]  # fmt: skip
    assert first_reaching(points, 0.5)["step"] == 20
    assert first_reaching(points, 0.2) is None


def test_the_figure_has_one_panel_per_kept_set_and_one_line_per_run(tmp_path):
    points = [{"step": s, "forget/rouge_l": 1 - s / 10, "forget/exact_match": 0.0, "retain/exact_match": 0.9,
               "world_facts/exact_match": 0.8} for s in (1, 2)]  # fmt: skip
    fig = tradeoff_figure({"a": points, "b": points}, reference=0.5)
    assert len(fig.data) == 4  # 2 runs x 2 kept sets (forget's own exact match is not a panel)
    assert len(fig.layout.shapes) == 2  # the reference line once per panel
    assert {t.text for t in fig.layout.annotations if t.text} >= {"retain exact match", "world facts exact match"}
    assert write_figures(tmp_path / "new" / "curves.html", [fig], "curves").is_file()  # folders made as needed


def test_the_extra_curve_sets_are_what_each_built_in_benchmark_keeps_besides_retain():
    from simu_core.evaluation import curve_companions

    assert curve_companions("builtin:forget05") == {"world_facts": "builtin:world_facts"}
    assert curve_companions("builtin:smollm2/forget") == {"neighbour": "builtin:smollm2/neighbour",
                                                          "general": "builtin:smollm2/general"}  # fmt: skip
    assert curve_companions("my_forget.jsonl") == {}


def test_the_figure_adds_a_fact_probe_panel_where_the_points_have_it():
    points = [{"step": s, "forget/rouge_l": 1 - s / 10, "retain/exact_match": 0.9, "forget/fact_probe": 0.5}
              for s in (1, 2)]  # fmt: skip
    fig = tradeoff_figure({"a": points}, reference=0.5)
    assert {t.text for t in fig.layout.annotations if t.text} >= {"retain exact match", "forget fact probe"}
    assert [list(trace.y) for trace in fig.data] == [[0.9, 0.9], [0.5, 0.5]]
