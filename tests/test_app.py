"""The Streamlit app through `streamlit.testing.v1.AppTest`, on the small built-in default.

Background jobs run on the app's real job runner (one worker thread per process); `run_every`
fragments never fire under AppTest, so a test polls by calling `run()` again.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from simu_core import data as qa
from simu_core.arch import neuron_layers
from simu_core.attribution import attribute
from simu_core.methods import preset_config
from simu_core.neurons import NeuronMask
from simu_core.runs import list_runs, model_fingerprint, run_unlearning

REPO = Path(__file__).resolve().parents[1]
HEADERS = {
    "model_data": "1 · Model & data",
    "attribution": "2 · Attribution",
    "unlearn": "3 · Unlearn",
    "evaluate": "4 · Evaluate",
    "connectivity": "5 · Mode connectivity",
    "runs": "6 · Runs",
}


@pytest.fixture(scope="module")
def app_home(builtin_dir, tmp_path_factory) -> Path:
    """A SIMU_HOME whose built-in default is the small test one."""
    home = tmp_path_factory.mktemp("app_home")
    (home / "builtin").symlink_to(builtin_dir)
    return home


@pytest.fixture
def app(app_home, monkeypatch) -> AppTest:
    """A fresh browser session of the app, opened on its first page."""
    monkeypatch.setenv("SIMU_HOME", str(app_home))
    st_config.set_option("runner.magicEnabled", False)  # as .streamlit/config.toml: see the note there
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def library_run(app_home, full_model, builtin_dir) -> Path:
    """A finished two-step SIMU run in the app's runs folder, made by the library (a fixed mask: no attribution)."""
    mask = NeuronMask([torch.arange(layer.d_ff) % 16 == 0 for layer in neuron_layers(full_model.model)], "manual")
    config = preset_config("simu", steps=2, batch_size=8, retain_batch_size=8, probe_every=0, device="cpu")
    config.stop_forget_em = None
    forget = qa.load_data(config.forget, root=builtin_dir)
    retain = qa.load_data(config.retain, root=builtin_dir)
    _, folder = run_unlearning(config, app_home / "runs", base=full_model, forget=forget, retain=retain, mask=mask)
    return folder


def open_page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


