"""The HTML report (self-contained, before/after, deltas, per-example rows, escaping) and the
`evaluate` command (metrics JSON + report.html, with a model spec or a run folder)."""

from __future__ import annotations

import json
import re

import pytest
from plotly.offline import get_plotlyjs

from simu_core import cli, evaluation, metrics, models, report
from simu_core import data as qa

SMALL = metrics.EvalConfig(max_items=6, max_new_tokens=24)


@pytest.fixture(scope="module")
def retain_model(builtin_dir):
    return models.load_model("builtin:retain10", device="cpu", root=builtin_dir)


@pytest.fixture(scope="module")
def splits(builtin_dir):
    specs = evaluation.builtin_companions("builtin:forget10")
    return {name: qa.load_data(spec, root=builtin_dir) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def before_after(full_model, retain_model, splits):
    """'before' = the full model, 'after' = the retain model (what perfect unlearning would give)."""
    before = metrics.evaluate(full_model, splits, retain_model, SMALL)
    after = metrics.evaluate(retain_model, splits, retain_model, SMALL)
    return before, after


@pytest.fixture(scope="module")
def page(before_after) -> str:
    before, after = before_after
    return report.render_html(after, before)


def test_page_is_self_contained(page):
    assert get_plotlyjs() in page  # plotly.js inlined
    assert not re.search(r"<script[^>]*\ssrc=", page)
    assert not re.search(r"<link[^>]*\shref=", page)
    assert page.count("Plotly.newPlot") >= 4  # one per split with scores, MIA, truth ratios


def test_page_shows_both_models_and_the_deltas(page, before_after):
    before, after = before_after
    assert "builtin:full" in page and "builtin:retain10" in page
    delta = after.summary["forget/rouge_l"] - before.summary["forget/rouge_l"]
    assert delta < 0 and f"{delta:.3f}" in page  # the delta label on the forget bars
    assert f"{after.forget_quality:.4f}" in page and f"{before.forget_quality:.4f}" in page


def test_page_lists_every_evaluated_example_with_both_answers(page, before_after):
    before, after = before_after
    for name, result in after.splits.items():
        for question in result.questions:
            assert question.replace("'", "&#x27;") in page, (name, question)
        for answer in (result.generations or []) + (before.splits[name].generations or []):
            assert answer.replace("'", "&#x27;") in page


def test_page_shows_skipped_metrics_with_their_reason(page, before_after):
    _, after = before_after
    assert "holdout/rouge_l" in after.skipped
    assert "skip_inputs" in page


def test_single_model_page_and_escaping(full_model, tmp_path):
    hostile = qa.QADataset("hostile", [{"question": "<script>alert(1)</script>?", "answer": "a <b>bold</b> answer"}])
    result = metrics.evaluate(full_model, {"forget": hostile}, config=metrics.EvalConfig(metrics=["rouge_l", "prob"]))
    path = report.write_html(tmp_path / "report.html", result)
    page = path.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;?" in page and "<script>alert(1)" not in page
    assert "before" not in page.split("<h2>All numbers</h2>")[1].split("</table>")[0]  # one column of values


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture
def builtin_home(builtin_dir, tmp_path, monkeypatch):
    """SIMU_HOME whose built-in cache is the small test build (so `builtin:` specs resolve to it)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "builtin").symlink_to(builtin_dir, target_is_directory=True)
    monkeypatch.setenv("SIMU_HOME", str(home))
    return home


def test_evaluate_command_writes_metrics_json_and_report(builtin_home, tmp_path, capsys):
    out = tmp_path / "eval" / "metrics.json"
    code = cli.main(["evaluate", "--model", "builtin:full", "--out", str(out), "--max-items", "6", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert isinstance(saved["forget_quality"], float) and saved["forget_quality"] == summary["forget_quality"]
    assert saved["reference"] == "builtin:retain10" and set(saved["splits"]) == set(metrics.ROLES) - {"real_authors"}
    assert (out.parent / "report.html").is_file() and summary["html"] == str(out.parent / "report.html")


def test_evaluate_command_on_a_disjoint_forget_set_reads_against_its_own_reference(builtin_home, tmp_path):
    out = tmp_path / "eval" / "metrics.json"
    args = ["evaluate", "--model", "builtin:full", "--data", "builtin:forget10b", "--out", str(out), "--max-items", "6"]
    assert cli.main(args) == 0  # retain10b is trained first if this build lacks it (seconds at the test size)
    saved = json.loads(out.read_text())
    assert saved["reference"] == "builtin:retain10b" and isinstance(saved["forget_quality"], float)


def test_evaluate_command_without_model_or_out_explains_the_fix(builtin_home, capsys):
    assert cli.main(["evaluate", "--max-items", "6"]) == 2
    assert "--model" in capsys.readouterr().err


def test_evaluate_command_on_a_run_folder(builtin_home, full_model, splits, tmp_path, capsys):
    from simu_core import methods, runs

    config = methods.preset_config("ga", steps=3, lr=1e-3, stop_forget_em=None, eval_every=100, probe_every=100)
    _, folder = runs.run_unlearning(config, tmp_path / "runs", base=full_model, forget=splits["forget"],
                                    retain=splits["retain"])  # fmt: skip
    code = cli.main(["evaluate", "--run", str(folder), "--max-items", "6", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = metrics.Report.load(folder / "metrics.json")
    before = metrics.Report.load(folder / "metrics_before.json")
    assert after.model.startswith("run:") and before.model == "builtin:full"
    assert summary["before"]["model"] == "builtin:full" and summary["forget_quality"] == after.forget_quality
    assert after.summary["forget/prob"] != before.summary["forget/prob"]  # the delta was applied
    assert (folder / "report.html").is_file()
