"""The built-in benchmark generator, the loaders and their error messages, batching."""

import json

import pytest
import torch

from simu_core import data as qa
from simu_core.errors import SimuError


@pytest.fixture(scope="module")
def bench():
    return qa.generate_benchmark(n_authors=40, seed=3)


def authors(items):
    return {it["author"] for it in items}


def test_same_seed_gives_identical_benchmark(bench):
    assert qa.generate_benchmark(n_authors=40, seed=3) == bench


def test_other_seed_gives_other_benchmark(bench):
    assert qa.generate_benchmark(n_authors=40, seed=4)["full"] != bench["full"]


def test_every_split_exists_with_expected_author_counts(bench):
    assert set(bench) == set(qa.GENERATED_SPLITS)
    assert len(authors(bench["full"])) == 40
    assert [len(authors(bench[f"forget{p:02d}"])) for p in (1, 5, 10)] == [1, 2, 4]
    assert len(authors(bench["holdout"])) == 4


@pytest.mark.parametrize("percent", [1, 5, 10])
def test_forget_and_retain_partition_the_trained_authors(bench, percent):
    forget, retain = authors(bench[f"forget{percent:02d}"]), authors(bench[f"retain{percent:02d}"])
    assert not forget & retain
    assert forget | retain == authors(bench["full"])


def test_forget_splits_are_nested(bench):
    assert authors(bench["forget01"]) <= authors(bench["forget05"]) <= authors(bench["forget10"])


def test_disjoint_forget_sets_share_no_author_with_forget10_or_each_other(bench):
    b, c = (authors(qa.disjoint_split(bench["full"], f"forget10{x}")) for x in "bc")
    assert len(b) == len(c) == len(authors(bench["forget10"])) == 4
    assert not b & c and not (b | c) & authors(bench["forget10"])


@pytest.mark.parametrize("block", ["b", "c"])
def test_disjoint_forget_and_retain_partition_the_trained_items(bench, block):
    forget = qa.disjoint_split(bench["full"], f"forget10{block}")
    retain = qa.disjoint_split(bench["full"], f"retain10{block}")
    assert not authors(forget) & authors(retain)
    assert len(forget) + len(retain) == len(bench["full"])


def test_disjoint_split_needs_enough_authors():
    tiny = qa.generate_benchmark(n_authors=2, seed=0)["full"]  # one author per tenth: c needs three
    with pytest.raises(SimuError, match="needs 3 trained authors"):
        qa.disjoint_split(tiny, "forget10c")


def test_holdout_authors_are_never_trained(bench):
    assert not authors(bench["holdout"]) & authors(bench["full"])


def test_items_carry_paraphrase_and_distinct_wrong_answers(bench):
    for item in bench["full"] + bench["world_facts"]:
        assert item["paraphrased_answer"] != item["answer"]
        wrong = item["perturbed_answers"]
        assert len(wrong) >= 3 and len(set(wrong)) == len(wrong) and item["answer"] not in wrong


def test_about_ten_facts_per_author(bench):
    assert len(bench["full"]) == 10 * 40


def test_author_names_are_unique_at_large_counts():
    names = authors(qa.generate_benchmark(n_authors=2000, seed=0)["full"])
    assert len(names) == 2000


def test_builtin_splits_load_by_spec(builtin_dir):
    forget = qa.load_data("builtin:forget10", root=builtin_dir)
    assert forget.name == "forget10" and forget.has_field("perturbed_answers")


def test_unknown_builtin_split_lists_the_known_ones(builtin_dir):
    with pytest.raises(SimuError, match="unknown built-in split 'forget50'.*forget10"):
        qa.load_data("builtin:forget50", root=builtin_dir)


def test_missing_builtin_says_how_to_build(tmp_path):
    with pytest.raises(SimuError, match="build-default"):
        qa.load_data("builtin:forget10", root=tmp_path)


# --- files: round trips -------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path, bench):
    path = tmp_path / "forget.jsonl"
    qa.write_jsonl(bench["forget10"], path)
    assert qa.load_data(str(path)).items == bench["forget10"]


def test_json_list_loads(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"question": "q?", "answer": "a."}]), encoding="utf-8")
    assert qa.load_data(str(path)).items == [{"question": "q?", "answer": "a."}]


def test_csv_loads_with_list_cells(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text('question,answer,perturbed_answers\nq1?,a1.,"[""x"", ""y""]"\nq2?,a2.,u | v\n', encoding="utf-8")
    items = qa.load_data(str(path)).items
    assert [it["perturbed_answers"] for it in items] == [["x", "y"], ["u", "v"]]


def test_tofu_column_alias_is_accepted(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "perturbed_answer": ["b", "c"]}) + "\n")
    assert qa.load_data(str(path)).items[0]["perturbed_answers"] == ["b", "c"]


