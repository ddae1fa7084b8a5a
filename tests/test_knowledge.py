"""The real-knowledge benchmark: fact tables, splits, perturbed answers, the known-fact filter (with
deterministic answer functions), its cache and the builtin:smollm2/<split> data specs."""

import json
from collections import Counter

import pytest

from simu_core import knowledge
from simu_core.answers import normalise
from simu_core.data import load_data
from simu_core.errors import SimuError


@pytest.fixture(scope="module")
def items():
    return knowledge.fact_items()


def test_tables_have_the_promised_families_and_sizes(items):
    splits = Counter(it["split"] for it in items)
    assert splits["forget"] >= 40 and splits["retain"] >= 40 and splits["other_capitals"] >= 30
    families = Counter(it["family"] for it in items)
    assert set(families) == {"capital", "currency", "language", "landmark", "author", "symbol"}
    assert all(n >= 30 for n in families.values())
    assert len({it["question"] for it in items}) == len(items)  # no prompt twice


def test_items_follow_the_project_item_format(items):
    for it in items:
        assert it["question"] and it["answer"] == it["accepted_answers"][0] == it["paraphrased_answer"]
        assert len(it["paraphrased_questions"]) == 2 and it["paraphrased_question"] == it["paraphrased_questions"][0]
        assert it["question"][0].isupper() and not it["question"].endswith(" ")
        assert it["family"] and it["entity"] and it["split"] in knowledge.SPLITS


def test_perturbed_answers_are_wrong_values_of_the_same_family(items):
    answers_of = {}
    for it in items:
        answers_of.setdefault(it["family"], set()).update(normalise(a) for a in it["accepted_answers"])
    capital_continent = {it["answer"]: it["continent"] for it in items if it["family"] == "capital"}
    for it in items:
        wrong = it["perturbed_answers"]
        assert len(wrong) == knowledge.N_PERTURBED == len(set(wrong))
        accepted = {normalise(a) for a in it["accepted_answers"]}
        assert not accepted & {normalise(w) for w in wrong}, it["question"]
        assert {normalise(w) for w in wrong} <= answers_of[it["family"]]
        if it["split"] in ("forget", "retain"):  # plenty of capitals on these continents
            assert {capital_continent[w] for w in wrong} == {it["continent"]}


def test_items_are_deterministic_and_the_seed_moves_only_perturbations(items):
    assert knowledge.fact_items() == items
    other = knowledge.fact_items(seed=1)
    assert [it["question"] for it in other] == [it["question"] for it in items]
    assert [it["perturbed_answers"] for it in other] != [it["perturbed_answers"] for it in items]
    assert knowledge.facts_hash(0) == knowledge.facts_hash(0) != knowledge.facts_hash(1)


def test_splits_follow_the_forget_asia_keep_europe_scenario(items):
    forgotten = {it["entity"] for it in items if it["split"] == "forget"}
    assert "Japan" in forgotten and "France" not in forgotten
    for it in items:
        if it["family"] == "capital":
            expected = {"Asia": "forget", "Europe": "retain"}.get(it["continent"], "other_capitals")
            assert it["split"] == expected
        elif it["entity"] in forgotten:
            assert it["split"] == "neighbour"
        else:
            assert it["split"] == "general"
    neighbour_families = {it["family"] for it in items if it["split"] == "neighbour"}
    assert neighbour_families == {"currency", "language", "landmark"}
    japan = [it["question"] for it in items if it["entity"] == "Japan"]
    assert "The currency of Japan is the" in japan and "Mount Fuji is located in the country of" in japan


# --- the known-fact filter, with deterministic answer functions -------------------------------


def _oracle(items, knows):
    """An answer function that answers item `it` right (in a chatty completion style) iff knows(it)."""
    by_prompt = {}
    for it in items:
        by_prompt[it["question"]] = it
        for q in it["paraphrased_questions"]:
            by_prompt[q] = {**it, "_paraphrase": True}

    def answer(prompts):
        out = []
        for p in prompts:
            it = by_prompt[p]
            if knows(it):
                out.append(f" {it['accepted_answers'][-1]}, as everyone knows.\n\nMore text.")
            else:
                out.append(f" {it['perturbed_answers'][0]}.\n")
        return out

    return answer


def test_select_known_keeps_exactly_the_known_facts(items):
    def knows(it):
        return len(it["entity"]) % 2 == 0

    splits, stats = knowledge.select_known(items, _oracle(items, knows))
    expected = [it["question"] for it in items if knows(it)]
    kept = [it["question"] for name in knowledge.SPLITS for it in splits[name]]
    assert sorted(kept) == sorted(expected)
    assert stats["known"] == len(expected) and stats["facts"] == len(items)
    assert len(splits["all"]) == len(items) and all("model_answer" in it for it in splits["all"])
    for name in knowledge.SPLITS:
        assert all(it["split"] == name and it["known"] for it in splits[name])
        assert stats["splits"][name] == len(splits[name])
    capitals = [it for it in items if it["family"] == "capital"]
    assert stats["families"]["capital"]["known"] == sum(map(knows, capitals))
    assert stats["families"]["capital"]["known_rate"] == pytest.approx(
        sum(map(knows, capitals)) / len(capitals), abs=1e-4
    )
    assert "paraphrases_known" not in splits["forget"][0]


def test_select_known_checks_paraphrases_on_request(items):
    sample = items[:30]

    def knows(it):
        return not it.get("_paraphrase") or it["family"] != "capital"

    splits, stats = knowledge.select_known(sample, _oracle(sample, knows), check_paraphrases=True)
    kept = [it for it in splits["all"] if it["known"]]
    assert len(kept) == len(sample)
    for it in kept:
        assert it["paraphrases_known"] == [it["family"] != "capital"] * 2
    assert stats["families"]["capital"]["paraphrase_known_rate"] == 0.0


