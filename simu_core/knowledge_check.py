"""Does the model know the forget set? Greedy answers and answer loss before any attribution or unlearning.

Unlearning a set the model never learned does nothing useful: attribution still ranks some neurons first
and the early stop is "met" at once, so a run looks fine while it removed nothing. `check_knowledge`
looks at (a seeded sample of) the forget set, and the retain set for comparison:

- exact match (EM): the fraction of greedy answers that match the gold answer (`answers.answer_matches`:
  the answer's first sentence(s), case, punctuation and articles aside);
- answer loss: the mean NLL of the gold answer tokens given the question, nats per answer token, averaged
  over items (teacher forcing, the prompt format of the model).

Verdict "knows" when the forget EM >= `EM_KNOWS` (0.2) or the forget answer loss <= the loss limit,
else "does not know". The loss limit is `LOSS_KNOWS` (1.5 nats/token) without a retain set; with one it is
the retain loss + `LOSS_MARGIN` (1.0 nat/token), kept within [`LOSS_KNOWS`, `LOSS_CAP`] = [1.5, 3.0], so a
model that answers its retain set at 0.4 nats/token and the forget set at 7.8 "does not know" it, and a
model that knows neither set is not told that it knows the forget set. (On the built-in default the
`full` model answers forget10 with EM near 1 and loss below 0.5; the `retain10` model, which never saw
those authors, has EM near 0 and a loss of several nats.)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from simu_core import data as qa
from simu_core.answers import answer_matches
from simu_core.errors import SimuError
from simu_core.losses import token_nll
from simu_core.models import LoadedModel, greedy_answers

EM_KNOWS = 0.2
LOSS_KNOWS = 1.5
LOSS_MARGIN = 1.0
LOSS_CAP = 3.0
DEFAULT_SAMPLE = 32
FILE_NAME = "knowledge_check.json"
KNOWS, UNKNOWN = "knows", "does not know"


@dataclass
class SetCheck:
    """The model on one data set: `n` of `n_total` items checked; `em` in [0, 1], `nll` nats per answer token."""

    dataset: str
    n: int
    n_total: int
    em: float
    nll: float
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    item_nll: list[float] = field(default_factory=list)


@dataclass
class KnowledgeCheck:
    """The verdict on the forget set (with the retain set for comparison) and a sentence saying why."""

    model: str
    forget: SetCheck
    retain: SetCheck | None
    verdict: str
    reason: str

    @property
    def knows(self) -> bool:
        return self.verdict == KNOWS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KnowledgeCheck:
        retain = SetCheck(**data["retain"]) if data.get("retain") else None
        return cls(data["model"], SetCheck(**data["forget"]), retain, data["verdict"], data["reason"])

    def save(self, folder: str | Path) -> Path:
        """Write `knowledge_check.json` into `folder` (e.g. a run folder) via a temporary file and a rename."""
        path = Path(folder) / FILE_NAME
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_check(folder: str | Path) -> KnowledgeCheck | None:
    """The check saved in `folder`, or None when there is none."""
    path = Path(folder) / FILE_NAME
    return KnowledgeCheck.from_dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def sample_items(dataset: qa.QADataset, sample: int, seed: int = 0) -> list[dict]:
    """At most `sample` items (all of them when `sample` <= 0), a seeded choice kept in the set's order."""
    if sample <= 0 or len(dataset) <= sample:
        return list(dataset.items)
    keep = sorted(random.Random(seed).sample(range(len(dataset)), sample))
    return [dataset.items[i] for i in keep]


@torch.no_grad()
def answer_nll(loaded: LoadedModel, items: list[dict], batch_size: int = 32) -> list[float]:
    """Mean NLL of each item's gold answer tokens given its question (nats per answer token), [len(items)]."""
    if not items:
        raise SimuError("no items to check. The data set needs at least one question/answer row.")
    model, pad = loaded.model, qa.pad_id_of(loaded.tokenizer)
    encoded = [qa.encode(loaded.tokenizer, loaded.fmt, it["question"], it["answer"]) for it in items]
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(loaded.device) for k, v in qa.collate(encoded[start : start + batch_size], pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        nll = token_nll(logits, targets)
        counts = (targets != -100).sum(dim=1).clamp(min=1)
        out += (nll.sum(dim=1) / counts).tolist()
    model.train(was_training)
    return out


def check_set(loaded: LoadedModel, dataset: qa.QADataset, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> SetCheck:
    """Greedy answers, EM and answer loss of the model on a seeded sample of `dataset`."""
    items = sample_items(dataset, sample, seed)
    questions, answers = [it["question"] for it in items], [it["answer"] for it in items]
    predictions = greedy_answers(loaded.model, loaded.tokenizer, loaded.fmt, questions)
    losses = answer_nll(loaded, items)
    em = sum(answer_matches(p, a) for p, a in zip(predictions, answers, strict=True)) / len(items)
    return SetCheck(dataset.name, len(items), len(dataset), em, sum(losses) / len(losses), questions, answers,
                    predictions, losses)  # fmt: skip


def loss_limit(retain: SetCheck | None) -> float:
    """The forget answer loss (nats/token) at or below which the model is taken to know the forget set."""
    if retain is None:
        return LOSS_KNOWS
    return min(LOSS_CAP, max(LOSS_KNOWS, retain.nll + LOSS_MARGIN))


def verdict(forget: SetCheck, retain: SetCheck | None) -> tuple[str, str]:
    """("knows" | "does not know", the reason in one sentence) by the rule in the module docstring."""
    limit = loss_limit(retain)
    seen = f"forget exact match {forget.em:.2f}, answer loss {forget.nll:.2f} nats/token"
    if retain is not None:
        seen += f" (retain: {retain.em:.2f}, {retain.nll:.2f})"
    if forget.em >= EM_KNOWS or forget.nll <= limit:
        return KNOWS, f"The model knows the forget set: {seen}."
    return UNKNOWN, (
        f"The model does not seem to know the forget set: {seen}; it would need exact match >= {EM_KNOWS:.2f} "
        f"or loss <= {limit:.2f}. There is little to unlearn: attribution will still rank some neurons first and "
        "an early stop on exact match is met at once. Check that the model was trained on this set."
    )


def check_knowledge(
    loaded: LoadedModel,
    forget: qa.QADataset,
    retain: qa.QADataset | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
) -> KnowledgeCheck:
    """The knowledge check of `loaded` on (a seeded sample of `sample` items of) the forget and retain sets."""
    f = check_set(loaded, forget, sample, seed)
    r = check_set(loaded, retain, sample, seed) if retain is not None and len(retain) else None
    v, reason = verdict(f, r)
    return KnowledgeCheck(loaded.spec, f, r, v, reason)
