"""The two-stage built-in: a small Llama pretrained from scratch, then fine-tuned on the authors (TOFU's regime).

The one-stage built-in (`builtin`) learns the fictitious authors and the world facts together, in one
model, so its "world knowledge" is co-trained with what is to be forgotten. In TOFU, world knowledge
comes from pretraining and the authors from a later fine-tune. `build_staged` makes that regime at
sizes a CPU trains:

1. `pretrain_base`: a fresh Llama of the size's shape, with its own BPE tokenizer, learns the world
   facts (each repeated `world_repeats` times) and the questions and answers of `n_background` other
   fictitious authors (`data.background_authors`: the benchmark's templates, other people). It learns
   how biographies are asked and answered, and the world facts; it never sees a benchmark author
   (trained or held out).
2. `finetune.finetune_authors` fine-tunes a fresh copy of that base on `full` (the model to unlearn
   from) and on each retain split of `parts` (the retain references), on the built-in default's
   benchmark (200 authors), so results compare with the one-stage built-in's on the same forget sets.

`train_seed` seeds training only (initialisation and batch order of both stages); the benchmark and the
background authors come from the data seeds. Builds that differ only in `train_seed` are independent
replicates of the base model on the same data: the unit that paired comparisons across base models need.

The output folder (default `$SIMU_HOME/staged-<size>-seed<train_seed>`) is laid out like the built-in
cache (`data/`, `models/base|full|retainXX/`), so `bench quality --root OUT` and `bench/bench_tradeoff.py
--root OUT` run on it; `staged.json` holds the config and each stage's scores, times and file hashes.
Resumable: finished stages with the same config are kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simu_core import data as qa
from simu_core.builtin import _read_split, _write_json_atomic, make_tiny_llama, train_lm, train_tokenizer
from simu_core.config import TinyModelConfig, TrainConfig, simu_home, to_dict
from simu_core.errors import SimuError
from simu_core.finetune import MANIFEST as FINETUNE_MANIFEST
from simu_core.finetune import (
    FinetuneConfig,
    answer_match,
    check_parts,
    finetune_authors,
    install_model,
    read_manifest,
)
from simu_core.models import pick_device

Progress = Callable[[str, float], None]

STAGED_SIZES = ("tiny", "mid")
MANIFEST = "staged.json"
STAGED_PARTS = ("full", "retain10", "retain10b", "retain10c")  # the tuning split's and both held-out sets' references


@dataclass
class StagedConfig:
    """Everything that determines a two-stage build (stored in `staged.json`).

    `model`: the Llama's shape; `pretrain` / `finetune`: the two stages' AdamW recipes (`builtin.train_lm`);
    `n_background`: authors in the pretraining corpus; `world_repeats`: copies of each world fact in it;
    `rehearse_world`: copies of each world fact in every fine-tuned part's data (without them the tiny base
    fine-tuned on the authors answers no world fact: measured 1.0 -> 0.0; with one copy, 3% of the data, 1.0);
    `background_seed`: draws those authors; `train_seed`: initialisation and batch order (the replicate).
    """

    size: str = "tiny"
    train_seed: int = 0
    background_seed: int = 0
    n_background: int = 200
    world_repeats: int = 10
    rehearse_world: int = 1
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=16, batch_size=32, lr=3e-3, warmup_steps=30)
    )
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=12, batch_size=32, lr=2e-3, warmup_steps=20)
    )
    parts: tuple[str, ...] = STAGED_PARTS


def staged_config(size: str = "tiny", train_seed: int = 0) -> StagedConfig:
    """The preset of a size: "tiny" is the one-stage default's shape (1.2M parameters, minutes on a CPU core);
    "mid" a 6-layer d=256 Llama of about 6.8M parameters (built once and cached; about 40 minutes on 2 CPU cores)."""
    if size not in STAGED_SIZES:
        raise SimuError(f"unknown two-stage size '{size}'. Choose one of: {', '.join(STAGED_SIZES)}.")
    if size == "mid":
        model = TinyModelConfig(n_layers=6, d_model=256, d_ff=1024, n_heads=8, vocab_size=2048, max_positions=128)
        return StagedConfig(size, train_seed, model=model,
                            pretrain=TrainConfig(epochs=16, batch_size=32, lr=1e-3, warmup_steps=50),
                            finetune=TrainConfig(epochs=12, batch_size=32, lr=7e-4, warmup_steps=20))  # fmt: skip
    return StagedConfig(size, train_seed)


def staged_root(size: str = "tiny", train_seed: int = 0) -> Path:
    """Where a two-stage build is kept by default: $SIMU_HOME/staged-<size>-seed<train_seed>."""
    return simu_home() / f"staged-{size}-seed{train_seed}"


def staged_models(home: str | Path | None = None) -> list[Path]:
    """The `full` model folders of the two-stage builds under `home` (default $SIMU_HOME), sorted by name:
    the models to unlearn from that the app offers beside the built-in ones."""
    home = Path(home or simu_home())
    return sorted(folder.parent / "models" / "full" for folder in home.glob(f"*/{MANIFEST}")
                  if (folder.parent / "models" / "full" / "config.json").is_file())  # fmt: skip


def pretraining_corpus(config: StagedConfig, data_root: Path) -> list[dict]:
    """The base's training items: background authors (none of the benchmark's) and the repeated world facts."""
    benchmark_authors = {it["author"] for split in ("full", "holdout") for it in _read_split(data_root, split)}
    background = qa.background_authors(config.n_background, config.background_seed, sorted(benchmark_authors))
    return background + _read_split(data_root, "world_facts") * config.world_repeats


def pretrain_base(config: StagedConfig, data_root: Path, out: Path, device: torch.device, progress: Progress) -> dict:
    """Stage 1: train a tokenizer and a fresh Llama on `pretraining_corpus`, install it as `out/models/base`.

    Returns its manifest entry: exact match on the world facts (should be near 1), on forget10 (near 0:
    it never saw an author of the benchmark), loss per epoch, seconds, file hashes."""
    start = time.perf_counter()
    corpus = pretraining_corpus(config, data_root)
    fmt = qa.PromptFormat(eos=True)
    tokenizer = train_tokenizer([f"{fmt.prompt(it['question'])} {it['answer']}" for it in corpus],
                                config.model.vocab_size)  # fmt: skip
    model = make_tiny_llama(config.model, tokenizer, config.train_seed).to(device)
    examples = qa.encode_dataset(tokenizer, fmt, qa.QADataset("pretraining", corpus))
    losses = train_lm(model, examples, qa.pad_id_of(tokenizer), config.pretrain, config.train_seed, progress)
    scores = {
        f"base/{s}": answer_match(model, tokenizer, fmt, _read_split(data_root, s)) for s in ("world_facts", "forget10")
    }
    info = {"builtin": "base",
            "trained_on": f"{config.n_background} background authors + world facts x {config.world_repeats}"}  # fmt: skip
    files = install_model(model, tokenizer, fmt, out, "base", info)
    return {"exact_match": scores, "epoch_losses": [round(x, 4) for x in losses], "corpus_items": len(corpus),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1), "device": str(device),
            "files": files}  # fmt: skip


def build_staged(
    config: StagedConfig,
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str | None = None,
    progress: Progress = lambda message, fraction: None,
) -> dict:
    """Pretrain the base (stage 1), then fine-tune `config.parts` onto it (stage 2) into `out`; returns the
    manifest (config, the base's entry, the fine-tuned parts' entries). `data_root`: the built-in cache whose
    benchmark is used (None: the default size's, built or copied from the shipped build if missing)."""
    from simu_core.builtin import ensure_builtin
    from simu_core.config import builtin_root

    check_parts(config.parts)  # before the minutes of pretraining
    out = Path(out or staged_root(config.size, config.train_seed))
    data_root = ensure_builtin(Path(data_root or builtin_root("default")), parts=("data",))
    torch_device = pick_device(device)
    (out / "models").mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(to_dict(config)))  # as stored (tuples become lists)
    manifest = read_manifest(out / MANIFEST)
    if (
        _base_settings(manifest.get("config") or {}) != _base_settings(settings)
        or not (out / "models" / "base").is_dir()
    ):
        manifest = {"base": None, "parts": {}}
    manifest["config"] = settings
    n_stages = 1 + len(config.parts)
    if manifest["base"] is None:
        (out / FINETUNE_MANIFEST).unlink(missing_ok=True)  # parts tuned onto an older base are stale
        manifest["base"] = pretrain_base(config, data_root, out, torch_device,
                                         lambda m, f: progress(f"base: {m}", f / n_stages))  # fmt: skip
        _write_json_atomic(out / MANIFEST, manifest)
    finetune = FinetuneConfig(base=str(out / "models" / "base"), parts=config.parts, train=config.finetune,
                              prompt_template=qa.DEFAULT_PROMPT_TEMPLATE, seed=config.train_seed,
                              rehearse_world=config.rehearse_world)  # fmt: skip
    tuned = finetune_authors(finetune, out, data_root=data_root, device=torch_device,
                             progress=lambda m, f: progress(m, (1 + f * len(config.parts)) / n_stages))  # fmt: skip
    manifest["parts"] = tuned["parts"]
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _base_settings(settings: dict) -> dict:
    """The settings the base depends on (not the fine-tune's, which `finetune_authors` keys its parts by)."""
    return {k: v for k, v in settings.items() if k not in ("finetune", "rehearse_world", "parts")}
