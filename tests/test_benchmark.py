"""The quality benchmark: cells run and are recorded, resume skips them, aggregation, Markdown, sizes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from simu_core import benchmark
from simu_core.benchmark import (
    QUALITY_METHODS,
    REFERENCE_ROWS,
    Cell,
    QualityConfig,
    aggregate_records,
    cell_key,
    compare_means,
    markdown_table,
    matched_verdict,
    plan_cells,
    read_cell,
    run_quality,
)
from simu_core.errors import SimuError
from simu_core.figures import quality_figures, write_figures
from simu_core.metrics import EvalConfig

# Tiny settings: 2 optimiser steps, 8 evaluated items per split, short answers.
SMOKE_EVAL = EvalConfig(max_items=8, max_new_tokens=16)


def _smoke_config(builtin_dir, out, steps: int = 2) -> QualityConfig:
    return QualityConfig(splits=["forget10"], methods=["ga"], seeds=[1], eval=SMOKE_EVAL,
                         overrides={"steps": steps}, root=str(builtin_dir), out=str(out))  # fmt: skip


@pytest.fixture(scope="module")
def first_run(builtin_dir, tmp_path_factory):
    """One real run of the table on the small test build: 2 reference rows + 1 method cell."""
    out = tmp_path_factory.mktemp("quality")
    return out, run_quality(_smoke_config(builtin_dir, out))


# --------------------------------------------------------------------------------------------
# A cell runs and is recorded; resume
# --------------------------------------------------------------------------------------------


def test_a_method_cell_runs_and_is_recorded(first_run):
    out, result = first_run
    assert result.computed == ["forget10__original", "forget10__retain_reference", "forget10__ga__seed1"]
    record = read_cell(out, Cell("forget10", "ga", 1))
    assert (record["split"], record["method"], record["seed"], record["status"]) == ("forget10", "ga", 1, "ok")
    assert record["steps_done"] == 2 and record["config"]["seed"] == 1 and record["config"]["steps"] == 2
    assert "unclipped_mean" in record and record["unclipped_mean"] is None  # GA runs AdamW: nothing is clipped
    assert record["stop_reason"] == "steps" and record["reached_target"] == 0.0  # 2 steps: the budget ended it
    metrics = record["metrics"]
    assert 0.0 <= metrics["forget_quality"] <= 1.0 and 0.0 <= metrics["model_utility"] <= 1.0
    assert math.isclose(metrics["log10_forget_quality"], math.log10(metrics["forget_quality"]), rel_tol=1e-9)


def test_the_retain_reference_row_is_its_own_target(first_run):
    # KS test of a sample against itself: p = 1 exactly; PrivLeak against itself: 0 exactly.
    record = read_cell(first_run[0], Cell("forget10", "retain_reference"))
    assert record["metrics"]["forget_quality"] == 1.0 and record["metrics"]["privleak"] == 0.0


def test_outputs_are_written(first_run, builtin_dir):
    out, result = first_run
    payload = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert {r["cell"] for r in payload["records"]} == set(result.computed)
    assert payload["meta"]["root"] == str(builtin_dir)  # pooling tells base models apart by it
    assert payload["meta"]["seeds"] == [1] and payload["meta"]["tuning_seed"] == 0
    assert "ga" in payload["aggregate"]["forget10"]
    assert "| **ga** |" in (out / "quality.md").read_text(encoding="utf-8")
    assert (out / "quality.html").stat().st_size > 0


def test_resume_skips_finished_cells(builtin_dir, first_run):
    out, first = first_run
    again = run_quality(_smoke_config(builtin_dir, out))
    assert again.computed == [] and again.skipped == first.computed
    # The records are the stored ones: same creation timestamps as the first run.
    assert [r["created"] for r in again.records] == [r["created"] for r in first.records]


def test_stored_only_writes_the_table_from_stored_cells_and_names_the_rest(builtin_dir, first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run[0], out)
    qc = _smoke_config(builtin_dir, out)
    qc.seeds = [1, 2]  # seed 2 was never computed
    result = run_quality(qc, stored_only=True)
    assert result.computed == [] and result.left_out == ["forget10__ga__seed2"]
    assert len(result.skipped) == 3 and read_cell(out, Cell("forget10", "ga", 2)) is None
    assert "**left out**" in (out / "quality.md").read_text(encoding="utf-8")
    assert result.aggregate["forget10"]["ga"]["n"] == 1


def test_changed_settings_make_only_affected_cells_stale(builtin_dir, first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run[0], out)
    changed = run_quality(_smoke_config(builtin_dir, out, steps=3))
    assert changed.computed == ["forget10__ga__seed1"]  # the reference rows do not depend on the steps
    assert read_cell(out, Cell("forget10", "ga", 1))["steps_done"] == 3


def test_the_table_has_the_forget_fact_probe_of_every_fresh_cell(first_run):
    out, _ = first_run
    probe = read_cell(out, Cell("forget10", "ga", 1))["metrics"]["forget/fact_probe"]
    assert 0.0 <= probe <= 1.0
    lines = [line.split("|") for line in (out / "quality.md").read_text(encoding="utf-8").splitlines() if "|" in line]
    column = next(row for row in lines if " method " in row).index(" forget fact probe ↓ ")
    ga_row = next(row for row in lines if "**ga**" in row[1])
    assert ga_row[column].strip() == f"{probe:.3f} ± 0.000"  # one seed: no spread


def test_cli_bench_quality_resumes(builtin_dir, first_run, capsys):
    from simu_core.cli import main

    out, _ = first_run
    argv = ["bench", "quality", "--root", str(builtin_dir), "--splits", "forget10", "--methods", "ga", "--seeds", "1",
            "--steps", "2", "--max-items", "8", "--max-new-tokens", "16", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["computed"] == 0 and summary["skipped"] == 3


def test_cell_keys_differ_by_seed_and_settings(first_run):
    qc = QualityConfig(splits=["forget10"], methods=["simu"], seeds=[1, 2])
    prints = {"builtin:full": "a", "builtin:retain10": "b"}
    k1, k2 = cell_key(Cell("forget10", "simu", 1), qc, prints), cell_key(Cell("forget10", "simu", 2), qc, prints)
    assert k1 != k2
    assert k1 != cell_key(Cell("forget10", "simu", 1), qc, {**prints, "builtin:full": "rebuilt"})


def test_a_setting_added_later_changes_the_key_only_when_set():
    from simu_core.config import to_dict

    qc, prints = QualityConfig(splits=["forget10"], methods=["simu"], seeds=[1]), {"builtin:full": "a"}
    key = cell_key(Cell("forget10", "simu", 1), qc, prints)
    assert "rho_share" not in to_dict(benchmark.cell_config(Cell("forget10", "simu", 1), qc))  # at its default
    with_share = QualityConfig(splits=["forget10"], methods=["simu"], seeds=[1], overrides={"rho_share": 0.3})
    assert cell_key(Cell("forget10", "simu", 1), with_share, prints) != key


def test_command_line_settings_become_typed_overrides_of_every_cell():
    from simu_core.config import parse_settings

    overrides = parse_settings(["steps=200", "lr=1e-4", "mask.positions=subject", "stop_forget_em=none"])
    assert overrides == {"steps": 200, "lr": 1e-4, "mask": {"positions": "subject"}, "stop_forget_em": None}
    qc = QualityConfig(splits=["forget10"], methods=["simu"], seeds=[1], overrides=overrides)
    config = benchmark.cell_config(Cell("forget10", "simu", 1), qc)
    assert (config.steps, config.lr, config.mask.positions) == (200, 1e-4, "subject")
    assert config.mask.rule == "layer_threshold"  # the rest of the preset's mask stays


@pytest.mark.parametrize("item", ["stepz=3", "mask.colour=red", "steps"])
def test_a_mistyped_setting_is_refused_before_anything_loads(item, capsys):
    from simu_core.cli import main

    assert main(["bench", "quality", "--root", "/nonexistent", "--set", item]) == 2
    err = capsys.readouterr().err
    assert item.partition("=")[0] in err and ("unknown setting" in err or "NAME=VALUE" in err)


def test_fresh_and_stored_only_together_are_refused_before_anything_loads(capsys):
    from simu_core.cli import main

    # smollm2 would build its benchmark first (minutes, a download): the refusal must come before that
    assert main(["bench", "quality", "--benchmark", "smollm2", "--fresh", "--stored-only"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_cells_of_an_older_bench_format_are_stale(monkeypatch):
    qc, prints = QualityConfig(splits=["forget10"], methods=["simu"], seeds=[1]), {"builtin:full": "a"}
    key = cell_key(Cell("forget10", "simu", 1), qc, prints)
    monkeypatch.setattr(benchmark, "BENCH_FORMAT", benchmark.BENCH_FORMAT - 1)
    assert cell_key(Cell("forget10", "simu", 1), qc, prints) != key


def test_cell_records_keep_the_evaluation_notes(first_run):
    out, _ = first_run
    record = read_cell(out, Cell("forget10", "ga", 1))
    assert record["notes"]["model_utility"].startswith("6 of TOFU's 9 components (no real_authors split)")
    assert "6 of TOFU's 9 components" in (out / "quality.md").read_text()


def test_plan_cells_puts_references_first_and_rejects_unknown_names():
    cells = plan_cells(QualityConfig(splits=["forget01"], methods=["simu", "npo"], seeds=[1, 2]))
    assert [c.name for c in cells] == ["forget01__original", "forget01__retain_reference", "forget01__simu__seed1",
                                       "forget01__simu__seed2", "forget01__npo__seed1", "forget01__npo__seed2"]  # fmt: skip
    with pytest.raises(SimuError, match="forget03"):
        plan_cells(QualityConfig(splits=["forget03"]))
    with pytest.raises(SimuError, match="unknown method"):
        plan_cells(QualityConfig(methods=["simu", "magic"]))


# --------------------------------------------------------------------------------------------
# Aggregation, verdict, Markdown, figures (hand-made records)
# --------------------------------------------------------------------------------------------


def _record(method, seed, forget_em, utility, retain_em=0.9, status="ok", split="forget05"):
    metrics = {"forget/exact_match": forget_em, "model_utility": utility, "retain/exact_match": retain_em,
               "forget_quality": 0.01, "log10_forget_quality": -2.0}  # fmt: skip
    return {"split": split, "method": method, "seed": seed, "status": status, "metrics": metrics,
            "steps_done": 10, "unlearn_seconds": 1.0}  # fmt: skip


def test_aggregate_mean_and_sample_std_by_hand():
    records = [
        _record("simu", 1, 0.1, 0.5),
        _record("simu", 2, 0.2, None),
        _record("simu", 3, 0.6, 0.7, status="failed"),
    ]
    row = aggregate_records(records)["forget05"]["simu"]
    # forget EM 0.1, 0.2, 0.6: mean 0.3; deviations -0.2, -0.1, 0.3 -> sample var 0.14 / 2 = 0.07.
    assert row["forget/exact_match"]["mean"] == pytest.approx(0.3, abs=1e-12)
    assert row["forget/exact_match"]["std"] == pytest.approx(math.sqrt(0.07), abs=1e-12)
    # utility 0.5 and 0.7 (the None is left out): mean 0.6, sample std sqrt(0.02) = 0.1414...
    assert row["model_utility"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02), "n": 2})
    assert (row["n"], row["failed"]) == (3, 1)


def test_one_run_has_zero_spread():
    row = aggregate_records([_record("ga", 1, 0.25, 0.4)])["forget05"]["ga"]
    assert row["forget/exact_match"] == {"mean": 0.25, "std": 0.0, "n": 1}


def test_compare_means_by_hand():
    a, b = {"mean": 0.8, "std": 0.03, "n": 3}, {"mean": 0.7, "std": 0.04, "n": 3}
    # SE = sqrt(0.0009/3 + 0.0016/3) = sqrt(0.0025/3) = 0.02887; |d| = 0.1 > 2 SE -> "higher".
    result = compare_means(a, b)
    assert result["diff"] == pytest.approx(0.1) and result["se"] == pytest.approx(math.sqrt(0.0025 / 3))
    assert result["word"] == "higher"
    assert compare_means(a, {"mean": 0.75, "std": 0.04, "n": 3})["word"] == "tie"  # 0.05 < 2 x 0.0289


def test_matched_verdict_picks_utility_among_methods_that_forget_as_well():
    records = [_record(m, s, em, u) for m, em, u in [("simu", 0.02, 0.60), ("so_graddiff", 0.04, 0.55),
               ("ga", 0.50, 0.90), ("random_mask", 0.03, 0.58)] for s in (1, 2)]  # fmt: skip
    verdict = matched_verdict(aggregate_records(records)["forget05"])
    assert verdict["matched"] == ["random_mask", "simu", "so_graddiff"]  # ga forgets far less: not matched
    assert verdict["best_model_utility"] == "simu"  # ga has more utility but is not matched
    assert verdict["simu_vs_so_graddiff"]["model_utility"]["word"] == "higher"  # identical seeds: std 0


def test_markdown_has_every_method_and_the_references():
    records = [_record(m, s, 0.1 * s, 0.5) for m in QUALITY_METHODS for s in (1, 2)]
    records += [_record(r, None, 1.0, 0.6) for r in REFERENCE_ROWS]
    text = markdown_table(aggregate_records(records), ["forget05"], QUALITY_METHODS)
    for method in QUALITY_METHODS:
        assert f"| **{method}** | 2 (0) |" in text
    for row in REFERENCE_ROWS:
        assert f"| *{row}* | ref |" in text
    assert "0.150 ± 0.071" in text  # forget EM 0.1, 0.2: mean 0.15, sample std 0.0707


def test_figures_show_one_point_per_run_and_the_references(tmp_path):
    records = [_record(m, s, 0.1, 0.5) for m in ("simu", "npo") for s in (1, 2, 3)]
    records += [_record(r, None, 1.0, 0.6) for r in REFERENCE_ROWS]
    fq_mu, em = quality_figures(records, ["forget05"])
    assert {t.name: len(t.x) for t in fq_mu.data} == {"original": 1, "retain_reference": 1, "simu": 3, "npo": 3}
    page = write_figures(tmp_path / "q.html", [fq_mu, em], "t").read_text(encoding="utf-8")
    assert page.count("Plotly.newPlot") == 2 and "<script src=" not in page  # both figures, plotly.js inlined


# --------------------------------------------------------------------------------------------
# The larger built-in
# --------------------------------------------------------------------------------------------


def _llama_params(n_layers: int, d: int, d_ff: int, vocab: int) -> int:
    """Llama with tied embeddings: per layer 4 d^2 (q, k, v, o) + 3 d d_ff (gate, up, down) + 2 d (norms),
    plus the embedding V d and the final norm d."""
    return n_layers * (4 * d * d + 3 * d * d_ff + 2 * d) + vocab * d + d


def test_large_size_has_its_own_folder_and_an_80m_model(monkeypatch, full_model):
    from simu_core.config import builtin_config, builtin_root

    assert builtin_root("large") != builtin_root("default") and builtin_root("large").name == "builtin-large"
    monkeypatch.setenv("SIMU_BUILTIN_SIZE", "large")
    assert builtin_root() == builtin_root("large") and builtin_config().n_authors == 1000
    # The formula, checked on a real built-in model (the test build), then applied to the large config.
    cfg = full_model.model.config
    real = sum(p.numel() for p in full_model.model.parameters())
    assert _llama_params(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == real
    m = builtin_config("large").model
    assert 50e6 <= _llama_params(m.n_layers, m.d_model, m.d_ff, m.vocab_size) <= 100e6  # 81.8M
    monkeypatch.setenv("SIMU_BUILTIN_SIZE", "huge")
    with pytest.raises(SimuError, match="default, small, large"):
        builtin_root()


# --------------------------------------------------------------------------------------------
# Benchmarks other than the built-in authors (the real-knowledge one on SmolLM2)
# --------------------------------------------------------------------------------------------


def test_the_knowledge_benchmark_has_its_own_data_model_and_no_reference_row():
    qc = QualityConfig(benchmark="smollm2", splits=["forget"], methods=["simu"], seeds=[1])
    assert [c.name for c in plan_cells(qc)] == ["forget__original", "forget__simu__seed1"]
    config = benchmark.cell_config(Cell("forget", "simu", 1), qc)
    assert (config.model, config.forget, config.retain) == (
        "builtin:smollm2", "builtin:smollm2/forget", "builtin:smollm2/retain")  # fmt: skip
    assert config.eval_every == 5  # SmolLM2's own preset, not the built-in default's


def test_the_knowledge_benchmark_tunes_on_a_split_it_never_reports():
    bench = benchmark.get_benchmark("smollm2")
    assert "other_capitals" in bench.tuning_splits and "other_capitals" not in bench.splits
    plan_cells(QualityConfig(benchmark="smollm2", splits=["other_capitals"], methods=["simu"], seeds=[0]))
    with pytest.raises(SimuError, match="unknown split 'forget10' for the smollm2 benchmark"):
        plan_cells(QualityConfig(benchmark="smollm2", splits=["forget10"]))
    with pytest.raises(SimuError, match="unknown benchmark 'tofu'"):
        plan_cells(QualityConfig(benchmark="tofu"))


def test_the_disjoint_forget_sets_are_reported_on_request_with_their_own_reference():
    bench = benchmark.get_benchmark("builtin")
    assert bench.held_out_splits == ("forget10b", "forget10c") and "forget10b" not in bench.splits
    cells = plan_cells(QualityConfig(splits=["forget10b"], methods=["simu"], seeds=[1]))
    assert {c.split for c in cells} == {"forget10b"}
    assert bench.data("forget10b")["retain"] == "builtin:retain10b"
    assert bench.reference("forget10b") == "builtin:retain10b"


def test_a_benchmark_without_reference_runs_and_says_why_forget_quality_is_missing(builtin_dir, tmp_path, monkeypatch):
    # The tiny model stands in for a pretrained one: same code path as SmolLM2's table, seconds instead of minutes.
    tiny = benchmark.Benchmark("tiny_knowledge", "builtin:full", ("forget10",),
                               lambda split: {"forget": f"builtin:{split}", "retain": "builtin:retain10",
                                              "general": "builtin:world_facts"},
                               lambda split: None, columns=benchmark.KNOWLEDGE_COLUMNS[:4])  # fmt: skip
    monkeypatch.setitem(benchmark.BENCHMARKS, "tiny_knowledge", tiny)
    qc = QualityConfig(benchmark="tiny_knowledge", splits=["forget10"], methods=["ga"], seeds=[1], eval=SMOKE_EVAL,
                       overrides={"steps": 2}, root=str(builtin_dir), out=str(tmp_path))  # fmt: skip
    result = run_quality(qc)
    assert result.computed == ["forget10__original", "forget10__ga__seed1"]
    record = read_cell(tmp_path, Cell("forget10", "ga", 1))
    assert "forget_quality" not in record["metrics"] and "general/exact_match" in record["metrics"]
    assert "no copy pretrained without it exists" in record["skipped"]["forget_quality"]
    text = (tmp_path / "quality.md").read_text(encoding="utf-8")
    assert "no retain reference exists" in text and "| **ga** |" in text and "retain_reference" not in text


def test_paired_difference_matches_scipys_t_interval():
    from scipy import stats

    simu = [_record("simu", s, 0.0, u, retain_em=r) for s, u, r in [(1, 0.5, 0.80), (2, 0.6, 0.90), (3, 0.4, 0.85)]]
    rand = [_record("random_mask", s, 0.0, u, retain_em=r) for s, u, r in [(1, 0.4, 0.70), (2, 0.5, 0.75), (3, 0.1, 0.72)]]  # fmt: skip
    diffs = [0.10, 0.15, 0.13]  # retain EM, seed by seed
    d = benchmark.paired_difference(simu + rand, "forget05", "simu", "random_mask", "retain/exact_match")
    low, high = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert (d["low"], d["high"]) == (pytest.approx(low, abs=1e-3), pytest.approx(high, abs=1e-3))  # T_975 has 3 digits
    assert d["n"] == 3 and d["word"] == "higher"
    wide = benchmark.paired_difference(simu + rand, "forget05", "simu", "random_mask", "model_utility")
    assert wide["word"] == "no difference"  # 0.1, 0.1, 0.3: the interval [-0.09, 0.42] holds 0
    assert (
        benchmark.paired_difference(simu[:1] + rand, "forget05", "simu", "random_mask", "model_utility")["word"]
        == "n/a"
    )


def test_the_paired_report_compares_each_simu_variant_with_its_own_control():
    qc = QualityConfig(splits=["forget05"], methods=["simu_paper", "random_mask_paper", "so_graddiff"], seeds=[1, 2])
    records = [_record("simu_paper", s, 0.0, 0.5 + 0.01 * s, retain_em=0.9) for s in (1, 2)]
    records += [_record(m, s, 0.0, 0.4, retain_em=0.8) for m in ("random_mask_paper", "so_graddiff") for s in (1, 2)]
    for record in records:
        record["n_items"] = {"forget": 20, "retain": 20}
    text = benchmark.paired_text(records, qc)
    assert "simu_paper − random_mask_paper" in text and "simu_paper − so_graddiff" in text
    assert "simu − " not in text  # simu did not run
    verdict = matched_verdict(aggregate_records(records)["forget05"])
    assert set(verdict) >= {"simu_paper_vs_so_graddiff", "simu_paper_vs_random_mask_paper"}


def test_identical_seed_differences_give_no_interval():
    simu = [_record("simu", s, 0.0, 0.5, retain_em=0.9) for s in (1, 2, 3)]
    fo = [_record("fo_graddiff", s, 0.0, 0.4, retain_em=0.8) for s in (1, 2, 3)]
    d = benchmark.paired_difference(simu + fo, "forget05", "simu", "fo_graddiff", "retain/exact_match")
    assert d["word"] == "no spread" and d["low"] is None and d["diff"] == pytest.approx(0.1)


def test_proportion_difference_matches_newcombes_worked_example():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 vs 48/80, method 10: 0.0524 to 0.3339.
    d = benchmark.proportion_difference(56 / 70, 70, 48 / 80, 80)
    assert d["diff"] == pytest.approx(0.2) and d["word"] == "higher"
    assert (d["low"], d["high"]) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))


def test_a_cell_keeps_each_items_outcome_for_paired_intervals(first_run):
    out, _ = first_run
    record = read_cell(out, Cell("forget10", "ga", 1))
    forget = record["items"]["forget"]
    assert len(forget["indices"]) == len(forget["exact_match"]) == record["n_items"]["forget"]
    assert set(forget["exact_match"]) <= {0, 1}
    assert sum(forget["exact_match"]) / len(forget["exact_match"]) == record["metrics"]["forget/exact_match"]


def _table_2x2(both: int, only_x: int, only_y: int, neither: int) -> tuple[list[int], list[int]]:
    """Two 0/1 outcome lists over the same items with the given counts of each pair of outcomes."""
    x = [1] * both + [1] * only_x + [0] * only_y + [0] * neither
    y = [1] * both + [0] * only_x + [1] * only_y + [0] * neither
    return x, y


def test_paired_proportion_difference_matches_the_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: complete response
    # before and after consolidation therapy (Cavo et al. 2012), pairs 59, 6, 16, 80; Newcombe's square-and-add
    # interval -0.1186 to -0.0046 (printed to 4 decimals, hence the tolerance).
    d = benchmark.paired_proportion_difference(*_table_2x2(59, 6, 16, 80))
    assert d["diff"] == pytest.approx(-0.0621, abs=1e-4) and d["word"] == "lower"
    assert (d["low"], d["high"]) == (pytest.approx(-0.1186, abs=1e-4), pytest.approx(-0.0046, abs=1e-4))


def test_pairing_narrows_the_interval_when_two_methods_agree_on_most_items():
    x, y = _table_2x2(10, 5, 0, 5)  # 15/20 vs 10/20: the 5 items where they differ all go one way
    paired = benchmark.paired_proportion_difference(x, y)
    independent = benchmark.proportion_difference(0.75, 20, 0.5, 20)
    assert paired["diff"] == pytest.approx(independent["diff"])
    assert paired["high"] - paired["low"] < independent["high"] - independent["low"]
    assert paired["word"] == "higher" and independent["word"] == "no difference"


def test_one_seed_cells_with_item_outcomes_are_compared_item_by_item():
    qc = QualityConfig(splits=["forget05"], methods=["simu_paper", "so_graddiff"], seeds=[1])
    x, y = _table_2x2(10, 5, 0, 5)
    records = [_record(m, 1, 0.0, 0.5, retain_em=sum(o) / 20) for m, o in (("simu_paper", x), ("so_graddiff", y))]
    for record, outcome in zip(records, (x, y), strict=True):
        record["n_items"] = {"forget": 20, "retain": 20}
        record["items"] = {"retain": {"indices": list(range(20)), "exact_match": outcome}}
    text = benchmark.paired_text(records, qc)
    assert "over the items (paired item by item): retain EM ↑ +0.250 [+0.032, +0.434] higher." in text
    records[1]["items"]["retain"]["indices"] = list(range(1, 21))  # not the same items: no pairing
    assert "over the items (seed means): forget EM ↓ +0.000" in benchmark.paired_text(records, qc)
    assert "retain EM ↑ +0.250 [-0.047, +0.494] no difference." in benchmark.paired_text(records, qc)


def test_the_table_shows_sophias_unclipped_share_and_no_interval_for_it():
    """A run fact beside the quality columns: the mean over seeds for Sophia's methods, – where a method
    has none (AdamW) or its cells predate the record; the paired report leaves it out."""
    records = [_record("so_graddiff", s, 0.0, 0.5) | {"unclipped_mean": 0.002 * s} for s in (1, 2)]
    records += [_record("fo_graddiff", s, 0.0, 0.4) | {"unclipped_mean": None} for s in (1, 2)]
    text = markdown_table(aggregate_records(records, [c[0] for c in benchmark.TABLE_COLUMNS]), ["forget05"],
                          ["so_graddiff", "fo_graddiff"])  # fmt: skip
    assert "| Sophia unclipped |" in text
    assert "| 0.0030 ± 0.0014 |" in text  # 0.002, 0.004: mean 0.003, sample std 0.00141
    assert text.split("**fo_graddiff**")[1].split("\n")[0].count("| – |") >= 1
    qc = QualityConfig(splits=["forget05"], methods=["simu", "so_graddiff"], seeds=[1, 2])
    both = [_record("simu", s, 0.0, 0.5) | {"unclipped_mean": 0.01} for s in (1, 2)] + records[:2]
    paired = benchmark.paired_text([r | {"n_items": {"forget": 20, "retain": 20}} for r in both], qc)
    assert "simu − so_graddiff" in paired and "unclipped" not in paired


KEPT = ("retain/exact_match", "world_facts/exact_match")


def _grid_point(lr: float, muse: dict | None) -> dict:
    return {"lr": lr, "muse": muse}


def _checkpoint(step: int, retain: float, world: float, probe: float) -> dict:
    return {"step": step, "retain/exact_match": retain, "world_facts/exact_match": world, "forget/fact_probe": probe}


def test_the_tuning_rule_picks_the_point_that_keeps_most_at_the_checkpoint():
    points = [_grid_point(1e-4, None),  # never forgot enough: not a candidate however much it kept
              _grid_point(3e-4, _checkpoint(200, 1.0, 0.6, 0.1)),  # keeps 0.80
              _grid_point(1e-3, _checkpoint(90, 0.9, 0.8, 0.3))]  # keeps 0.85  # fmt: skip
    assert benchmark.pick_tuned(points, KEPT, "forget/fact_probe")["lr"] == 1e-3


def test_the_tuning_rule_breaks_ties_by_less_left_then_by_the_earlier_step():
    # (0.1 + 0.2) / 2 is 0.15000000000000002 in floating point: still a tie with (0.3 + 0.0) / 2
    tie = [_grid_point(1e-4, _checkpoint(50, 0.1, 0.2, 0.3)), _grid_point(3e-4, _checkpoint(80, 0.3, 0.0, 0.1))]
    assert benchmark.pick_tuned(tie, KEPT, "forget/fact_probe")["lr"] == 3e-4
    same = [_grid_point(1e-4, _checkpoint(80, 0.9, 0.8, 0.1)), _grid_point(3e-4, _checkpoint(40, 0.9, 0.8, 0.1))]
    assert benchmark.pick_tuned(same, KEPT, "forget/fact_probe")["lr"] == 3e-4


def test_the_tuning_rule_picks_nothing_when_no_point_reached_the_checkpoint():
    assert benchmark.pick_tuned([_grid_point(1e-4, None)], KEPT, "forget/fact_probe") is None


def test_the_tuning_rule_reads_the_benchmarks_own_matched_point():
    # SmolLM2 has no retain reference: its points hold the scores at the forget target under "matched"
    known = ("retain/knows", "general/knows")
    points = [{"lr": 1e-5, "matched": None},
              {"lr": 1e-4, "matched": {"step": 20, "retain/knows": 1.0, "general/knows": 0.8, "forget/prob": 0.1}},
              {"lr": 3e-5, "matched": {"step": 40, "retain/knows": 1.0, "general/knows": 0.9, "forget/prob": 0.2}}]  # fmt: skip
    assert benchmark.pick_tuned(points, known, "forget/prob", reading="matched")["lr"] == 3e-5


# --------------------------------------------------------------------------------------------
# The fair-test options (issue 17): tuned picks, MUSE's stop, the relearning attack
# --------------------------------------------------------------------------------------------


def _tuning_file(path, picks: dict, steps: int = 250):
    """A tuning result as bench/tune_equal.py writes it (the parts the table reads)."""
    path.write_text(json.dumps({"settings": {"steps": steps}, "picks": picks}), encoding="utf-8")
    return path


def test_tuned_picks_carry_the_grids_budget_and_a_control_takes_its_methods_pick(tmp_path):
    path = _tuning_file(tmp_path / "t.json", {"simu": {"lr": 3e-4, "gamma": 5.0, "rho_share": 0.3}}, steps=120)
    tuned = benchmark.read_tuned(path, ["simu", "random_mask"])
    assert tuned["simu"] == tuned["random_mask"] == {"lr": 3e-4, "gamma": 5.0, "rho_share": 0.3, "steps": 120}
    qc = QualityConfig(splits=["forget10"], methods=["simu", "random_mask"], seeds=[1], tuned=tuned)
    config = benchmark.cell_config(Cell("forget10", "random_mask", 1), qc)
    assert (config.lr, config.gamma, config.rho_share, config.steps) == (3e-4, 5.0, 0.3, 120)
    assert config.mask == benchmark.cell_config(Cell("forget10", "simu", 1), qc).mask  # a mask of the same size


def test_a_method_without_a_pick_is_named_with_the_fix(tmp_path):
    path = _tuning_file(tmp_path / "t.json", {"simu": {"lr": 1e-3, "gamma": 1.0}})
    with pytest.raises(SimuError, match="no pick for so_graddiff.*tune_equal.py --methods so_graddiff"):
        benchmark.read_tuned(path, ["simu", "so_graddiff"])
    with pytest.raises(SimuError, match="cannot read the tuning picks"):
        benchmark.read_tuned(tmp_path / "absent.json", ["simu"])


def test_a_bad_tuning_file_is_refused_before_anything_loads(tmp_path, capsys):
    from simu_core.cli import main

    assert main(["bench", "quality", "--root", "/nonexistent", "--tuned", str(tmp_path / "absent.json")]) == 2
    assert "cannot read the tuning picks" in capsys.readouterr().err


def test_muses_stop_needs_a_retain_reference():
    with pytest.raises(SimuError, match="no retain reference.*default stop"):
        QualityConfig(benchmark="smollm2", splits=["forget"], methods=["simu"], stop="muse")


@pytest.fixture(scope="module")
def fair_run(builtin_dir, tmp_path_factory):
    """The table with every fair-test option on the test build: GA at a 'pick' strong enough to forget within
    its budget, stopped by MUSE's rule, every row attacked."""
    out = tmp_path_factory.mktemp("fair")
    tuned = benchmark.read_tuned(_tuning_file(out / "t.json", {"ga": {"lr": 1e-3}}, steps=60), ["ga"])
    qc = QualityConfig(splits=["forget10"], methods=["ga"], seeds=[1], eval=SMOKE_EVAL, root=str(builtin_dir),
                       out=str(out / "table"), tuned=tuned, stop="muse", relearn=True)  # fmt: skip
    return qc, run_quality(qc)


