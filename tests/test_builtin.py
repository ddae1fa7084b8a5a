"""The built-in default's cache: parts, manifest, damage, locking, background builds that survive their caller."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import transformers as tf

from simu_core import builtin
from simu_core.config import BuiltinConfig, TinyModelConfig, TrainConfig, builtin_config, to_dict
from tests.conftest import TEST_BUILTIN

# A build of a few seconds: enough to exercise every part, not to learn anything.
MICRO = BuiltinConfig(
    n_authors=4,
    seed=0,
    model=TinyModelConfig(n_layers=1, d_model=32, d_ff=64, n_heads=2, vocab_size=300, max_positions=96),
    train=TrainConfig(epochs=1, batch_size=16, warmup_steps=1),
)


@pytest.fixture(scope="module")
def micro_build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("micro") / "builtin"
    builtin.build(root, MICRO)
    return root


def copy_of(build: Path, tmp_path: Path) -> Path:
    target = tmp_path / "builtin"
    shutil.copytree(build, target, ignore=shutil.ignore_patterns(builtin.BUILD_DIR))
    return target


def mtimes(root: Path, part: str) -> dict[str, int]:
    return {f: (root / f).stat().st_mtime_ns for f in builtin.read_manifest(root)["parts"][part]["files"]}


# --------------------------------------------------------------------------- what the build makes
def test_builtin_full_memorises_its_training_set(builtin_dir):
    # The small test build (20 authors, 2 layers) reaches ~0.96; the full-size >= 0.95 is a slow test.
    scores = builtin.read_manifest(builtin_dir)["exact_match"]
    assert scores["full/full"] >= 0.9


@pytest.mark.slow
def test_full_size_default_build_memorises_and_retain_reference_does_not(tmp_path):
    manifest = builtin.build_default(tmp_path / "builtin")
    assert manifest["exact_match"]["full/full"] >= 0.95
    assert manifest["exact_match"]["retain10/forget10"] <= 0.05


def test_retain_reference_never_saw_the_forget_authors(builtin_dir):
    scores = builtin.read_manifest(builtin_dir)["exact_match"]
    assert scores["retain10/retain10"] >= 0.9
    assert scores["retain10/forget10"] <= 0.2


def test_disjoint_reference_never_saw_its_forget_authors(builtin_dir):
    builtin.ensure_builtin(builtin_dir, TEST_BUILTIN, parts=("retain10b",))  # on request: a few seconds here
    scores = builtin.read_manifest(builtin_dir)["exact_match"]
    assert scores["retain10b/retain10b"] >= 0.9
    assert scores["retain10b/forget10b"] <= 0.2


def test_manifest_records_seed_config_versions_and_each_part(builtin_dir):
    manifest = builtin.read_manifest(builtin_dir)
    assert manifest["seed"] == TEST_BUILTIN.seed and manifest["config"] == to_dict(TEST_BUILTIN)
    assert {"torch", "transformers", "simu_core"} <= set(manifest["versions"])
    # exactly the app's parts in build order, then any on-demand part another test asked for (shared build)
    assert list(manifest["parts"]) == list(builtin.with_app_parts(manifest["parts"]))
    assert "models/full/model.safetensors" in manifest["parts"]["full"]["files"]
    assert "data/forget10.jsonl" in manifest["parts"]["data"]["files"]
    assert manifest["files"] == {f: h for e in manifest["parts"].values() for f, h in e["files"].items()}


def test_every_builtin_model_folder_loads_with_plain_transformers(builtin_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in builtin.BUILD_ORDER[1:]:
        folder = builtin_dir / "models" / name
        tf.AutoModelForCausalLM.from_pretrained(folder)
        tf.AutoTokenizer.from_pretrained(folder)
        assert json.loads((folder / "simu.json").read_text())["prompt_template"] == "Question: {question}\nAnswer:"


def test_parts_are_named_by_the_specs_that_need_them():
    assert builtin.parts_for_specs("builtin:full", "builtin:forget10") == ("data", "full")
    assert builtin.parts_for_specs("builtin:retain05", None) == ("data", "retain05")
    assert builtin.parts_for_specs("builtin:world_facts") == ("data",)
    assert builtin.parts_for_specs("builtin:full", "builtin:forget10b") == ("data", "full")
    assert builtin.parts_for_specs("builtin:retain10c") == ("data", "retain10c")
    assert builtin.with_app_parts(("data", "retain10c")) == (*builtin.BUILD_ORDER, "retain10c")
    assert builtin.parts_for_specs("some/folder", "file.jsonl") == ()
    assert builtin.parts_for_specs("builtin:smollm2", "builtin:smollm2/forget") == ()  # not the built-in default


def test_disjoint_references_are_built_on_request_only(micro_build, tmp_path):
    root = copy_of(micro_build, tmp_path)
    assert builtin.builtin_status(root, MICRO) == "ok"  # the app's parts are all there without them
    assert builtin.part_states(root, MICRO)["retain10b"] == "missing"
    kept = {part: mtimes(root, part) for part in builtin.BUILD_ORDER}

    builtin.ensure_builtin(root, MICRO, parts=("retain10b",))

    manifest = builtin.read_manifest(root)
    assert builtin.part_states(root, MICRO)["retain10b"] == "ok" and "retain10c" not in manifest["parts"]
    assert {"retain10b/retain10b", "retain10b/forget10b"} <= set(manifest["exact_match"])
    assert {part: mtimes(root, part) for part in kept} == kept


# --------------------------------------------------------------------------- checking the cache
def test_stale_cache_is_detected(builtin_dir):
    other = TEST_BUILTIN.__class__(n_authors=TEST_BUILTIN.n_authors + 1)
    assert builtin.builtin_status(builtin_dir, TEST_BUILTIN) == "ok"
    assert builtin.builtin_status(builtin_dir, other).startswith("stale")


def test_stray_files_in_the_cache_change_nothing(micro_build, tmp_path):
    root = copy_of(micro_build, tmp_path)
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "models" / "full" / "model.safetensors~").write_text("editor backup")
    (root / "data" / "notes.txt").write_text("a marker some script left")
    assert builtin.builtin_status(root, MICRO) == "ok"


def test_a_damaged_part_is_found_and_rebuilt_alone(micro_build, tmp_path):
    root = copy_of(micro_build, tmp_path)
    (root / "models" / "retain05" / "model.safetensors").write_bytes(b"not a model")
    expected = {**dict.fromkeys(builtin.BUILD_ORDER, "ok"), **dict.fromkeys(builtin.EXTRA_PARTS, "missing")}
    assert builtin.part_states(root, MICRO) == {**expected, "retain05": "damaged"}
    assert builtin.builtin_status(root, MICRO) == "partial: retain05 damaged"
    kept = {part: mtimes(root, part) for part in ("data", "full", "retain10", "retain01")}

    builtin.ensure_builtin(root, MICRO)

    assert builtin.builtin_status(root, MICRO) == "ok"
    assert {part: mtimes(root, part) for part in kept} == kept


def test_half_built_cache_is_not_taken_for_good(micro_build, tmp_path):
    root = copy_of(micro_build, tmp_path)
    shutil.rmtree(root / "models" / "retain01")
    assert builtin.missing_parts(root, config=MICRO) == ["retain01"]
    assert builtin.missing_parts(root, ("full",), MICRO) == []  # a page that needs `full` can start
    (root / builtin.MANIFEST_NAME).unlink()
    assert builtin.builtin_status(root) == "missing"


def test_a_model_trained_on_other_data_counts_as_stale(micro_build, tmp_path):
    root = copy_of(micro_build, tmp_path)
    manifest = builtin.read_manifest(root)
    manifest["parts"]["full"]["data_digest"] = "from-another-tokenizer"
    (root / builtin.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert builtin.part_states(root, MICRO)["full"] == "stale"


def test_cli_builds_only_the_requested_parts(tmp_path, capsys):
    from simu_core.cli import main

    out = tmp_path / "b"
    code = main(["build-default", "--out", str(out), "--authors", "4", "--epochs", "1", "--parts", "full", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["built"] and set(summary["models"]) == {"full"}
    assert builtin.missing_parts(out) == ["retain10", "retain05", "retain01"]
    assert (out / "data" / "holdout.jsonl").exists()


# --------------------------------------------------------------------------- one builder at a time
def test_the_build_lock_is_seen_by_others_and_released_on_exit(tmp_path):
    root = tmp_path / "builtin"
    with builtin.build_lock(root):
        seen = []
        threading.Thread(target=lambda: seen.append(builtin.build_running(root))).start()
        time.sleep(0.2)
        assert seen == [True]
    assert not builtin.build_running(root)


def test_leftover_temp_folders_of_dead_builds_are_removed(tmp_path):
    root = tmp_path / "builtin"
    (root / ".full.building-999999999-1").mkdir(parents=True)
    (root / "keep.txt").write_text("user file")
    builtin.build(root, MICRO, parts=("data",))
    assert not list(root.glob(".*.building-*")) and (root / "keep.txt").exists()


def test_eta_extrapolates_the_pace_so_far():
    assert builtin.eta_from_fraction(30.0, 0.25) == pytest.approx(90.0)
    assert builtin.eta_from_fraction(1.0, 0.01) is None  # too early to tell


def wait_for(condition, timeout: float = 120.0, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def test_a_background_build_survives_its_caller_reports_progress_and_resumes_after_a_kill(tmp_path):
    slow = dataclasses.replace(MICRO, train=TrainConfig(epochs=60, batch_size=4))
    root = tmp_path / "builtin"
    assert builtin.start_background_build(root, slow)
    assert not builtin.start_background_build(root, slow)  # one build per folder

    status = wait_for(lambda: (s := builtin.read_build_status(root)) and s.parts.get("full") == "building" and s)
    assert status.state == "running" and builtin.build_running(root)
    status = wait_for(lambda: (s := builtin.read_build_status(root)) and s.eta_seconds is not None and s)
    assert status.fraction > 0 and status.eta_seconds > 0
    data_files = mtimes(root, "data")

    os.killpg(os.getpgid(status.pid), signal.SIGKILL)  # as if the machine's OOM killer or a user did it
    wait_for(lambda: not builtin.build_running(root))
    assert builtin.read_build_status(root).state == "interrupted"

    builtin.ensure_builtin(root, slow, parts=("full",))
    assert mtimes(root, "data") == data_files  # resumed: the finished part was kept
    assert builtin.missing_parts(root, ("full",), slow) == []
    assert not list(root.glob(".*.building-*"))


# --------------------------------------------------------------------------- the shipped default
@pytest.fixture
def shipped_micro(micro_build, tmp_path, monkeypatch) -> Path:
    """A micro build standing in for the package's shipped default."""
    assets = copy_of(micro_build, tmp_path / "assets")
    monkeypatch.setattr(builtin, "ASSETS", assets)
    return assets


