"""The quality benchmark: cells run and are recorded, resume skips them, aggregation, Markdown, sizes."""

from __future__ import annotations

import json
import math
import shutil

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
    metrics = record["metrics"]
    assert 0.0 <= metrics["forget_quality"] <= 1.0 and 0.0 <= metrics["model_utility"] <= 1.0
    assert math.isclose(metrics["log10_forget_quality"], math.log10(metrics["forget_quality"]), rel_tol=1e-9)


def test_the_retain_reference_row_is_its_own_target(first_run):
    # KS test of a sample against itself: p = 1 exactly; PrivLeak against itself: 0 exactly.
    record = read_cell(first_run[0], Cell("forget10", "retain_reference"))
    assert record["metrics"]["forget_quality"] == 1.0 and record["metrics"]["privleak"] == 0.0


def test_outputs_are_written(first_run):
    out, result = first_run
    payload = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert {r["cell"] for r in payload["records"]} == set(result.computed)
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


def test_changed_settings_make_only_affected_cells_stale(builtin_dir, first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run[0], out)
    changed = run_quality(_smoke_config(builtin_dir, out, steps=3))
    assert changed.computed == ["forget10__ga__seed1"]  # the reference rows do not depend on the steps
    assert read_cell(out, Cell("forget10", "ga", 1))["steps_done"] == 3


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
