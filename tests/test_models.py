"""Loading any model spec, the built-in default and its cache, device choice, bad input."""

import json
import shutil

import pytest
import torch
import transformers as tf

from simu_core import builtin, models
from simu_core.config import to_dict
from simu_core.errors import SimuError
from tests.conftest import TEST_BUILTIN


def test_builtin_full_memorises_its_training_set(builtin_dir):
    # The small test build (20 authors, 2 layers) reaches ~0.96; the full-size >= 0.95 is a slow test.
    scores = builtin.read_manifest(builtin_dir)["exact_match"]
    assert scores["full/full"] >= 0.9


@pytest.mark.slow
def test_full_size_default_build_memorises_and_retain_reference_does_not(tmp_path):
    manifest = builtin.build_default(tmp_path / "builtin")
    assert manifest["exact_match"]["full/full"] >= 0.95
    assert manifest["exact_match"]["retain10/forget10"] <= 0.2


def test_retain_reference_never_saw_the_forget_authors(builtin_dir):
    scores = builtin.read_manifest(builtin_dir)["exact_match"]
    assert scores["retain10/retain10"] >= 0.9
    assert scores["retain10/forget10"] <= 0.2


def test_manifest_records_seed_config_versions_and_hashes(builtin_dir):
    manifest = builtin.read_manifest(builtin_dir)
    assert manifest["seed"] == TEST_BUILTIN.seed and manifest["config"] == to_dict(TEST_BUILTIN)
    assert {"torch", "transformers", "simu_core"} <= set(manifest["versions"])
    assert "models/full/model.safetensors" in manifest["files"]


def test_every_builtin_model_folder_loads_with_plain_transformers(builtin_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in models.BUILTIN_MODELS:
        folder = builtin_dir / "models" / name
        tf.AutoModelForCausalLM.from_pretrained(folder)
        tf.AutoTokenizer.from_pretrained(folder)
        assert json.loads((folder / "simu.json").read_text())["prompt_template"] == "Question: {question}\nAnswer:"


def test_builtin_spec_loads_on_cpu_in_fp32_eval_mode(full_model):
    assert full_model.device.type == "cpu"
    assert next(full_model.model.parameters()).dtype == torch.float32
    assert not full_model.model.training
    assert full_model.fmt.template == "Question: {question}\nAnswer:"


def test_greedy_answers_reproduce_memorised_facts(full_model, builtin_dir):
    from simu_core.data import load_data

    items = load_data("builtin:forget10", root=builtin_dir).items[:8]
    answers = models.greedy_answers(
        full_model.model, full_model.tokenizer, full_model.fmt, [it["question"] for it in items]
    )
    assert models.exact_match(answers, [it["answer"] for it in items]) >= 0.75


def test_local_folder_round_trip(full_model, tmp_path):
    full_model.model.save_pretrained(tmp_path, safe_serialization=True)
    full_model.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), device="cpu")
    for (name, a), (_, b) in zip(full_model.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.fmt.template == "Question: {question}\nAnswer:"  # default template without simu.json


def test_stale_cache_is_detected(builtin_dir):
    other = TEST_BUILTIN.__class__(n_authors=TEST_BUILTIN.n_authors + 1)
    assert builtin.builtin_status(builtin_dir, TEST_BUILTIN) == "ok"
    assert builtin.builtin_status(builtin_dir, other).startswith("stale")


def test_tampered_or_half_built_cache_is_not_taken_for_good(builtin_dir, tmp_path):
    copy = tmp_path / "builtin"
    shutil.copytree(builtin_dir, copy)
    (copy / "models" / "retain05" / "model.safetensors").unlink()
    assert builtin.builtin_status(copy).startswith("stale: files changed or incomplete")
    (copy / "manifest.json").unlink()
    assert builtin.builtin_status(copy) == "missing"


def test_pick_device_falls_back_to_cpu_without_accelerators():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert models.pick_device().type == "cpu"
    assert models.pick_device("cpu").type == "cpu"
    assert models.pick_dtype(torch.device("cpu")) == torch.float32


def test_asking_for_missing_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SimuError, match="no CUDA GPU.*--device cpu"):
        models.pick_device("cuda")


# --- bad input ----------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(SimuError, match="not found"):
        models.load_model(str(tmp_path / "no_model"))


def test_folder_without_safetensors(full_model, tmp_path):
    full_model.model.config.save_pretrained(tmp_path)
    torch.save(full_model.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SimuError, match="no safetensors weights"):
        models.load_model(str(tmp_path))


def test_unknown_hub_id_offline():
    with pytest.raises(SimuError, match="could not load model hub id 'no-such-org/no-such-model'"):
        models.load_model("no-such-org/no-such-model", device="cpu")


def test_unknown_builtin_name():
    with pytest.raises(SimuError, match="unknown built-in model 'half'"):
        models.load_model("builtin:half")


def test_unsupported_architecture_folder(full_model, tmp_path):
    bloom = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=512))
    bloom.save_pretrained(tmp_path, safe_serialization=True)
    full_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SimuError, match="unsupported model family 'bloom'"):
        models.load_model(str(tmp_path), device="cpu")


def test_cli_build_default_json_summary(tmp_path, capsys):
    from simu_core.cli import main

    code = main(["build-default", "--out", str(tmp_path / "b"), "--authors", "4", "--epochs", "1", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["built"] and set(summary["exact_match"]) >= {"full/full", "retain10/forget10"}
    assert (tmp_path / "b" / "data" / "holdout.jsonl").exists()


def test_folders_of_killed_builds_are_cleaned_up_but_running_ones_kept(tmp_path):
    import os

    dead = tmp_path / ".builtin.building-abc"  # old name without a pid: abandoned
    dead_pid = tmp_path / ".builtin.building-999999999-x"
    alive = tmp_path / f".builtin.building-{os.getpid()}-y"
    for folder in (dead, dead_pid, alive):
        folder.mkdir()
    builtin._remove_abandoned_builds(tmp_path / "builtin")
    assert not dead.exists() and not dead_pid.exists() and alive.exists()