def poll(at: AppTest, done, what: str, seconds: float = 240) -> AppTest:
    """Rerun the script until `done(at)` (a job finished): what the live fragment does in a browser."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert not at.exception, at.exception
        if done(at):
            return at
        time.sleep(0.3)
        at.run()
    raise AssertionError(f"timed out waiting for {what}; errors: {[e.value for e in at.error]}")


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def figures(at: AppTest) -> list[dict]:
    """The plotly figures on the page, as dicts."""
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def titles(at: AppTest) -> list[str]:
    return [f["layout"].get("title", {}).get("text", "") for f in figures(at)]


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def attribution_ready(at: AppTest) -> AppTest:
    """Open the attribution page with the fast method (grad x act) and wait for its three charts."""
    at.session_state["att_method"] = "grad_x_act"
    open_page(at, "attribution")
    return poll(at, lambda a: len(a.get("plotly_chart")) >= 3 or a.error, "the attribution charts")


# --------------------------------------------------------------------------- first start
def test_first_start_copies_the_shipped_default_and_shows_its_model(tmp_path, monkeypatch):
    from simu_core import builtin

    monkeypatch.setenv("SIMU_HOME", str(tmp_path))
    monkeypatch.delenv("SIMU_BUILTIN_SIZE", raising=False)
    st_config.set_option("runner.magicEnabled", False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert metric(at, "MLP neurons") == "4 × 512"  # the default size, not the small test build
    assert builtin.builtin_status(tmp_path / "builtin") == "ok"
    sources = {e["source"] for e in builtin.read_manifest(tmp_path / "builtin")["parts"].values()}
    assert sources == {"shipped"}


# --------------------------------------------------------------------------- every page loads


@pytest.mark.parametrize("page", ["model_data", "unlearn", "evaluate", "connectivity", "runs"])
def test_page_loads_on_the_builtin_default(app, page):
    open_page(app, page)
    assert HEADERS[page] in [h.value for h in app.header]
    assert not app.error, texts(app.error)


def test_model_page_shows_the_builtin_model_and_both_data_sets(app):
    assert metric(app, "Family") == "llama"
    assert {"Model source", "Forget set source", "Retain set source"} <= {r.label for r in app.radio}
    assert len(app.dataframe) == 3  # previews of the forget and retain sets, the greedy answers


def test_attribution_page_draws_heatmap_scatter_and_bars(app):
    attribution_ready(app)
    assert not app.error, texts(app.error)
    assert HEADERS["attribution"] in [h.value for h in app.header]
    assert {"Attribution method", "Rule", "Score", "Dual neurons", "Forget example"} <= {s.label for s in app.selectbox}
    assert app.slider(key="att_value_t").value == preset_config("simu").mask.value
    shown = titles(app)
    for words in ("Neuron scores", "Forget vs retain", "Selected neurons per layer"):
        assert any(words in t for t in shown), (words, shown)
    for fig in figures(app):  # every chart names its axes
        assert fig["layout"]["xaxis"]["title"]["text"] and fig["layout"]["yaxis"]["title"]["text"]


def test_threshold_slider_changes_the_counts_without_recomputing(app, full_model, builtin_dir):
    from pages.common import job_runner

    attribution_ready(app)
    jobs = len(job_runner().jobs())
    app.selectbox(key="att_score").set_value("forget").run()
    app.selectbox(key="att_dual").set_value("include").run()
    # the rule computed independently: critical iff score > t * the layer's max score
    scores = attribute(full_model, qa.load_data("builtin:forget10", root=builtin_dir), method="grad_x_act")
    width = sum(scores.widths())
    seen = {}
    for t in (0.1, 0.5, 0.9):
        app.slider(key="att_value_t").set_value(t).run()
        expected = sum(int((s > t * s.max()).sum()) for s in scores.layers)
        assert metric(app, "Selected neurons") == f"{expected} of {width}"
        seen[t] = (expected, metric(app, "Trainable parameters"))
    assert seen[0.1][0] > seen[0.5][0] > seen[0.9][0]
    assert len({v[1] for v in seen.values()}) == 3  # the trainable-parameter count follows
    assert len(job_runner().jobs()) == jobs  # no new attribution job: the scores were reused


def test_token_attribution_of_a_chosen_forget_example(app):
    attribution_ready(app)
    app.selectbox(key="att_example").set_value(1).run()
    app.button(key="launch_tokens").click().run()
    poll(app, lambda a: any("prompt tokens" in t for t in titles(a)) or a.error, "the token chart")
    assert not app.error, texts(app.error)


COMPANIES = b"question,answer\nWho founded Acme Rockets?,Ada Stone.\nWhere is Acme Rockets based?,In Oslo.\n"


def upload(at: AppTest, name: str, content: bytes, role: str = "forget") -> AppTest:
    if at.radio(key=f"{role}_kind").value != "Upload JSONL/CSV":
        at.radio(key=f"{role}_kind").set_value("Upload JSONL/CSV").run()
    at.file_uploader(key=f"{role}_file").upload(name, content, "text/csv").run()
    assert not at.exception, at.exception
    return at


def test_bad_upload_shows_the_validation_error_and_keeps_the_old_set(app):
    upload(app, "mine.csv", b"question,reply\nWho?,Me.\n")
    errors = " ".join(texts(app.error))
    assert "missing column(s) 'answer'" in errors and "Could not read the uploaded forget file" in errors
    assert app.session_state["forget_spec"] == "builtin:forget10"


def test_an_accepted_upload_is_stored_and_used_in_the_same_rerun(app, app_home):
    """(The sidebar reads forget_spec, set by the uploader's callback before the script: browser test.)"""
    upload(app, "companies.csv", COMPANIES)
    spec = app.session_state["forget_spec"]
    assert Path(spec).parent == app_home / "data" / "uploads" and Path(spec).name.startswith("companies-")
    assert qa.load_data(spec).questions()[0] == "Who founded Acme Rockets?"
    assert "2 items" in " ".join(m.value for m in app.markdown)


def test_a_bad_upload_after_a_good_one_keeps_the_good_one(app):
    upload(app, "companies.csv", COMPANIES)
    good = app.session_state["forget_spec"]
    upload(app, "bad_quote.csv", b'question,answer\nWho?,"Me.\n')
    assert "unterminated quote" in " ".join(texts(app.error))
    assert app.session_state["forget_spec"] == good


def test_choices_survive_leaving_the_page_and_coming_back(app):
    upload(app, "companies.csv", COMPANIES)
    good = app.session_state["forget_spec"]
    app.selectbox(key="retain_split").set_value("retain05").run()
    app.radio(key="model_source").set_value("Hugging Face hub id").run()
    app.text_input(key="model_hub").input("someone/model").run()
    open_page(app, "runs")
    open_page(app, "model_data")
    assert app.radio(key="forget_kind").value == "Upload JSONL/CSV"
    assert app.session_state["forget_spec"] == good
    assert app.selectbox(key="retain_split").value == "retain05"
    assert app.session_state["retain_spec"] == "builtin:retain05"
    assert app.text_input(key="model_hub").value == "someone/model"
    assert app.session_state["model_spec"] == "builtin:full"  # typed but not used yet


def test_model_page_previews_greedy_answers_and_says_the_model_knows_the_builtin_forget_set(app):
    answers = next(d.value for d in app.dataframe if "model's answer" in d.value.columns)
    assert len(answers) > 0 and answers["model's answer"].str.len().gt(0).all()
    assert any("The model knows the forget set" in s.value for s in app.success)
    assert metric(app, "Forget exact match") != ""


def test_knowledge_warning_on_an_upload_the_model_never_saw(app):
    upload(app, "companies.csv", COMPANIES)
    assert any("does not seem to know the forget set" in w.value for w in app.warning), texts(app.warning)
    for page in ("unlearn", "attribution"):
        open_page(app, page)
        assert any("Nothing to unlearn?" in w.value for w in app.warning), (page, texts(app.warning))


def test_a_mistyped_hub_id_fails_at_once_with_one_clear_message(app):
    app.radio(key="model_source").set_value("Hugging Face hub id").run()
    app.text_input(key="model_hub").input("EleutherAl/pythia-70m").run()
    start = time.perf_counter()
    next(b for b in app.button if b.label == "Use this model").click().run()
    assert time.perf_counter() - start < 5
    error = " ".join(texts(app.error))
    assert (
        "Could not load the model 'EleutherAl/pythia-70m'" in error and "not in the local Hugging Face cache" in error
    )
    assert ".." not in error and error.lower().count("could not load") == 1


def test_back_to_builtin_split_uses_it_and_back_to_upload_uses_the_upload_again(app):
    upload(app, "companies.csv", COMPANIES)
    good = app.session_state["forget_spec"]
    app.radio(key="forget_kind").set_value("Built-in split").run()
    assert app.session_state["forget_spec"] == "builtin:forget10"
    app.radio(key="forget_kind").set_value("Upload JSONL/CSV").run()
    assert app.session_state["forget_spec"] == good


# --------------------------------------------------------------------------- jobs


def launch_unlearning(app: AppTest, steps: int, method: str = "simu") -> AppTest:
    open_page(app, "unlearn")
    app.selectbox(key="ul_method").set_value(method).run()
    app.number_input(key=f"ul_{method}_steps").set_value(steps)
    app.number_input(key=f"ul_{method}_batch_size").set_value(8)
    app.checkbox(key=f"ul_{method}_stop_on").uncheck()
    app.button(key="launch_unlearn").click().run()
    assert not app.error, texts(app.error)
    return app


def test_tiny_unlearning_run_finishes_in_the_background_and_appears_on_the_runs_page(app, full_model, app_home):
    from pages.common import cached_model

    attribution_ready(app)  # the run then trains the neurons selected there
    launch_unlearning(app, steps=3)
    assert "Mask from the Attribution page" in app.success[0].value
    poll(app, lambda a: len(a.success) > 1 or a.error, "the unlearning run")
    assert not app.error, texts(app.error)
    name = re.search(r"Run `([^`]+)`: \*\*ok\*\* \(steps\) after 3 steps", app.success[-1].value).group(1)
    assert "Losses during unlearning" in titles(app)
    assert (Path(app.session_state["runs_dir"]) / name / "knowledge_check.json").is_file()
    app.selectbox(key="ul_method").set_value("ga").run()  # another method: the simu run's outcome goes away
    assert not any(s.value.startswith("Run `") for s in app.success)
    open_page(app, "runs")
    assert name in app.dataframe[0].value["run"].tolist()
    # the run trained its own copy: the model shared by all sessions is still the one on disk
    shared = cached_model("builtin:full", "auto", False, str(app_home))
    assert model_fingerprint(shared.model) == model_fingerprint(full_model.model)


def test_cancel_stops_a_running_unlearning_job(app):
    launch_unlearning(app, steps=5000, method="fo_graddiff")  # no mask to compute: steps start at once
    poll(app, lambda a: any("step " in p.proto.text for p in a.get("progress")), "the first steps")
    text = next(p.proto.text for p in app.get("progress") if "step " in p.proto.text)
    assert re.search(r"elapsed · (estimating the time|about .+) left to the 5000-step budget$", text), text
    app.button(key="cancel_unlearn").click().run()
    poll(app, lambda a: a.warning, "the cancelled notice", seconds=60)
    assert "was cancelled" in app.warning[0].value and "(cancelled)" not in app.warning[0].value
    assert any(r.status == "cancelled" for r in list_runs(Path(app.session_state["runs_dir"])))


def test_a_second_job_waits_in_the_queue_and_says_so(app, library_run):
    from pages.common import job_runner

    gate = threading.Event()
    blocker = job_runner().submit("another user's job", lambda ctx: gate.wait(60))
    try:
        open_page(app, "connectivity")
        app.number_input(key="conn_points").set_value(3)
        app.button(key="launch_connect").click().run()
        assert any(re.search(r"waiting: queued: \d+ job\(s\) ahead", i.value) for i in app.info), texts(app.info)
    finally:
        gate.set()
    blocker.wait(10)
    poll(app, lambda a: a.get("plotly_chart") or a.error, "the path after the queue")
    assert not app.error, texts(app.error)


def test_connectivity_plots_losses_along_the_path_with_the_barrier(app, library_run):
    open_page(app, "connectivity")
    app.selectbox(key="conn_b").set_value(next(o for o in app.selectbox(key="conn_b").options if library_run.name in o))
    app.number_input(key="conn_points").set_value(5).run()
    app.number_input(key="conn_sample").set_value(20).run()
    app.button(key="launch_connect").click().run()
    poll(app, lambda a: a.get("plotly_chart") or a.error, "the path")
    assert not app.error, texts(app.error)
    fig = figures(app)[0]
    assert {"forget barrier", "retain barrier"} <= {trace["name"] for trace in fig["data"]}
    assert fig["layout"]["yaxis"]["title"]["text"] == "loss (nats / answer token)"
    assert metric(app, "Forget barrier").endswith("nats")


def test_runs_page_opens_compares_and_deletes_runs(app, library_run, app_home):
    open_page(app, "runs")
    app.selectbox(key="runs_open").set_value(library_run.name).run()
    assert "Losses during unlearning" in titles(app)
    names = app.selectbox(key="runs_open").options
    if len(names) >= 2:
        app.multiselect(key="runs_compare").set_value(names[:2]).run()
        assert not app.error, texts(app.error)
    victim = next(n for n in names if n != library_run.name) if len(names) >= 2 else None
    if victim is not None:
        app.selectbox(key="runs_open").set_value(victim).run()
        app.checkbox(key=f"runs_sure_{victim}").check().run()
        app.button(key="runs_delete").click().run()
        assert victim not in [r.name for r in list_runs(app_home / "runs")]


@pytest.mark.slow
def test_evaluate_page_shows_before_and_after_for_a_run(app, library_run):
    open_page(app, "evaluate")
    app.selectbox(key="ev_run").set_value(library_run.name).run()
    app.number_input(key="ev_items").set_value(4).run()
    app.button(key="launch_evaluate").click().run()
    poll(app, lambda a: a.get("plotly_chart") or a.error, "the evaluation", seconds=400)
    assert not app.error, texts(app.error)
    assert {"Forget quality", "Model utility", "Forget ROUGE-L"} <= {m.label for m in app.metric}
    columns = set(app.dataframe[0].value.columns)
    assert {"question", "gold answer", "answer before", "answer after"} <= columns
    assert (library_run / "report.html").is_file()


def test_evaluate_page_runs_the_relearning_attack_on_a_run_and_keeps_the_result(app, library_run):
    open_page(app, "evaluate")
    app.selectbox(key="ev_run").set_value(library_run.name).run()
    app.number_input(key="ev_relearn_steps").set_value(2).run()
    app.button(key="launch_relearn").click().run()
    label = "Held-out facts given, after"
    poll(app, lambda a: any(m.label == label for m in a.metric) or a.error, "the relearning attack")
    assert not app.error, texts(app.error)
    stored = json.loads((library_run / "relearn.json").read_text(encoding="utf-8"))
    assert stored["steps"] == 2 and len(stored["losses"]) == 2 and stored["forget"] == "builtin:forget10"
    assert metric(app, label) == f"{stored['heldout_after']:.0%}"


def test_evaluate_page_plots_the_trade_off_curve_of_a_run_that_recorded_one(app, full_model, builtin_dir, app_home):
    """No evaluation needed: the curve comes from the run's history (points every step here)."""
    config = preset_config("fo_graddiff", steps=2, batch_size=8, retain_batch_size=8, probe_every=0, device="cpu",
                           curve_every=1, curve_items=4)  # fmt: skip
    config.stop_forget_em = None
    forget, retain = qa.load_data(config.forget, root=builtin_dir), qa.load_data(config.retain, root=builtin_dir)
    _, folder = run_unlearning(config, app_home / "runs", base=full_model, forget=forget, retain=retain)
    open_page(app, "evaluate")
    app.selectbox(key="ev_run").set_value(folder.name).run()
    assert not app.exception, app.exception
    expander = next(e for e in app.expander if e.label.startswith("Trade-off curve"))
    figures = [json.loads(c.proto.spec) for c in expander.get("plotly_chart")]
    assert len(figures) == 1 and len(figures[0]["data"]) == 2  # one run: retain, and the forget facts' probe
    assert [len(figures[0]["data"][0]["x"])] == [2]  # a point at each of the 2 steps


def test_compare_shows_short_numbers_and_no_mask_settings_for_a_method_without_a_mask(
    app, library_run, full_model, builtin_dir, app_home
):
    config = preset_config("so_graddiff", steps=2, batch_size=8, retain_batch_size=8, probe_every=0, device="cpu")
    config.stop_forget_em = None
    forget, retain = qa.load_data(config.forget, root=builtin_dir), qa.load_data(config.retain, root=builtin_dir)
    _, other = run_unlearning(config, app_home / "runs", base=full_model, forget=forget, retain=retain)
    open_page(app, "runs")
    app.multiselect(key="runs_compare").set_value([library_run.name, other.name]).run()
    table = next(d.value for d in app.dataframe if library_run.name in d.value.columns)
    assert table.loc["method", other.name] == "so_graddiff"
    assert all(v == "–" for k, v in table[other.name].items() if k.startswith("mask"))  # so_graddiff has no mask
    loss = table.loc["forget loss", other.name]
    raw = next(r.forget_loss for r in list_runs(app_home / "runs") if r.name == other.name)
    assert loss == f"{raw:.4g}" != str(raw)  # 4 significant digits, not 17


def test_unlearn_page_plans_the_memory_of_the_run_next_to_soul_before_launch(app):
    open_page(app, "unlearn")
    app.selectbox(key="ul_method").set_value("fo_graddiff").run()
    assert any(e.label.startswith("Memory plan") for e in app.expander)
    table = app.table[0].value
    assert list(table.columns)[1:] == ["fo_graddiff", "so_graddiff"]
    assert set(table[""]) >= {"weights", "optimizer", "activations", "total", "fits"}


def test_unlearn_page_warns_before_launch_when_the_run_would_not_fit(app, monkeypatch):
    from simu_core import memory

    open_page(app, "unlearn")
    assert not any("would stop before training" in w.value for w in app.warning)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1024**2)  # a device with 1 MiB free
    app.selectbox(key="ul_method").set_value("fo_graddiff").run()
    warning = next(w.value for w in app.warning if "would stop before training" in w.value)
    assert "1.0 MiB free" in warning and "Lower the batch sizes" in warning


def test_the_model_page_offers_the_two_stage_builds_on_this_machine(app, app_home, builtin_dir):
    build = app_home / "staged-tiny-seed7"
    (build / "models").mkdir(parents=True)
    (build / "staged.json").write_text("{}", encoding="utf-8")
    (build / "models" / "full").symlink_to(builtin_dir / "models" / "full")  # a real model folder to load
    try:
        app.radio(key="model_source").set_value("Local folder").run()
        picker = app.selectbox(key="staged_pick")
        assert picker.options == ["staged-tiny-seed7 · full"]
        picker.set_value(str(build / "models" / "full")).run()
        assert app.text_input(key="model_folder").value == str(build / "models" / "full")
        next(b for b in app.button if b.label == "Use this model").click().run()
        assert not app.exception and app.session_state["model_spec"] == str(build / "models" / "full")
    finally:
        shutil.rmtree(build)  # the other tests' home has no two-stage build