def test_muses_stop_ends_the_run_at_the_retain_references_forget_rouge(fair_run, builtin_dir):
    from simu_core import data as qa
    from simu_core.models import load_model
    from simu_core.unlearn import forget_rouge

    qc, _ = fair_run
    record = read_cell(qc.out, Cell("forget10", "ga", 1))
    reference = load_model("builtin:retain10", device="cpu", root=builtin_dir)
    target = forget_rouge(reference, reference.model, qa.load_data("builtin:forget10", root=builtin_dir))
    config = record["config"]
    assert config["stop_forget_em"] is None and config["stop_forget_rouge"] == pytest.approx(target, abs=1e-12)
    assert (config["lr"], config["steps"]) == (1e-3, 60)  # the pick and the grid's budget
    assert record["stop_reason"] == "forget_target" and record["steps_done"] < 60 and record["reached_target"] == 1.0


def test_every_row_takes_the_relearning_attack_with_the_benchmarks_settings(fair_run, builtin_dir):
    from simu_core import data as qa
    from simu_core.models import load_model
    from simu_core.relearn import relearning_attack

    qc, result = fair_run
    for record in result.records:
        assert 0.0 <= record["metrics"]["relearn/heldout_after"] <= 1.0
    reference = load_model("builtin:retain10", device="cpu", root=builtin_dir)
    attack = relearning_attack(reference, reference.model, qa.load_data("builtin:forget10", root=builtin_dir),
                               qc.bench.relearn)  # fmt: skip
    stored = read_cell(qc.out, Cell("forget10", "retain_reference"))["metrics"]
    assert stored["relearn/heldout_after"] == attack["heldout_after"]  # same seeded halves and steps
    text = (Path(qc.out) / "quality.md").read_text(encoding="utf-8")
    assert " relearned held-out ↓ " in text and "relearning attack on every row" in text
    assert "stop: MUSE's matched forgetting" in text and "ga lr 0.001, steps 60" in text
    assert "every setting below comes from the tuning file" in text and "preset notes" not in text