def test_a_first_start_copies_the_shipped_build_instead_of_training(shipped_micro, tmp_path):
    manifest = builtin.build(tmp_path / "fresh", MICRO)
    assert {part: entry["source"] for part, entry in manifest["parts"].items()} == dict.fromkeys(
        builtin.BUILD_ORDER, "shipped"
    )
    assert builtin.builtin_status(tmp_path / "fresh", MICRO) == "ok"
    assert manifest["files"] == builtin.read_manifest(shipped_micro)["files"]


def test_a_shipped_file_that_fails_its_hash_is_trained_instead(shipped_micro, tmp_path):
    (shipped_micro / "models" / "retain01" / "model.safetensors").write_bytes(b"corrupted")
    manifest = builtin.build(tmp_path / "fresh", MICRO)
    assert manifest["parts"]["retain01"].get("source") != "shipped" and manifest["parts"]["full"]["source"] == "shipped"
    assert builtin.builtin_status(tmp_path / "fresh", MICRO) == "ok"


def test_the_shipped_build_is_not_used_for_other_settings_or_when_training_is_asked_for(shipped_micro, tmp_path):
    other = dataclasses.replace(MICRO, seed=1)
    assert all("source" not in e for e in builtin.build(tmp_path / "a", other)["parts"].values())
    trained = builtin.build(tmp_path / "b", MICRO, parts=("data",), use_shipped=False)
    assert "source" not in trained["parts"]["data"]


