"""The relearning attack: does a forgotten fact come back after a little fine-tuning on its neighbours?

Greedy exact match can hide what is left of a fact (an unlearning run may break the answer's wording
and keep the fact). The attack tests the knowledge instead (Lynch et al. 2024, "Eight methods to
evaluate robust unlearning"; Deeb & Roger 2024, "Do unlearning methods remove information from language
model weights?"): split the forget set in two seeded halves, fine-tune a *copy* of the unlearned model
for a few AdamW steps on the answers of one half (NLL on the answer tokens, whole half per step), and
measure how many facts of the *other* half the model gives again. Facts that return without ever being
trained on were hidden, not removed. The same attack on a model that never knew the facts sets the floor;
the report gives the held-out share before and after, so any model can be compared with any other at the
same budget.

"Gives the fact" is `answers.gives_answer` on the greedy answer (the metrics' exact match; for items with
accepted answers, the real-knowledge benchmark's rule: the answer begins with one of them).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.answers import gives_answer
from simu_core.config import to_dict
from simu_core.errors import SimuError
from simu_core.models import LoadedModel, greedy_answers

RELEARN_JSON = "relearn.json"  # the attack's result, in the run folder beside metrics.json
Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass
class RelearnConfig:
    """`steps` AdamW steps at `lr` on the trained half (a `share` of the forget items, drawn with `seed`);
    greedy answers of up to `max_new_tokens` tokens are judged."""

    steps: int = 10
    lr: float = 1e-5
    share: float = 0.5
    seed: int = 0
    max_new_tokens: int = 32


def split_halves(dataset: qa.QADataset, share: float, seed: int) -> tuple[qa.QADataset, qa.QADataset]:
    """(trained, held-out): a seeded partition of `dataset`, `share` of its items (at least 1) trained on."""
    if len(dataset) < 2:
        raise SimuError(f"the relearning attack needs at least 2 forget items (got {len(dataset)}).")
    if not 0 < share < 1:
        raise SimuError(f"the trained share must lie strictly between 0 and 1 (got {share}).")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    n_train = min(len(order) - 1, max(1, round(share * len(order))))
    trained, heldout = sorted(order[:n_train]), sorted(order[n_train:])
    return (qa.QADataset(f"{dataset.name}:relearn", [dataset.items[i] for i in trained]),
            qa.QADataset(f"{dataset.name}:heldout", [dataset.items[i] for i in heldout]))  # fmt: skip


def known_share(loaded: LoadedModel, model: nn.Module, dataset: qa.QADataset, max_new_tokens: int) -> float:
    """Share of `dataset`'s items whose greedy answer gives the fact (`answers.gives_answer`)."""
    said = greedy_answers(model, loaded.tokenizer, loaded.fmt, dataset.questions(), max_new_tokens=max_new_tokens)
    return sum(gives_answer(answer, item) for answer, item in zip(said, dataset.items, strict=True)) / len(dataset)


def _finetune(
    loaded: LoadedModel, model: nn.Module, trained: qa.QADataset, config: RelearnConfig, progress: Progress
) -> list[float]:
    """AdamW on the answer-token NLL of the whole `trained` half per step; returns the loss per step (nats)."""
    batch = qa.collate(qa.encode_dataset(loaded.tokenizer, loaded.fmt, trained), qa.pad_id_of(loaded.tokenizer))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    for param in model.parameters():  # loaded models come frozen; this is the attack's own copy
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(config.steps):
        progress(f"relearning step {step + 1}/{config.steps}", 0.2 + 0.6 * step / config.steps)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise SimuError("the relearning loss is not finite; lower the attack's lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def relearning_attack(
    loaded: LoadedModel,
    model: nn.Module,
    forget: qa.QADataset,
    config: RelearnConfig | None = None,
    progress: Progress = _no_progress,
) -> dict:
    """Fine-tune a copy of `model` on one half of `forget`, then measure both halves.

    `model` (with `loaded`'s tokenizer and format) is never modified. Returns the held-out half's known
    share before and after ("heldout_before", "heldout_after"), the trained half's ("trained_before",
    "trained_after"), their sizes, the loss per step and the settings.
    """
    config = config or RelearnConfig()
    trained, heldout = split_halves(forget, config.share, config.seed)
    torch.manual_seed(config.seed)
    attacked = copy.deepcopy(model)
    progress("answering before the attack", 0.0)
    before = {f"{name}_before": known_share(loaded, model, part, config.max_new_tokens)
              for name, part in (("trained", trained), ("heldout", heldout))}  # fmt: skip
    losses = _finetune(loaded, attacked, trained, config, progress)
    progress("answering after the attack", 0.8)
    after = {f"{name}_after": known_share(loaded, attacked, part, config.max_new_tokens)
             for name, part in (("trained", trained), ("heldout", heldout))}  # fmt: skip
    del attacked
    return {**before, **after, "n_trained": len(trained), "n_heldout": len(heldout), "losses": losses,
            "steps": config.steps, "lr": config.lr, "seed": config.seed}  # fmt: skip


def attack_run(
    run: str | Path, config: RelearnConfig | None = None, device: str | None = None, progress: Progress = _no_progress
) -> dict:
    """`relearning_attack` on a finished run's model and forget set; the result (with the settings and the
    forget spec) is also written to the run folder as relearn.json (atomically; the run's model is untouched)."""
    from simu_core.runs import load_run, read_config, write_json_atomic

    config = config or RelearnConfig()
    progress("loading the run's model", 0.0)
    forget = read_config(run).forget
    loaded = load_run(run, device=device)
    result = relearning_attack(loaded, loaded.model, qa.load_data(forget), config, progress)
    result = {**result, "forget": forget, "config": to_dict(config)}
    write_json_atomic(Path(run) / RELEARN_JSON, result)
    progress("done", 1.0)
    return result


def load_attack(run: str | Path) -> dict | None:
    """The relearning attack stored in a run folder, or None if it was never run there."""
    path = Path(run) / RELEARN_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