def test_the_attack_and_the_stop_enter_the_key_only_when_asked_for(fair_run):
    qc, _ = fair_run
    prints = {"builtin:full": "a", "builtin:retain10": "b"}
    plain = QualityConfig(splits=["forget10"], methods=["ga"], seeds=[1], tuned=qc.tuned)
    attacked = QualityConfig(splits=["forget10"], methods=["ga"], seeds=[1], tuned=qc.tuned, relearn=True)
    muse = QualityConfig(splits=["forget10"], methods=["ga"], seeds=[1], tuned=qc.tuned, stop="muse")
    for cell in (Cell("forget10", "original"), Cell("forget10", "ga", 1)):
        assert cell_key(cell, plain, prints) != cell_key(cell, attacked, prints)
    assert cell_key(Cell("forget10", "ga", 1), plain, prints) != cell_key(Cell("forget10", "ga", 1), muse, prints, 0.4)
    assert cell_key(Cell("forget10", "original"), plain, prints) == cell_key(Cell("forget10", "original"), muse, prints)


def test_disjoint_splits_are_pooled_pair_by_pair_and_nested_ones_are_not():
    from scipy import stats

    diffs = {("forget10b", 1): 0.10, ("forget10b", 2): 0.02, ("forget10b", 3): 0.06,
             ("forget10c", 1): 0.08, ("forget10c", 2): 0.04, ("forget10c", 3): 0.12}  # fmt: skip
    records = []
    for (split, seed), diff in diffs.items():
        records.append(_record("simu_paper", seed, 0.0, 0.5, retain_em=0.8 + diff, split=split))
        records.append(_record("so_graddiff", seed, 0.0, 0.5, retain_em=0.8, split=split))
    for record in records:
        record["n_items"] = {"forget": 20, "retain": 20}
    d = benchmark.paired_difference(records, ["forget10b", "forget10c"], "simu_paper", "so_graddiff",
                                    "retain/exact_match")  # fmt: skip
    values = list(diffs.values())
    low, high = stats.t.interval(0.95, 5, loc=sum(values) / 6, scale=stats.sem(values))
    assert d["n"] == 6 and (d["low"], d["high"]) == (pytest.approx(low, abs=1e-3), pytest.approx(high, abs=1e-3))
    methods = ["simu_paper", "so_graddiff"]
    text = benchmark.paired_text(records, QualityConfig(splits=["forget10b", "forget10c"], methods=methods))
    assert "forget10b + forget10c pooled, simu_paper − so_graddiff**, over 6 pairs" in text
    nested = QualityConfig(splits=["forget01", "forget05"], methods=methods)
    assert benchmark.pooled_splits(nested) == [] and "pooled" not in benchmark.paired_text(records, nested)