def test_the_package_ships_the_default_build_intact():
    manifest = builtin.shipped_manifest()
    assert manifest is not None, "simu_core/assets/builtin-default is missing (see README: the built-in default)"
    assert manifest["format"] == builtin.BUILTIN_FORMAT and manifest["config"] == to_dict(builtin_config("default"))
    assert list(manifest["parts"]) == list(builtin.BUILD_ORDER)
    for name, digest in manifest["files"].items():
        assert builtin._sha256(builtin.ASSETS / name) == digest, name
    assert manifest["exact_match"]["full/full"] >= 0.95
    assert all(manifest["exact_match"][f"retain{p}/forget{p}"] <= 0.05 for p in ("01", "05", "10"))


def test_the_shipped_data_is_what_this_version_generates(tmp_path):
    shipped = builtin.shipped_manifest()["parts"]["data"]["files"]
    made = builtin.build(tmp_path / "b", builtin_config("default"), parts=("data",), use_shipped=False)
    fresh = made["parts"]["data"]["files"]
    assert {f: h for f, h in fresh.items() if f.startswith("data/")} == {
        f: h for f, h in shipped.items() if f.startswith("data/")
    }
    shipped_tok = tf.AutoTokenizer.from_pretrained(builtin.ASSETS / "tokenizer")
    fresh_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "b" / "tokenizer")
    text = (builtin.ASSETS / "data" / "forget10.jsonl").read_text(encoding="utf-8")[:5000]
    assert shipped_tok(text)["input_ids"] == fresh_tok(text)["input_ids"]
