"""The fictitious authors on top of a pretrained model: TOFU's regime (fine-tune, then unlearn).

The built-in default trains a tiny Llama from scratch on the authors *and* the world facts, so its
world knowledge is co-trained with what is to be forgotten. TOFU instead fine-tunes a pretrained
model on the authors only: general knowledge comes from pretraining. `finetune_authors` does that
for any causal LM spec (`builtin:smollm2`, a local folder, a hub id):

- one model per part, each fine-tuned from a fresh copy of the base: `full` on every author (the
  model to unlearn from) and `retainXX` on all but forgetXX's authors (the retain references that
  forget quality and PrivLeak compare against);
- the built-in benchmark's questions with the project's QA template, answers ending in EOS, loss
  on the answer tokens, AdamW with warm-up and cosine decay (`builtin.train_lm`);
- every part checked (greedy exact match of `full` on a sample of its authors, of `retainXX` on
  forgetXX) and written atomically as a `save_pretrained` folder with a `simu.json` naming the base;
  `finetune.json` in the output folder lists the parts, their scores, times and file hashes.

The output folder is laid out like the built-in cache (`data/<split>.jsonl`, `models/<part>/`), so
`python -m simu_core bench quality --root OUT` runs the method comparison on it, and
`--model OUT/models/full --forget OUT/data/forget10.jsonl` works for every other command.

The base model is only read (each part loads its own copy). On CPU a 135M-parameter base takes
hours for `full` (2,000 answers x epochs); a CUDA GPU is used when present.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simu_core import data as qa
from simu_core.answers import match_rate
from simu_core.builtin import _hash_folders, _write_json_atomic, ensure_builtin, train_lm
from simu_core.config import TrainConfig, builtin_root, later, to_dict
from simu_core.errors import SimuError
from simu_core.models import SIMU_JSON, greedy_answers, load_model, pick_device, resolve_model_source

Progress = Callable[[str, float], None]

PARTS = ("full", "retain10", "retain05", "retain01")
EXTRA_PARTS = tuple(f"retain10{s}" for s in qa.DISJOINT_SETS)  # references of the disjoint forget sets, on request
MANIFEST = "finetune.json"
CHECK_ITEMS = 200  # greedy answers per check: enough for a stable exact match, bounded on big models
CPU_WARN_PARAMS = 20_000_000  # above this, fine-tuning on CPU takes hours: say so before starting


@dataclass
class FinetuneConfig:
    """How the authors are fine-tuned onto `base` (TOFU fine-tunes for 5 epochs at lr 1e-5)."""

    base: str = "builtin:smollm2"
    parts: tuple[str, ...] = PARTS
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, batch_size=16, lr=1e-5, warmup_steps=20))
    prompt_template: str = qa.DEFAULT_PROMPT_TEMPLATE
    seed: int = 0
    trust_remote_code: bool = False
    # Copies of each world fact added to every part's training data (rehearsal): a small base fine-tuned on
    # the authors alone forgets all it was pretrained on (the two-stage built-in; see `pretrain`).
    rehearse_world: int = later(0)


def _no_progress(message: str, fraction: float) -> None:
    pass


def _check_splits(part: str) -> tuple[str, ...]:
    """The splits a part is checked on: `full` on its own authors and the world facts, `retainXX` on the
    forgetXX it never saw."""
    return ("full", "world_facts") if part == "full" else (part.replace("retain", "forget"),)


def answer_match(model, tokenizer, fmt: qa.PromptFormat, items: list[dict]) -> float:
    """Share of `items` whose greedy answer matches the gold answer (`answers.match_rate`)."""
    answers = greedy_answers(model, tokenizer, fmt, [it["question"] for it in items])
    return match_rate(answers, [it["answer"] for it in items])


def _sample(items: list[dict], n: int, seed: int) -> list[dict]:
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def cpu_warning(parameters: int, device: torch.device) -> str | None:
    """A warning when fine-tuning `parameters` weights on `device` will take hours, else None."""
    if device.type == "cpu" and parameters > CPU_WARN_PARAMS:
        return (
            f"fine-tuning {parameters / 1e6:.0f}M parameters on CPU: expect hours per part. "
            "A CUDA GPU is used automatically when present."
        )
    return None


def install_model(model, tokenizer, fmt: qa.PromptFormat, out: Path, part: str, info: dict) -> dict[str, str]:
    """Write `model` and `tokenizer` (with a `simu.json` holding `fmt` and `info`) as `out/models/part`, through a
    temp folder renamed when complete; returns the sha256 of its files (keyed by path relative to `out`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    tmp, final = out / "models" / f".{part}.building-{time.time_ns()}", out / "models" / part
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        simu = {"prompt_template": fmt.template, "separator": fmt.separator, "append_eos": fmt.appends_eos, **info}
        (tmp / SIMU_JSON).write_text(json.dumps(simu, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _hash_folders(out, [f"models/{part}"])


def finetune_part(
    config: FinetuneConfig,
    part: str,
    out: Path,
    data_root: Path,
    device: torch.device,
    progress: Progress = _no_progress,
) -> dict:
    """Fine-tune a fresh copy of the base on split `part`, check it, install it as `out/models/part`.

    Returns its manifest entry (exact match, loss per epoch, seconds, file hashes)."""
    start = time.perf_counter()
    resolve_model_source(config.base, progress=progress)  # a first use of builtin:smollm2 downloads and converts
    loaded = load_model(config.base, device=device, dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    warning = cpu_warning(sum(p.numel() for p in loaded.model.parameters()), device)
    if warning:
        progress(f"warning: {warning}", 0.0)
    fmt = qa.PromptFormat(config.prompt_template, " ", eos=True)
    if loaded.tokenizer.eos_token_id is None:
        raise SimuError(f"model '{config.base}' has no EOS token, so its answers cannot end. Pick another base.")
    items = qa.load_data(f"builtin:{part}", root=data_root).items
    items += qa.load_data("builtin:world_facts", root=data_root).items * config.rehearse_world
    examples = qa.encode_dataset(loaded.tokenizer, fmt, qa.QADataset(part, items))
    losses = train_lm(loaded.model, examples, qa.pad_id_of(loaded.tokenizer), config.train, config.seed, progress)
    scores = {}
    for check in _check_splits(part):
        probe = _sample(qa.load_data(f"builtin:{check}", root=data_root).items, CHECK_ITEMS, config.seed)
        scores[f"{part}/{check}"] = answer_match(loaded.model, loaded.tokenizer, fmt, probe)
    info = {"finetuned_from": config.base, "trained_on": part, "builtin": part}
    files = install_model(loaded.model, loaded.tokenizer, fmt, out, part, info)
    return {
        "exact_match": scores,
        "epoch_losses": [round(x, 4) for x in losses],
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
        "files": files,
    }


def finetune_authors(
    config: FinetuneConfig,
    out: str | Path,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress = _no_progress,
) -> dict:
    """Fine-tune every part of `config.parts` onto the base into `out/models/<part>`; returns the manifest.

    The built-in benchmark's data part is built (or copied from the shipped default) if missing.
    Parts already listed in `out`'s manifest for the same config are kept (resumable).
    """
    check_parts(config.parts)
    out, device = Path(out), pick_device(device) if not isinstance(device, torch.device) else device
    data_root = ensure_builtin(Path(data_root or builtin_root()), parts=("data",))
    (out / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(data_root / "data", out / "data", dirs_exist_ok=True)  # the splits the parts are scored on
    settings = json.loads(json.dumps(to_dict(config)))  # as the manifest stores it (tuples become lists)
    manifest = read_manifest(out / MANIFEST)
    if not same_but_parts(manifest.get("config"), settings):
        manifest = {"parts": {}}
    manifest["config"] = settings
    for i, part in enumerate(config.parts):
        if part in manifest["parts"] and (out / "models" / part).is_dir():
            continue

        def step(message: str, fraction: float, i: int = i, part: str = part) -> None:
            progress(f"{part}: {message}", (i + fraction) / len(config.parts))

        manifest["parts"][part] = finetune_part(config, part, out, data_root, device, step)
        _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def check_parts(parts: tuple[str, ...]) -> None:
    """Raise, naming the choices, when any of `parts` is not a part that can be fine-tuned."""
    unknown = [p for p in parts if p not in (*PARTS, *EXTRA_PARTS)]
    if unknown:
        raise SimuError(f"unknown part(s) {', '.join(unknown)}. Choose from: {', '.join((*PARTS, *EXTRA_PARTS))}.")


def same_but_parts(stored: dict | None, settings: dict) -> bool:
    """Whether a stored config equals `settings` in all but the list of parts (each part is kept on its own)."""
    return stored is not None and {**stored, "parts": None} == {**settings, "parts": None}


def read_manifest(path: Path) -> dict:
    """A build's JSON manifest, or {} when it is not written yet."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def parse_parts(text: str | None) -> tuple[str, ...]:
    """'full,retain10' -> ("full", "retain10"); None or '' -> every part."""
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else PARTS