def test_under_muses_stop_a_run_that_never_reached_it_leaves_its_pairs():
    records = [_record(m, s, 0.0, 0.5, retain_em=r, split="forget10b")
               for m, r in (("simu", 0.9), ("so_graddiff", 0.8)) for s in (1, 2, 3)]  # fmt: skip
    for record in records:
        record["n_items"] = {"forget": 20, "retain": 20}
        record["reached_target"] = 0.0 if (record["method"], record["seed"]) == ("simu", 3) else 1.0
    records[0]["metrics"]["retain/exact_match"] = 0.95  # seed 1 differs, so the pairs have a spread
    methods = ["simu", "so_graddiff"]
    muse = benchmark.paired_text(records, QualityConfig(splits=["forget10b"], methods=methods, stop="muse"))
    em = benchmark.paired_text(records, QualityConfig(splits=["forget10b"], methods=methods))
    assert "simu − so_graddiff**, over 2 paired seeds" in muse and "over 3 paired seeds" in em


# --------------------------------------------------------------------------------------------
# Pooling tables over base models
# --------------------------------------------------------------------------------------------

_POOL_META = {"benchmark": "builtin", "splits": ["forget10b", "forget10c"], "stop": "muse",
              "tuned": {"simu_paper": {"lr": 1e-3}},
              "eval": {"max_items": 200}, "overrides": {}, "relearn": None}  # fmt: skip


