"""Run folders: atomic layout, sparse delta, exact reload, listing, deleting, failure marks, CLI."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors import safe_open

from simu_core import data as qa
from simu_core.arch import neuron_layers
from simu_core.errors import SimuError
from simu_core.methods import preset_config
from simu_core.models import load_model
from simu_core.neurons import NeuronMask
from simu_core.runs import delete_run, list_runs, load_run, read_config, read_history, run_unlearning, save_run
from simu_core.unlearn import unlearn


@pytest.fixture(scope="module")
def sets(builtin_dir):
    forget = qa.load_data("builtin:forget10", root=builtin_dir)
    retain = qa.load_data("builtin:retain10", root=builtin_dir)
    return forget, qa.QADataset("retain", retain.items[:48])


def _mask(model):
    return NeuronMask([torch.arange(layer.d_ff) % 10 == 1 for layer in neuron_layers(model)], "manual")


def _config(method="simu", **kw):
    """The method's preset, small and without early stop unless `kw` says otherwise."""
    config = preset_config(method, **{"steps": 4, "batch_size": 8, "retain_batch_size": 8, "probe_every": 0, **kw})
    config.stop_forget_em = kw.get("stop_forget_em")  # preset_config ignores None overrides
    return config


@pytest.fixture(scope="module")
def simu_run(full_model, sets, tmp_path_factory):
    result = unlearn(full_model, *sets, _config(attention=True, mlp_parts="down_up"), mask=_mask(full_model.model))
    return result, save_run(result, tmp_path_factory.mktemp("runs"))


def _assert_same_model(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name].detach(), pb[name].detach()), name


def test_load_run_rebuilds_exactly_the_model_the_loop_ended_with(simu_run):
    result, path = simu_run
    loaded = load_run(path, device="cpu")
    _assert_same_model(loaded.model, result.model.model)
    assert loaded.fmt == result.model.fmt


def test_load_run_is_exact_for_an_all_weights_method_too(full_model, sets, tmp_path):
    result = unlearn(full_model, *sets, _config("so_graddiff"))
    _assert_same_model(load_run(save_run(result, tmp_path), device="cpu").model, result.model.model)


def test_simu_delta_holds_only_the_trained_slices(simu_run, full_model):
    result, path = simu_run
    with safe_open(str(path / "delta.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys if not k.startswith("index:"))
        sliced = sum(f.get_tensor(k).numel() for k in keys if k.startswith("slice:"))
    assert stored == result.trainable_params < result.total_params
    assert sliced == result.mask.total() * full_model.model.config.hidden_size * 3  # down column + gate/up rows
    full_keys = {k.split(":", 1)[1] for k in keys if k.startswith("full:")}
    assert full_keys and all("self_attn" in k for k in full_keys)  # only attention is stored whole


def test_run_folder_records_config_history_mask_and_status(simu_run):
    result, path = simu_run
    assert path.name.split("-")[2] == "simu"  # <date>-<time>-<method>-<hash>
    assert read_config(path) == result.config
    assert [r["step"] for r in read_history(path)] == [1, 2, 3, 4]
    assert NeuronMask.load(path / "mask.safetensors").counts() == result.mask.counts()
    status = json.loads((path / "status.json").read_text())
    assert status["status"] == "ok" and status["error"] is None
    base = json.loads((path / "config.json").read_text())["base"]
    assert base["spec"] == "builtin:full" and len(base["fingerprint"]) == 64


def test_list_and_delete_runs(full_model, sets, tmp_path):
    first = save_run(unlearn(full_model, *sets, _config("ga", steps=1)), tmp_path)
    second = save_run(unlearn(full_model, *sets, _config("npo", steps=1)), tmp_path)
    (tmp_path / ".tmp-half-written").mkdir()  # an unfinished folder is never listed
    (tmp_path / "not-a-run").mkdir()
    records = list_runs(tmp_path)
    assert {r.path for r in records} == {first, second}
    record = next(r for r in records if r.path == second)
    assert (record.method, record.status, record.steps_done, record.has_delta) == ("npo", "ok", 1, True)
    delete_run(first)
    assert [r.path for r in list_runs(tmp_path)] == [second]
    with pytest.raises(SimuError, match="not a run folder"):
        delete_run(tmp_path / "not-a-run")


def test_cancelled_and_failed_runs_are_marked(full_model, sets, tmp_path):
    cancel = threading.Event()
    cancel.set()
    cancelled = save_run(unlearn(full_model, *sets, _config("fo_graddiff"), cancel=cancel), tmp_path)
    failed = save_run(unlearn(full_model, *sets, _config("ga", lr=1e30, max_grad_norm=None)), tmp_path)
    by_path = {r.path: r for r in list_runs(tmp_path)}
    assert by_path[cancelled].status == "cancelled" and "cancelled" in by_path[cancelled].error
    assert by_path[failed].status == "failed" and "NaN" in by_path[failed].error
    assert not (failed / "delta.safetensors").exists()
    with pytest.raises(SimuError, match="no weights"):
        load_run(failed)


def test_a_crash_inside_the_run_leaves_a_folder_marked_failed(full_model, sets, tmp_path):
    def broken(record):
        raise RuntimeError("callback exploded")

    with pytest.raises(RuntimeError):
        run_unlearning(_config("fo_graddiff"), tmp_path, base=full_model, forget=sets[0], retain=sets[1],
                       callback=broken)  # fmt: skip
    (record,) = list_runs(tmp_path)
    assert record.status == "failed" and "callback exploded" in record.error


def test_a_changed_base_model_is_detected_on_load(full_model, sets, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(full_model.source, folder)
    base = load_model(str(folder), device="cpu")
    path = save_run(unlearn(base, *sets, _config("fo_graddiff", steps=1)), tmp_path / "runs")
    with torch.no_grad():
        base.model.model.norm.weight.add_(1.0)  # the base folder is rebuilt with other weights
    base.model.save_pretrained(folder)
    with pytest.raises(SimuError, match="has changed"):
        load_run(path, device="cpu")


def test_cli_unlearn_prints_a_json_summary_with_the_run_folder(builtin_dir, tmp_path, capsys):
    from simu_core.cli import main

    code = main([
        "unlearn", "--model", str(builtin_dir / "models" / "full"), "--forget", str(builtin_dir / "data" / "forget10.jsonl"),
        "--retain", str(builtin_dir / "data" / "retain10.jsonl"), "--method", "fo_graddiff", "--steps", "2",
        "--batch-size", "8", "--retain-batch-size", "8", "--runs-dir", str(tmp_path), "--json",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["steps_done"] <= 2
    assert [r.path for r in list_runs(tmp_path)] == [tmp_path / summary["run_dir"].rsplit("/", 1)[1]]


def test_cli_refuses_bad_settings_with_exit_code_2(builtin_dir, tmp_path, capsys):
    from simu_core.cli import main

    code = main(["unlearn", "--model", str(builtin_dir / "models" / "full"), "--forget",
                 str(builtin_dir / "data" / "forget10.jsonl"), "--retain", "none", "--method", "ga", "--lr", "0",
                 "--runs-dir", str(tmp_path)])  # fmt: skip
    assert code == 2 and "learning rate" in capsys.readouterr().err
    assert list_runs(tmp_path) == []
