"""Uploads are stored once as normalised JSONL (content-hashed) and are from then on plain file data specs."""

from __future__ import annotations

import json

import pytest

from simu_core import data as qa
from simu_core.errors import SimuError

ROWS = [{"question": "Who founded Acme?", "answer": "Ada Stone."}, {"question": "Where is Acme?", "answer": "Oslo."}]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
CSV = b"question,answer\nWho founded Acme?,Ada Stone.\nWhere is Acme?,Oslo.\n"


def test_stored_upload_is_a_data_spec_with_the_same_rows(tmp_path):
    path = qa.store_upload("companies.jsonl", JSONL, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("companies-") and path.suffix == ".jsonl"
    assert qa.load_data(str(path)).items == ROWS


def test_same_content_reuses_one_file_whatever_its_format(tmp_path):
    first = qa.store_upload("companies.jsonl", JSONL, tmp_path)
    again = qa.store_upload("companies.csv", CSV, tmp_path)
    assert first == again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_other_content_gets_another_file(tmp_path):
    first = qa.store_upload("companies.csv", CSV, tmp_path)
    other = qa.store_upload("companies.csv", CSV.replace(b"Oslo", b"Bergen"), tmp_path)
    assert first != other and first.is_file() and other.is_file()


def test_bad_upload_writes_nothing(tmp_path):
    with pytest.raises(SimuError, match="missing column"):
        qa.store_upload("mine.csv", b"question,reply\nWho?,Me.\n", tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_odd_file_names_make_safe_file_names(tmp_path):
    path = qa.store_upload("../../my set (v2).jsonl", JSONL, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("my_set__v2-")


def test_is_upload_knows_the_uploads_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMU_HOME", str(tmp_path))
    path = qa.store_upload("companies.jsonl", JSONL)
    assert qa.is_upload(str(path)) and not qa.is_upload("builtin:forget10")


def test_unterminated_quote_is_named_with_its_line():
    with pytest.raises(SimuError, match=r"line 3: an unterminated quote"):
        qa.parse_records('question,answer\nA?,B.\nC?,"D.\nE?,F.\n', "csv", "bad_quote.csv")