def _table(folder: Path, retain_diffs: dict, root: str, **meta) -> Path:
    """A quality.json of simu_paper vs so_graddiff whose retain EM differs by retain_diffs[(split, seed)]."""
    records = []
    for (split, seed), diff in retain_diffs.items():
        records.append(_record("simu_paper", seed, 0.0, 0.5, retain_em=0.8 + diff, split=split))
        records.append(_record("so_graddiff", seed, 0.0, 0.5, retain_em=0.8, split=split))
    folder.mkdir(parents=True)
    payload = {"meta": {**_POOL_META, "root": root, **meta}, "records": records}
    (folder / "quality.json").write_text(json.dumps(payload), encoding="utf-8")
    return folder


def _block_diffs(shift: float) -> dict:
    return {("forget10b", 1): 0.10 + shift, ("forget10b", 2): 0.02 + shift,
            ("forget10c", 1): 0.08 + shift, ("forget10c", 2): 0.04 + shift}  # fmt: skip


def test_pooling_over_bases_averages_seeds_in_each_block_and_intervals_over_blocks(tmp_path):
    from scipy import stats

    shifts = {"b1": 0.0, "b2": 0.03, "b3": -0.01}
    folders = [_table(tmp_path / b, _block_diffs(s), root=f"/cache/{b}") for b, s in shifts.items()]
    records, settings = benchmark.read_tables(folders)
    d = benchmark.replicate_difference(records, "simu_paper", "so_graddiff", "retain/exact_match")
    # block means by hand: forget10b (0.10 + 0.02) / 2 = 0.06, forget10c (0.08 + 0.04) / 2 = 0.06, plus the shift
    blocks = [0.06 + s for s in shifts.values() for _ in ("forget10b", "forget10c")]
    low, high = stats.t.interval(0.95, 5, loc=sum(blocks) / 6, scale=stats.sem(blocks))
    assert d["n"] == 6 and d["pairs"] == 12
    assert (d["low"], d["high"]) == (pytest.approx(low, abs=1e-3), pytest.approx(high, abs=1e-3))  # T_975: 3 digits
    assert settings["tables"] == {b: f"/cache/{b}" for b in shifts}


