"""Localisation check (before unlearning): does a neuron mask hold the forget set's facts?

The selected neurons' activations (inputs of the MLP output projections) are multiplied by `scale`
(0 = zeroed, 0.5 = dampened) at every position, and the mean NLL per token (nats) of the forget and
retain sets is measured before and after, on two token sets: every answer token (`answer`) and the
fact's value tokens only (`fact`, see `targets`; items without a value span count all their answer
tokens). The same is done for `n_random` seeded random masks with the same number of neurons in
every layer (`masks.random_mask_like`, seeds seed .. seed + n_random - 1). Reported per token set:

- `forget_rise`, `retain_rise`: loss after minus loss before (nats per token);
- `selectivity`: forget_rise / retain_rise (how much more the forget set suffers; inf/negative
  values mean the retain loss did not rise);
- z-scores of each against the random masks: (mask value - mean over random masks) / their standard
  deviation (n - 1 in the denominator). A mask that localises the forget set has a high forget z, a
  retain z near or below 0 and a high selectivity z.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from simu_core import data as qa
from simu_core import targets as tg
from simu_core.arch import neuron_layers
from simu_core.attribution import injected
from simu_core.errors import SimuError
from simu_core.masks import check_mask_fits, random_mask_like
from simu_core.neurons import NeuronMask

TOKEN_SETS = ("answer", "fact")
Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass
class _Set:
    """Batches of one data set: ids, attention, answer labels and fact labels (same padding)."""

    batches: list[dict[str, torch.Tensor]]
    notes: list[str]


def _batches(loaded, dataset: qa.QADataset, batch_size: int) -> _Set:
    tok, fmt = loaded.tokenizer, loaded.fmt
    answers = qa.encode_dataset(tok, fmt, dataset)
    prepared = tg.prepare(tok, fmt, dataset, "fact")
    facts = [row.enc for row in prepared.rows]
    pad, device = qa.pad_id_of(tok), next(loaded.model.parameters()).device
    out = []
    for start in range(0, len(answers), batch_size):
        a = qa.collate(answers[start : start + batch_size], pad)
        f = qa.collate(facts[start : start + batch_size], pad)
        out.append({**{k: v.to(device) for k, v in a.items()}, "fact_labels": f["labels"].to(device)})
    return _Set(out, [f"{dataset.name}: {note}" for note in prepared.notes])


def _losses(model: nn.Module, batches: _Set, mask: NeuronMask | None, scale: float) -> dict[str, float]:
    """Mean NLL per token on the answer and the fact tokens with the mask's neurons scaled by `scale`."""
    layers = neuron_layers(model)
    keep = None if mask is None else [1 - (1 - scale) * m.float() for m in mask.layers]

    def damp(index: int, x: torch.Tensor) -> torch.Tensor:
        return x if keep is None else x * keep[index].to(x.device, x.dtype)

    sums = dict.fromkeys(TOKEN_SETS, 0.0)
    counts = dict.fromkeys(TOKEN_SETS, 0)
    with torch.no_grad():
        for batch in batches.batches:
            with injected(layers, damp, batch["input_ids"].shape[1]):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            for name, labels in (("answer", batch["labels"]), ("fact", batch["fact_labels"])):
                targets = labels[:, 1:]
                scored = targets != -100
                sums[name] -= float(logp[scored].gather(-1, targets[scored].unsqueeze(-1)).sum())
                counts[name] += int(scored.sum())
    return {name: sums[name] / max(1, counts[name]) for name in TOKEN_SETS}


def _z(value: float, others: list[float]) -> float | None:
    finite = [o for o in others if math.isfinite(o)]
    if len(finite) < 2 or not math.isfinite(value):
        return None
    sd = statistics.stdev(finite)
    return (value - statistics.fmean(finite)) / sd if sd > 0 else None


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.copysign(math.inf, a)


@dataclass
class Localisation:
    """The check's result; rises in nats per token, per token set (see the module docstring)."""

    scale: float
    n_random: int
    seed: int
    neurons: int
    counts: list[int]
    base: dict[str, dict[str, float]]  # {"forget"|"retain": {"answer"|"fact": loss}}
    rises: dict[str, dict[str, float]]  # {"answer"|"fact": {"forget_rise", "retain_rise", "selectivity"}}
    random: dict[str, dict[str, list[float]]]  # the same three per random mask
    z: dict[str, dict[str, float | None]]  # z-score of each against the random masks
    n_forget: int = 0
    n_retain: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Plain-text summary, one line per token set."""
        out = []
        for name in TOKEN_SETS:
            r, z = self.rises[name], self.z[name]
            fz = {k: "n/a" if v is None else f"{v:+.1f}" for k, v in z.items()}
            out.append(
                f"{name} tokens: forget +{r['forget_rise']:.4f} (z {fz['forget_rise']}), retain "
                f"+{r['retain_rise']:.4f} (z {fz['retain_rise']}), selectivity {r['selectivity']:.2f} "
                f"(z {fz['selectivity']}) vs {self.n_random} random masks"
            )
        return out


def _rises(before: dict, after: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name in TOKEN_SETS:
        f = after["forget"][name] - before["forget"][name]
        r = after["retain"][name] - before["retain"][name]
        out[name] = {"forget_rise": f, "retain_rise": r, "selectivity": _ratio(f, r)}
    return out


def localise(
    loaded, mask: NeuronMask, forget: qa.QADataset, retain: qa.QADataset, n_random: int = 20, seed: int = 0,
    scale: float = 0.0, batch_size: int = 64, progress: Progress = _no_progress,
) -> Localisation:  # fmt: skip
    """Scale the mask's neurons by `scale` and compare the forget/retain loss rises with `n_random`
    random masks of the same per-layer sizes (see the module docstring). The model is not modified."""
    check_mask_fits(mask, loaded.model)
    if mask.total() == 0:
        raise SimuError("the mask selects no neuron, so there is nothing to check. Lower the threshold.")
    if n_random < 2:
        raise SimuError(f"n_random={n_random}: a z-score needs at least 2 random masks (20 is a good number).")
    if not 0.0 <= scale < 1.0:
        raise SimuError(f"scale {scale} must be in [0, 1): 0 zeroes the neurons, 0.5 halves them.")
    if not forget.items or not retain.items:
        raise SimuError("the localisation check needs a non-empty forget set and retain set.")
    sets = {"forget": _batches(loaded, forget, batch_size), "retain": _batches(loaded, retain, batch_size)}
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        before = {role: _losses(model, s, None, scale) for role, s in sets.items()}
        after = {role: _losses(model, s, mask, scale) for role, s in sets.items()}
        rises = _rises(before, after)
        random: dict[str, dict[str, list[float]]] = {n: {k: [] for k in rises[n]} for n in TOKEN_SETS}
        for i in range(n_random):
            other = random_mask_like(mask, seed + i)
            got = _rises(before, {role: _losses(model, s, other, scale) for role, s in sets.items()})
            for name in TOKEN_SETS:
                for key, value in got[name].items():
                    random[name][key].append(value)
            progress(f"random mask {i + 1}/{n_random}", (i + 1) / n_random)
    finally:
        model.train(was_training)
    z = {n: {k: _z(rises[n][k], random[n][k]) for k in rises[n]} for n in TOKEN_SETS}
    notes = sets["forget"].notes + sets["retain"].notes
    return Localisation(scale, n_random, seed, mask.total(), mask.counts(), before, rises, random, z,
                        len(forget), len(retain), notes)  # fmt: skip
