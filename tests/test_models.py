"""Loading any model spec, greedy answers, device choice, bad input (the built-in cache: test_builtin.py)."""

import time

import pytest
import torch
import transformers as tf

from simu_core import models
from simu_core.errors import SimuError


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


def test_unknown_hub_id_offline_fails_at_once_without_repeating_itself():
    start = time.perf_counter()
    with pytest.raises(
        SimuError, match="model 'no-such-org/no-such-model' is not in the local Hugging Face cache"
    ) as err:
        models.load_model("no-such-org/no-such-model", device="cpu")
    assert time.perf_counter() - start < 5
    assert ".." not in str(err.value) and "could not load" not in str(err.value).lower()


def test_a_malformed_hub_id_is_named():
    with pytest.raises(SimuError, match="is not a valid hub id"):
        models.load_model("no such model", device="cpu")


def test_unknown_builtin_name():
    with pytest.raises(SimuError, match="unknown built-in model 'half'"):
        models.load_model("builtin:half")


def test_unsupported_architecture_folder(full_model, tmp_path):
    bloom = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=512))
    bloom.save_pretrained(tmp_path, safe_serialization=True)
    full_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SimuError, match="unsupported model family 'bloom'"):
        models.load_model(str(tmp_path), device="cpu")