def test_pooled_words_follow_the_columns_goal():
    assert benchmark.judged("higher", "retain EM ↑") == "better"
    assert benchmark.judged("higher", "forget EM ↓") == "worse"
    assert benchmark.judged("lower", "PrivLeak (→0)") == "lower"
    assert benchmark.judged("no difference", "retain EM ↑") == "no difference"


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"stop": "em"}, r"other settings \(stop\)"),
        ({"root": "/cache/b1"}, "same base model"),
        ({"tuned": {"simu_paper": {"lr": 3e-4}}}, r"other settings \(tuned\)"),
    ],
)
def test_tables_of_another_protocol_or_the_same_base_are_not_pooled(tmp_path, meta, message):
    first = _table(tmp_path / "b1", _block_diffs(0.0), root="/cache/b1")
    second = _table(tmp_path / "b2", _block_diffs(0.0), **{"root": "/cache/b2", **meta})
    with pytest.raises(SimuError, match=message):
        benchmark.read_tables([first, second])


def test_tables_that_ran_other_methods_pool_when_their_shared_picks_agree(tmp_path):
    first = _table(tmp_path / "b1", _block_diffs(0.0), root="/cache/b1", tuned={"simu_paper": {"lr": 1e-3}})
    both = {"simu_paper": {"lr": 1e-3}, "so_graddiff": {"lr": 3e-4}}
    second = _table(tmp_path / "b2", _block_diffs(0.0), root="/cache/b2", tuned=both)
    records, _ = benchmark.read_tables([first, second])
    assert {r["base"] for r in records} == {"b1", "b2"}


