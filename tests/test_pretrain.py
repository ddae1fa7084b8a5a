"""The two-stage built-in (TOFU's regime): pretrain on world facts and other authors, then fine-tune the authors.

Built once per module on the small test build's benchmark, with the small shape and short recipes.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from simu_core import data as qa
from simu_core.answers import match_rate
from simu_core.builtin import _hash_folders
from simu_core.config import TinyModelConfig, TrainConfig
from simu_core.errors import SimuError
from simu_core.models import greedy_answers, load_model
from simu_core.pretrain import MANIFEST, StagedConfig, build_staged, pretraining_corpus, staged_config

SMALL = TinyModelConfig(n_layers=2, d_model=64, d_ff=256, n_heads=4, vocab_size=512, max_positions=96)


def small_config(train_seed: int = 0, parts: tuple[str, ...] = ("full", "retain10b")) -> StagedConfig:
    return StagedConfig("tiny", train_seed, n_background=20, world_repeats=3, model=SMALL,
                        pretrain=TrainConfig(epochs=30, batch_size=32, lr=5e-3, warmup_steps=10),
                        finetune=TrainConfig(epochs=30, batch_size=32, lr=5e-3, warmup_steps=10), parts=parts)  # fmt: skip


def exact_match(spec: str, split: str, root) -> float:
    loaded = load_model(spec, device="cpu", root=root)
    items = qa.load_data(f"builtin:{split}", root=root).items
    answers = greedy_answers(loaded.model, loaded.tokenizer, loaded.fmt, [it["question"] for it in items])
    return match_rate(answers, [it["answer"] for it in items])


@pytest.fixture(scope="module")
def staged(builtin_dir, tmp_path_factory):
    """(output folder, manifest) of a small two-stage build: the base, `full` and the forget10b reference."""
    out = tmp_path_factory.mktemp("staged")
    return out, build_staged(small_config(), out, data_root=builtin_dir, device="cpu")


def test_background_authors_are_new_people_asked_the_benchmarks_questions(builtin_dir):
    benchmark = {
        it["author"] for s in ("full", "holdout") for it in qa.load_data(f"builtin:{s}", root=builtin_dir).items
    }
    background = qa.background_authors(30, 0, sorted(benchmark))
    assert len({it["author"] for it in background}) == 30 and not {it["author"] for it in background} & benchmark
    assert Counter(it["fact"] for it in background) == Counter({fact: 30 for fact in qa._FACT_TEMPLATES})
    assert background == qa.background_authors(30, 0, sorted(benchmark))  # the seed decides
    assert background != qa.background_authors(30, 1, sorted(benchmark))


def test_the_pretraining_corpus_holds_every_world_fact_and_no_benchmark_author(builtin_dir):
    config = small_config()
    corpus = pretraining_corpus(config, builtin_dir)
    world = qa.load_data("builtin:world_facts", root=builtin_dir).items
    benchmark = {
        it["author"] for s in ("full", "holdout") for it in qa.load_data(f"builtin:{s}", root=builtin_dir).items
    }
    assert not {it.get("author") for it in corpus} & benchmark
    assert all(corpus.count(fact) == config.world_repeats for fact in world)


def test_the_base_knows_the_world_facts_and_none_of_the_authors(staged):
    _, manifest = staged
    assert manifest["base"]["exact_match"]["base/world_facts"] >= 0.5
    assert manifest["base"]["exact_match"]["base/forget10"] == 0.0


def test_finetuning_teaches_the_authors_and_the_reference_never_sees_its_forget_set(staged):
    out, manifest = staged
    assert exact_match("builtin:full", "forget10b", out) >= 0.5  # read back from the output, as a built-in cache
    assert exact_match("builtin:retain10b", "forget10b", out) <= 0.05
    assert manifest["parts"]["full"]["exact_match"]["full/world_facts"] >= 0.2  # some world knowledge survives


def test_the_output_is_laid_out_like_the_builtin_cache(staged, builtin_dir):
    out, _ = staged
    assert (
        qa.load_data("builtin:forget10b", root=out).items == qa.load_data("builtin:forget10b", root=builtin_dir).items
    )
    simu = json.loads((out / "models" / "full" / "simu.json").read_text())
    assert simu["finetuned_from"] == str(out / "models" / "base") and simu["trained_on"] == "full"


def test_a_second_call_keeps_the_finished_stages(staged, builtin_dir):
    out, manifest = staged
    before = _hash_folders(out, ["models/base", "models/full"])
    stamp = (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    again = build_staged(small_config(), out, data_root=builtin_dir, device="cpu")
    assert again == json.loads((out / MANIFEST).read_text()) and again["base"] == manifest["base"]
    assert _hash_folders(out, ["models/base", "models/full"]) == before
    assert (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def quick_base(builtin_dir, out, train_seed: int) -> dict:
    """A base pretrained for 3 epochs only (no fine-tuned parts): enough to compare weights across seeds."""
    config = small_config(train_seed, parts=())
    config.pretrain.epochs = 3
    return build_staged(config, out, data_root=builtin_dir, device="cpu")["base"]


def test_the_train_seed_changes_the_weights_not_the_data(builtin_dir, tmp_path):
    weights = "models/base/model.safetensors"
    seed0, seed1 = quick_base(builtin_dir, tmp_path / "0", 0), quick_base(builtin_dir, tmp_path / "1", 1)
    assert seed1["files"][weights] != seed0["files"][weights]
    assert pretraining_corpus(small_config(1), builtin_dir) == pretraining_corpus(small_config(0), builtin_dir)


def test_the_same_train_seed_gives_the_same_base(builtin_dir, tmp_path):
    weights = "models/base/model.safetensors"
    first, again = quick_base(builtin_dir, tmp_path / "a", 0), quick_base(builtin_dir, tmp_path / "b", 0)
    assert again["files"][weights] == first["files"][weights]


def test_a_part_asked_for_later_is_tuned_onto_the_same_base(builtin_dir, tmp_path):
    base = quick_base(builtin_dir, tmp_path, 0)
    config = small_config(parts=("retain10b",))
    config.pretrain.epochs, config.finetune.epochs = 3, 2
    later = build_staged(config, tmp_path, data_root=builtin_dir, device="cpu")
    assert later["base"] == base and set(later["parts"]) == {"retain10b"}


def test_a_new_base_retunes_the_parts(builtin_dir, tmp_path):
    config = small_config(parts=("retain10b",))
    config.pretrain.epochs, config.finetune.epochs = 3, 2
    first = build_staged(config, tmp_path, data_root=builtin_dir, device="cpu")["parts"]["retain10b"]["files"]
    config.pretrain.epochs = 4
    second = build_staged(config, tmp_path, data_root=builtin_dir, device="cpu")["parts"]["retain10b"]["files"]
    assert second != first


def test_unknown_size_is_refused_with_the_choices():
    with pytest.raises(SimuError, match="tiny, mid"):
        staged_config("huge")


def test_the_mid_size_is_a_few_million_parameters():
    m = staged_config("mid").model
    per_layer = 4 * m.d_model**2 + 3 * m.d_model * m.d_ff
    assert 5e6 <= m.n_layers * per_layer + m.vocab_size * m.d_model <= 10e6  # the 5-10M


def test_the_quality_table_runs_on_a_two_stage_build(staged, tmp_path, capsys):
    from simu_core.cli import main

    out, _ = staged
    argv = ["bench", "quality", "--root", str(out), "--splits", "forget10b", "--methods", "ga", "--seeds", "1",
            "--steps", "2", "--max-items", "8", "--max-new-tokens", "16", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["computed"] == 3  # the original, the retain reference (retain10b of this build) and ga


def test_the_command_refuses_an_unknown_part_before_pretraining(tmp_path, capsys):
    from simu_core.cli import main

    assert main(["build-staged", "--parts", "full,forget10", "--out", str(tmp_path)]) == 2
    assert "forget10" in capsys.readouterr().err and not (tmp_path / "models").exists()


def test_the_app_finds_a_two_stage_builds_model_to_unlearn(staged, builtin_dir):
    from simu_core.pretrain import staged_models

    out, _ = staged
    assert out / "models" / "full" in staged_models(out.parent)
    assert staged_models(builtin_dir.parent) == []  # a one-stage cache has no staged.json


def test_a_two_stage_model_is_compared_with_its_own_builds_retain_reference(staged):
    from simu_core.evaluation import default_reference

    out, _ = staged
    full = str(out / "models" / "full")
    assert default_reference(full, "builtin:forget10b") == str(out / "models" / "retain10b")
    assert default_reference(full, "builtin:forget05") is None  # that reference was not built here
    assert default_reference(full, "my_forget.jsonl") is None