def test_select_known_rejects_a_wrong_number_of_answers(items):
    with pytest.raises(SimuError, match="gave 1 answers for 2 prompts"):
        knowledge.select_known(items[:2], lambda prompts: ["x"])


def test_is_known_accepts_other_spellings_and_chatty_continuations():
    item = {"answer": "Kyiv", "accepted_answers": ["Kyiv", "Kiev"]}
    assert knowledge.is_known(" Kiev, the capital of Ukraine.", item)
    assert knowledge.is_known("Kyiv.\n\nIt is old.", item)
    assert not knowledge.is_known(" the capital of Ukraine, Kyiv.", item)
    assert not knowledge.is_known("\n", item)


# --- cache and data specs ----------------------------------------------------------------------


def _write_fake_benchmark(items, folder, fingerprint):
    splits, stats = knowledge.select_known(items, _oracle(items, lambda it: it["entity"] != "Japan"))
    info = {"model": "builtin:smollm2", "model_fingerprint": fingerprint, "seed": 0}
    return knowledge.write_knowledge(folder, splits, stats, info)


def test_cached_benchmark_loads_as_data_specs(items, monkeypatch, tmp_path):
    monkeypatch.setenv("SIMU_HOME", str(tmp_path))
    folder = knowledge.knowledge_root("smollm2")
    manifest = _write_fake_benchmark(items, folder, knowledge.expected_fingerprint("smollm2"))
    assert knowledge.knowledge_status(folder, knowledge.expected_fingerprint("smollm2")) == "ok"
    assert set(manifest["files"]) == {f"{s}.jsonl" for s in (*knowledge.SPLITS, "all")}
    forget = load_data("builtin:smollm2/forget")
    assert forget.name == "smollm2/forget" and len(forget) == manifest["splits"]["forget"]
    assert all(it["split"] == "forget" and it["continent"] == "Asia" for it in forget.items)
    assert "The capital of Japan is" not in forget.questions()  # not known by the fake model
    assert forget.has_field("perturbed_answers") and forget.has_field("paraphrased_answer")
    assert len(load_data("builtin:smollm2/neighbour")) == manifest["splits"]["neighbour"]


def test_a_missing_benchmark_is_refused_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMU_HOME", str(tmp_path))
    with pytest.raises(SimuError, match=r"not built yet .* Build it with `python -m simu_core\.knowledge build"):
        load_data("builtin:smollm2/forget")


def test_stale_or_tampered_benchmark_is_detected(items, monkeypatch, tmp_path):
    # load_data only reads the files; ensure_knowledge (called by the CLI and the app first) rebuilds stale ones
    monkeypatch.setenv("SIMU_HOME", str(tmp_path))
    folder = knowledge.knowledge_root("smollm2")
    _write_fake_benchmark(items, folder, "gguf:someotherfile")
    assert knowledge.knowledge_status(folder, knowledge.expected_fingerprint("smollm2")) == (
        "stale: built for other model weights"
    )
    _write_fake_benchmark(items, folder, knowledge.expected_fingerprint("smollm2"))
    (folder / "retain.jsonl").write_text("", encoding="utf-8")
    assert knowledge.knowledge_status(folder).startswith("stale: retain.jsonl")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["facts_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert knowledge.knowledge_status(folder) == "stale: the fact tables changed since the build"


def test_bad_knowledge_specs_name_the_choices():
    with pytest.raises(SimuError, match="unknown knowledge split 'forget10'.*forget, retain, neighbour"):
        load_data("builtin:smollm2/forget10")
    with pytest.raises(SimuError, match="no knowledge benchmark for 'gpt9'.*smollm2"):
        load_data("builtin:gpt9/forget")
    with pytest.raises(SimuError, match="builtin:smollm2/<split>"):
        load_data("no-such-spec")


def test_build_with_a_tiny_model_runs_end_to_end(converted, tmp_path):
    messages = []
    manifest = knowledge.build_knowledge(
        str(converted), tmp_path / "kb", lambda m, f: messages.append(f), device="cpu", batch_size=128
    )
    assert manifest["facts"] == len(knowledge.fact_items())
    assert manifest["model_fingerprint"].startswith("gguf:")
    assert messages[-1] == 1.0 and messages == sorted(messages)
    assert knowledge.knowledge_status(tmp_path / "kb") == "ok"
    everything = [json.loads(line) for line in (tmp_path / "kb" / "all.jsonl").read_text().splitlines()]
    assert len(everything) == manifest["facts"] and all("model_answer" in it for it in everything)
    with pytest.raises(SimuError, match="no default folder"):
        knowledge.build_knowledge(str(converted))


def test_a_knowledge_forget_set_is_evaluated_with_its_own_splits_and_no_reference():
    from simu_core.evaluation import builtin_companions, default_reference

    assert builtin_companions("builtin:smollm2/forget") == {
        "forget": "builtin:smollm2/forget", "retain": "builtin:smollm2/retain",
        "neighbour": "builtin:smollm2/neighbour", "general": "builtin:smollm2/general",
        "other_capitals": "builtin:smollm2/other_capitals",
    }  # fmt: skip
    tuning = builtin_companions("builtin:smollm2/other_capitals")
    assert tuning["forget"] == "builtin:smollm2/other_capitals"  # the tuning split is the forget set there
    assert set(tuning) == {"forget", "retain", "neighbour", "general"}  # and Asia's capitals are not looked at
    assert default_reference("builtin:smollm2", "builtin:smollm2/forget") is None
