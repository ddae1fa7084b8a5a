"""Run folders: one per unlearning run, written atomically, listed, loaded back, deleted.

Layout of `runs/<time>-<method>-<short hash>/`:
    config.json        {"unlearn": UnlearnConfig, "base": {spec, source, prompt format, fingerprint}, ...}
    status.json        {"status": ok | failed | cancelled, "stop_reason", "error", "summary"}
    history.jsonl      one `unlearn.StepRecord` per line
    mask.safetensors   the neuron mask used (simu / random_mask only)
    delta.safetensors  the new values of ONLY the changed parameters: whole tensors as `full:<name>`,
                       neuron slices as `slice:<name>` + `index:<name>` (axis in the metadata)
Other steps may add files (e.g. metrics.json) with `write_json_atomic`.

A folder is written under a hidden temporary name and renamed when complete, so a folder with a
visible name is always whole; a run that failed or was cancelled is marked so in status.json (a
failed run has no delta). `load_run` rebuilds the unlearned model from the base model + delta and
checks the base is still the one the run started from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import UnlearnConfig, simu_home, to_dict
from simu_core.errors import SimuError
from simu_core.models import LoadedModel, load_model

DELTA_FORMAT = "simu-delta/1"
FILES = ("config.json", "status.json", "history.jsonl", "mask.safetensors", "delta.safetensors")


def default_runs_dir() -> Path:
    """$SIMU_HOME/runs."""
    return simu_home() / "runs"


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to `path` via a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over names, shapes and a strided float32 sample (<= 4096 values) of every parameter.

    Cheap for any model size and independent of the device, so a rebuilt or different base model is
    detected when a run is loaded back.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _run_name(config: UnlearnConfig) -> str:
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{digest}"


def _base_info(base: LoadedModel) -> dict:
    return {
        "spec": base.spec,
        "source": str(Path(base.source).resolve()) if Path(base.source).exists() else base.source,
        "prompt_template": base.fmt.template,
        "separator": base.fmt.separator,
        "fingerprint": model_fingerprint(base.model),
        "dtype": "float32",
    }


def _save_delta(changes, path: Path) -> None:
    from safetensors.torch import save_file

    tensors, dims = {}, {}
    for change in changes:
        if change.index is None:
            tensors[f"full:{change.name}"] = change.values.contiguous()
        else:
            tensors[f"slice:{change.name}"] = change.values.contiguous()
            tensors[f"index:{change.name}"] = change.index.to(torch.long).clone()
            dims[change.name] = change.dim
    save_file(tensors, str(path), metadata={"format": DELTA_FORMAT, "dims": json.dumps(dims)})


def _write_folder(runs_dir: Path, name: str, write) -> Path:
    """Create `runs_dir/.tmp-name`, let `write(folder)` fill it, then rename it to a fresh visible name."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir / f".tmp-{name}-{os.getpid()}-{threading.get_ident()}"
    tmp.mkdir()
    try:
        write(tmp)
        final, n = runs_dir / name, 1
        while final.exists():
            n += 1
            final = runs_dir / f"{name}-{n}"
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_run(result, runs_dir: str | Path | None = None) -> Path:
    """Write an `unlearn.UnlearnResult` as a run folder; returns its path."""
    runs_dir = Path(runs_dir or default_runs_dir())

    def write(folder: Path) -> None:
        config = {
            "unlearn": to_dict(result.config),
            "base": _base_info(result.base),
            "mask": result.mask.summary() if result.mask is not None else None,
            "device": result.device,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json_atomic(folder / "config.json", config)
        with open(folder / "history.jsonl", "w", encoding="utf-8") as f:
            for record in result.history:
                f.write(json.dumps(record.to_dict()) + "\n")
        if result.mask is not None:
            result.mask.save(folder / "mask.safetensors")
        if result.status != "failed":
            _save_delta(result.changes, folder / "delta.safetensors")
        status = {"status": result.status, "stop_reason": result.stop_reason, "error": result.error,
                  "summary": result.summary()}  # fmt: skip
        write_json_atomic(folder / "status.json", status)

    return _write_folder(runs_dir, _run_name(result.config), write)


def save_failed_run(config: UnlearnConfig, error: str, runs_dir: str | Path | None = None) -> Path:
    """A run folder marked failed with `error` (for runs that crashed before producing a result)."""

    def write(folder: Path) -> None:
        created = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(folder / "config.json", {"unlearn": to_dict(config), "base": None, "created": created})
        (folder / "history.jsonl").write_text("", encoding="utf-8")
        write_json_atomic(folder / "status.json", {"status": "failed", "stop_reason": "error", "error": error,
                                                   "summary": {"method": config.method}})  # fmt: skip

    return _write_folder(Path(runs_dir or default_runs_dir()), _run_name(config), write)


def run_unlearning(
    config: UnlearnConfig,
    runs_dir: str | Path | None = None,
    *,
    base: LoadedModel | None = None,
    forget: qa.QADataset | None = None,
    retain: qa.QADataset | None = None,
    mask=None,
    root: str | Path | None = None,
    callback=None,
    cancel: threading.Event | None = None,
    curve_sets: dict[str, qa.QADataset] | None = None,
):
    """Load what `config` names (unless given), unlearn, and save the run folder (`curve_sets`: the
    extra sets of the trade-off curve, see `unlearn.unlearn`).

    Returns (UnlearnResult, run folder); under several processes only the main one (rank 0) writes the
    folder, the others return None for it. Bad settings raise SimuError before anything is written; an
    unexpected crash during the run leaves a folder marked failed and re-raises.
    """
    from simu_core import distributed
    from simu_core.unlearn import unlearn

    group = distributed.current(config.device)  # several processes: each loads onto its own device
    base = base or load_model(config.model, device=str(group.device) if group.world > 1 else config.device, root=root)
    forget = forget or qa.load_data(config.forget, root=root)
    if retain is None and config.retain:
        retain = qa.load_data(config.retain, root=root)
    try:
        result = unlearn(
            base, forget, retain, config, mask=mask, callback=callback, cancel=cancel, curve_sets=curve_sets
        )
    except SimuError:
        raise
    except Exception as err:
        if group.is_main:
            save_failed_run(config, f"{type(err).__name__}: {err}", runs_dir)
        raise
    if not group.is_main:  # only the main process writes the run folder
        return result, None
    return result, save_run(result, runs_dir)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run as the runs page lists it (read from config.json and status.json)."""

    path: Path
    name: str
    method: str
    status: str
    stop_reason: str | None
    error: str | None
    created: str
    model: str
    forget: str
    retain: str | None
    steps_done: int
    seconds: float | None
    forget_loss: float | None
    retain_loss: float | None
    forget_em: float | None
    mask_neurons: int | None
    trainable_params: int | None
    has_delta: bool
    has_metrics: bool


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SimuError(f"cannot read '{path}' ({err}). The run folder is damaged; delete it.") from err


def read_run(path: str | Path) -> RunRecord:
    """The `RunRecord` of one run folder."""
    path = Path(path)
    if not (path / "status.json").is_file() or not (path / "config.json").is_file():
        raise SimuError(f"'{path}' is not a run folder (no config.json/status.json). Pick a folder under runs/.")
    config, status = _read_json(path / "config.json"), _read_json(path / "status.json")
    unlearn, summary = config.get("unlearn", {}), status.get("summary", {})
    return RunRecord(
        path=path,
        name=path.name,
        method=unlearn.get("method", "?"),
        status=status.get("status", "failed"),
        stop_reason=status.get("stop_reason"),
        error=status.get("error"),
        created=config.get("created", ""),
        model=unlearn.get("model", "?"),
        forget=unlearn.get("forget", "?"),
        retain=unlearn.get("retain"),
        steps_done=summary.get("steps_done", 0),
        seconds=summary.get("seconds"),
        forget_loss=summary.get("forget_loss"),
        retain_loss=summary.get("retain_loss"),
        forget_em=summary.get("forget_em"),
        mask_neurons=summary.get("mask_neurons"),
        trainable_params=summary.get("trainable_params"),
        has_delta=(path / "delta.safetensors").is_file(),
        has_metrics=(path / "metrics.json").is_file(),
    )


def list_runs(runs_dir: str | Path | None = None) -> list[RunRecord]:
    """All complete run folders under `runs_dir`, newest first (temporary/damaged folders skipped)."""
    runs_dir = Path(runs_dir or default_runs_dir())
    if not runs_dir.is_dir():
        return []
    records = []
    for folder in runs_dir.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            try:
                records.append(read_run(folder))
            except SimuError:
                continue
    return sorted(records, key=lambda r: (r.created, r.name), reverse=True)


def read_history(path: str | Path) -> list[dict]:
    """The per-step records of a run (dicts with the `StepRecord` fields)."""
    lines = (Path(path) / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_config(path: str | Path) -> UnlearnConfig:
    """The `UnlearnConfig` a run was made with."""
    return UnlearnConfig.from_json(_read_json(Path(path) / "config.json")["unlearn"])


def delete_run(path: str | Path) -> None:
    """Delete one run folder (refuses folders that are not runs)."""
    read_run(path)  # raises unless it is a run folder
    shutil.rmtree(path)


def apply_delta(model: nn.Module, path: str | Path) -> int:
    """Write a delta file's values into `model` in place; returns the number of entries written."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != DELTA_FORMAT:
            raise SimuError(f"'{path}' is not a SIMU delta file (format {meta.get('format')}). Re-run the unlearning.")
        dims = json.loads(meta.get("dims", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    written = 0
    with torch.no_grad():
        for key, values in tensors.items():
            kind, name = key.split(":", 1)
            if kind == "index":
                continue
            try:
                param = model.get_parameter(name)
            except AttributeError as err:
                raise SimuError(
                    f"the delta changes '{name}', which this model does not have: wrong base model."
                ) from err
            values = values.to(param.device, param.dtype)
            if kind == "full":
                param.copy_(values)
            else:
                param.index_copy_(dims[name], tensors[f"index:{name}"].to(param.device), values)
            written += values.numel()
    return written


def load_run(path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """The unlearned model of a run: its base model (float32) with the run's delta applied."""
    path = Path(path)
    record = read_run(path)
    if not record.has_delta:
        raise SimuError(f"run '{record.name}' has no weights ({record.status}: {record.error}). Pick a finished run.")
    base = _read_json(path / "config.json")["base"]
    source = base["source"] if Path(base["source"]).is_dir() else base["spec"]
    loaded = load_model(source, device=device, dtype=torch.float32, prompt_template=base["prompt_template"])
    if model_fingerprint(loaded.model) != base["fingerprint"]:
        raise SimuError(
            f"the base model '{base['spec']}' has changed since run '{record.name}' was made (rebuilt?), so its "
            "delta no longer applies. Re-run the unlearning on the current model."
        )
    apply_delta(loaded.model, path / "delta.safetensors")
    fmt = qa.PromptFormat(base["prompt_template"], base.get("separator", " "))
    return LoadedModel(loaded.model, loaded.tokenizer, fmt, f"run:{record.name}", str(path))
