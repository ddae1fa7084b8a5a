"""Fine-tuning the fictitious authors onto a pretrained base (TOFU's regime), on the small test build.

The "pretrained" base is the small build's `retain10` model: it never saw forget10's authors, so a
fine-tune on `full` must teach them, and must leave the base folder as it was.
"""

from __future__ import annotations

import json

import pytest

from simu_core import data as qa
from simu_core.answers import match_rate
from simu_core.builtin import _hash_folders
from simu_core.config import TrainConfig
from simu_core.errors import SimuError
from simu_core.finetune import CPU_WARN_PARAMS, MANIFEST, FinetuneConfig, cpu_warning, finetune_authors
from simu_core.models import greedy_answers, load_model

TRAIN = TrainConfig(epochs=12, batch_size=16, lr=3e-3, warmup_steps=5)


def forget10_em(spec: str, root) -> float:
    loaded = load_model(spec, device="cpu", root=root)
    items = qa.load_data("builtin:forget10", root=root).items
    return match_rate(greedy_answers(loaded.model, loaded.tokenizer, loaded.fmt, [it["question"] for it in items]),
                      [it["answer"] for it in items])  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(builtin_dir, tmp_path_factory):
    """(output folder, manifest, base folder hashes before) of `full` fine-tuned onto the small retain10."""
    base = builtin_dir / "models" / "retain10"
    before = _hash_folders(builtin_dir, ["models/retain10"])
    out = tmp_path_factory.mktemp("authors")
    config = FinetuneConfig(base=str(base), parts=("full",), train=TRAIN)
    return out, finetune_authors(config, out, data_root=builtin_dir, device="cpu"), before


def test_finetuning_teaches_the_base_the_authors_it_never_saw(finetuned, builtin_dir):
    out, manifest, _ = finetuned
    assert forget10_em(str(builtin_dir / "models" / "retain10"), builtin_dir) <= 0.05  # the base does not know them
    assert forget10_em("builtin:full", out) >= 0.5  # the same split, from the output laid out like a built-in cache
    assert manifest["parts"]["full"]["exact_match"]["full/full"] >= 0.5


def test_the_base_model_folder_is_left_as_it_was(finetuned, builtin_dir):
    _, _, before = finetuned
    assert _hash_folders(builtin_dir, ["models/retain10"]) == before


def test_the_output_names_its_base_and_keeps_the_qa_format(finetuned, builtin_dir):
    out, _, _ = finetuned
    simu = json.loads((out / "models" / "full" / "simu.json").read_text())
    assert simu["finetuned_from"].endswith("retain10") and simu["trained_on"] == "full"
    assert simu["prompt_template"] == qa.DEFAULT_PROMPT_TEMPLATE and simu["append_eos"] is True
    assert (out / "data" / "forget10.jsonl").read_bytes() == (builtin_dir / "data" / "forget10.jsonl").read_bytes()


def test_a_second_call_keeps_finished_parts(finetuned, builtin_dir):
    out, manifest, _ = finetuned
    stamp = (out / "models" / "full" / "model.safetensors").stat().st_mtime_ns
    again = finetune_authors(FinetuneConfig(base=manifest["config"]["base"], parts=("full",), train=TRAIN), out,
                             data_root=builtin_dir, device="cpu")  # fmt: skip
    assert again["parts"]["full"] == json.loads((out / MANIFEST).read_text())["parts"]["full"]
    assert (out / "models" / "full" / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_unknown_part_is_refused_with_the_choices(tmp_path, builtin_dir):
    with pytest.raises(SimuError, match="retain10"):
        finetune_authors(FinetuneConfig(parts=("forget10",)), tmp_path, data_root=builtin_dir, device="cpu")


def test_cpu_warning_only_for_big_models_on_cpu():
    import torch

    assert cpu_warning(CPU_WARN_PARAMS + 1, torch.device("cpu")) is not None
    assert cpu_warning(CPU_WARN_PARAMS - 1, torch.device("cpu")) is None
    assert cpu_warning(10 * CPU_WARN_PARAMS, torch.device("meta")) is None  # any non-CPU device: no warning