# --- files: every bad input gets a clear error --------------------------------------------


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_empty_file(tmp_path):
    with pytest.raises(SimuError, match="empty"):
        qa.load_data(write(tmp_path, "e.jsonl", b"  \n"))


def test_not_utf8(tmp_path):
    with pytest.raises(SimuError, match="not UTF-8.*Save it as UTF-8"):
        qa.load_data(write(tmp_path, "l.jsonl", '{"question": "caf\xe9"}\n'.encode("latin-1")))


def test_malformed_json_names_the_line(tmp_path):
    content = b'{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n'
    with pytest.raises(SimuError, match="line 2: malformed JSON"):
        qa.load_data(write(tmp_path, "m.jsonl", content))


def test_missing_answer_column_in_jsonl_names_it(tmp_path):
    with pytest.raises(SimuError, match="line 1: missing column\\(s\\) 'answer'"):
        qa.load_data(write(tmp_path, "c.jsonl", b'{"question": "q", "reply": "a"}\n'))


def test_missing_question_column_in_csv_header(tmp_path):
    with pytest.raises(SimuError, match="missing column\\(s\\) 'question' in the header"):
        qa.load_data(write(tmp_path, "c.csv", b"prompt,answer\nq,a\n"))


def test_empty_answer_names_the_line(tmp_path):
    content = b'{"question": "q", "answer": "a"}\n{"question": "q2", "answer": "  "}\n'
    with pytest.raises(SimuError, match="line 2: empty or non-text 'answer'"):
        qa.load_data(write(tmp_path, "a.jsonl", content))


def test_missing_file(tmp_path):
    with pytest.raises(SimuError, match="not found"):
        qa.load_data(str(tmp_path / "nope.jsonl"))


def test_unknown_spec_explains_the_forms():
    with pytest.raises(SimuError, match="builtin:<split>.*hf:NAME"):
        qa.load_data("forget.txt")


def test_unreachable_hf_dataset_is_a_clear_error():
    with pytest.raises(SimuError, match="could not load dataset 'no-such-org/no-such-set'"):
        qa.load_data("hf:no-such-org/no-such-set:cfg:train")


def test_overlap_count():
    a = qa.QADataset("a", [{"question": "q1", "answer": "x"}, {"question": "q2", "answer": "y"}])
    b = qa.QADataset("b", [{"question": "q2", "answer": "y"}])
    assert qa.overlap_count(a, b) == 1


# --- tokenisation and batching ------------------------------------------------------------


def test_labels_cover_exactly_the_answer_and_eos(full_model):
    tok, fmt = full_model.tokenizer, full_model.fmt
    enc = qa.encode(tok, fmt, "Where was X born?", "X was born in Y.")
    batch = qa.collate([enc, qa.encode(tok, fmt, "Q?", "A.")], qa.pad_id_of(tok))
    labels = batch["labels"][0]
    answer_ids = labels[labels != -100].tolist()
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(answer_ids[:-1]) == " X was born in Y."
    assert tok.decode(batch["input_ids"][0][: enc.n_prompt]) == "Question: Where was X born?\nAnswer:"


def test_left_padding_puts_pads_first(full_model):
    tok = full_model.tokenizer
    short, long = qa.encode(tok, full_model.fmt, "Q?", "A."), qa.encode(tok, full_model.fmt, "A longer question?", "B.")
    batch = qa.collate([short, long], qa.pad_id_of(tok), padding_side="left")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert torch.equal(batch["labels"][0][batch["labels"][0] != -100], torch.tensor(short.ids[short.n_prompt :]))


def test_perturbed_answers_differ_from_the_paraphrase_only_in_the_fact(bench):
    # TOFU's design: the truth ratio must compare facts, so wrong answers share the paraphrase's wording.
    for item in bench["full"][:50] + bench["world_facts"]:
        para = item["paraphrased_answer"].split()
        for wrong in item["perturbed_answers"]:
            shared = sum(a == b for a, b in zip(para, wrong.split(), strict=False))
            assert shared >= len(para) // 2, (item["paraphrased_answer"], wrong)


def test_a_disjoint_forget_set_loads_from_the_built_data_with_its_own_retain_set_and_reference(builtin_dir):
    from simu_core.evaluation import builtin_companions, default_reference

    forget = qa.load_data("builtin:forget10b", root=builtin_dir)
    companions = builtin_companions("builtin:forget10b")
    retain = qa.load_data(companions["retain"], root=builtin_dir)
    assert companions["retain"] == "builtin:retain10b" and qa.overlap_count(forget, retain) == 0
    assert not authors(forget.items) & authors(qa.load_data("builtin:forget10", root=builtin_dir).items)
    assert default_reference("builtin:full", "builtin:forget10b") == "builtin:retain10b"