def test_pooling_names_a_missing_table_with_the_fix(tmp_path):
    first = _table(tmp_path / "b1", _block_diffs(0.0), root="/cache/b1")
    with pytest.raises(SimuError, match=r"No quality table at .*b2.*bench quality --out"):
        benchmark.read_tables([first, tmp_path / "b2"])


def test_pooled_page_leaves_unreached_runs_out_and_counts_them(tmp_path):
    folders = [_table(tmp_path / b, _block_diffs(s), root=f"/cache/{b}") for b, s in (("b1", 0.0), ("b2", 0.02))]
    data = json.loads((folders[1] / "quality.json").read_text())
    for record in data["records"]:
        record["reached_target"] = 0.0 if record["split"] == "forget10c" and record["method"] == "simu_paper" else 1.0
    (folders[1] / "quality.json").write_text(json.dumps(data))
    records, settings = benchmark.read_tables(folders)
    pair = benchmark.pooled_differences(records, settings)["simu_paper − so_graddiff"]["retain/exact_match"]
    assert pair["n"] == 3 and pair["pairs"] == 6  # b2's forget10c block is gone
    assert benchmark.stop_counts(records)["simu_paper"] == {"b2": "2/4"}  # b1 recorded no reached_target


def test_cli_bench_pool_writes_the_page_and_refuses_a_single_table(tmp_path, capsys):
    from simu_core.cli import main as cli_main

    folders = [_table(tmp_path / b, _block_diffs(s), root=f"/cache/{b}") for b, s in (("b1", 0.0), ("b2", 0.02))]
    assert cli_main(["bench", "pool", "--tables", ",".join(map(str, folders)), "--out", str(tmp_path / "p")]) == 0
    page = (tmp_path / "p" / "pooled.md").read_text()
    assert "simu_paper − so_graddiff**, over 4 blocks (8 seed pairs)" in page and "**better**" in page
    assert "| **simu_paper** | 4 (0) |" in page  # the means: 2 bases x 2 seeds per split
    assert json.loads((tmp_path / "p" / "pooled.json").read_text())["settings"]["tables"]["b2"] == "/cache/b2"
    assert cli_main(["bench", "pool", "--tables", str(folders[0]), "--out", str(tmp_path / "q")]) == 2
    assert "two or more quality tables" in capsys.readouterr().err
