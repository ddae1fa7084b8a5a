"""Attribution targets: which log-likelihood a neuron score explains, and the rows that compute it.

A target turns a data set into *rows*: tokenised sequences, each with a weight, the index of the
item it belongs to, the prompt positions of the item's subject, and (for the counterfactual
baseline) the ids of a matched input. The objective of a batch is `sum_rows weight * sum_{t scored}
log p(y_t | y_<t)`; `attribution` integrates its gradient.

Targets (registry `TARGETS`):
- `answer` (default, SIMU's objective): every answer token of the item's answer, weight 1. The
  rows are exactly `data.encode_dataset`'s, so scores are unchanged from before targets existed.
- `fact`: only the tokens of the fact's *value* ("Hescorstad" in "Saan Dodru was born in
  Hescorstad."), so the name-copying and template tokens every author shares do not count. The value
  span comes from (in order) an uploaded `fact_span` column (the value as text, or [start, end]
  character offsets into the answer), a `value` column, or the built-in generator's answer template
  for the item's `fact` and `author` (`data.fact_templates`). When none applies, the whole answer is
  scored and a note says so.
- `contrastive`: `log p(true answer) - mean_k log p(perturbed answer k)`: one row of weight +1 and K
  rows of weight -1/K per item, so what the true and the wrong answers share cancels. Built-in
  perturbed answers are written in the paraphrase's wording; the wrong value is read back from them
  and put into the *answer's* template, so true and wrong rows differ only in the value tokens (the
  shared prefix then cancels exactly). Other perturbed answers are used as given (with a note).

Positions and baselines need the item's *subject* (`subject` column, else `author`, else `entity`), which must occur
in the question: `subject` positions are its prompt tokens; the `counterfactual` baseline runs the
prompt of a matched item (the same question with another subject of the data set, chosen in sorted
order after this one among those whose prompt has the same token count) followed by this row's answer
tokens, so positions line up one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from simu_core import data as qa
from simu_core.errors import SimuError

TARGETS = ("answer", "fact", "contrastive")
BASELINES = ("zero", "counterfactual")
FORGET_TOKENS = ("answer", "fact")


@dataclass
class Row:
    """One scored sequence: `enc` (with `scored` for fact tokens), its item, weight, subject positions
    (prompt token indices) and counterfactual ids (same length as `enc.ids`, or None)."""

    enc: qa.Encoded
    item: int
    weight: float = 1.0
    subject: tuple[int, ...] = ()
    counterfactual: list[int] | None = None


@dataclass
class Prepared:
    """The rows of a data set under a target, the item count and notes for the user."""

    rows: list[Row]
    n_items: int
    target: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Spans: the fact's value in the answer, the subject in the prompt
# --------------------------------------------------------------------------------------------


def _template_value(template: str, name: str, text: str) -> tuple[int, int] | None:
    """Character span of `{v}` when `text` is `template` with `{name}` = name, else None."""
    before, _, after = template.partition("{v}")
    pattern = re.escape(before.format(name=name)) + "(.+)" + re.escape(after.format(name=name))
    found = re.fullmatch(pattern, text, flags=re.DOTALL)
    return found.span(1) if found else None


def value_span(item: dict) -> tuple[int, int] | None:
    """[start, end) characters of the fact's value in `item["answer"]`, or None when unknown."""
    answer = item["answer"]
    marked = item.get("fact_span", item.get("value"))
    if isinstance(marked, (list, tuple)) and len(marked) == 2 and all(isinstance(x, int) for x in marked):
        start, end = marked
        if not 0 <= start < end <= len(answer):
            raise SimuError(f"fact_span {list(marked)} is outside the answer '{answer}'. Give [start, end) offsets.")
        return start, end
    if isinstance(marked, str) and marked.strip():
        start = answer.rfind(marked)
        if start < 0:
            raise SimuError(f"the marked fact '{marked}' does not occur in the answer '{answer}'. Fix the column.")
        return start, start + len(marked)
    templates = qa.fact_templates(str(item.get("fact", "")))
    if templates is None or not item.get("author"):
        return None
    return _template_value(templates[1], item["author"], answer)


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise SimuError("token spans need a fast (Rust) tokenizer with offsets; this one has none.")
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def _covering(offsets: list[tuple[int, int]], start: int, end: int) -> list[bool]:
    return [a < end and b > start for a, b in offsets]


def fact_encode(tokenizer, fmt: qa.PromptFormat, question: str, answer: str, span: tuple[int, int]) -> qa.Encoded:
    """`data.encode` with `scored` set on the answer tokens that overlap the value's characters."""
    enc = qa.encode(tokenizer, fmt, question, answer)
    shift = len(fmt.separator)
    covered = _covering(_offsets(tokenizer, fmt.separator + answer), span[0] + shift, span[1] + shift)
    n_answer = len(enc.ids) - enc.n_prompt
    scored = tuple((covered + [False] * n_answer)[:n_answer])  # EOS (past the text) is not scored
    if not any(scored):
        raise SimuError(f"the fact span of '{answer}' covers no token. Check its fact_span / value column.")
    return qa.Encoded(enc.ids, enc.n_prompt, scored)


def subject_of(item: dict) -> str | None:
    """The item's subject (`subject` column, else `author`, else `entity` as in the real-knowledge
    benchmark), when it occurs in the question."""
    subject = item.get("subject") or item.get("author") or item.get("entity")
    return subject if isinstance(subject, str) and subject and subject in item["question"] else None


def subject_positions(tokenizer, fmt: qa.PromptFormat, question: str, subject: str, n_prompt: int) -> tuple[int, ...]:
    """Indices of the prompt tokens (BOS counted) that overlap the subject's first occurrence."""
    prompt = fmt.prompt(question)
    offsets = _offsets(tokenizer, prompt)
    bos = n_prompt - len(offsets)
    start = prompt.find(subject)
    return tuple(bos + i for i, hit in enumerate(_covering(offsets, start, start + len(subject))) if hit)


# --------------------------------------------------------------------------------------------
# Rows per target
# --------------------------------------------------------------------------------------------


def _perturbed(item: dict) -> tuple[list[str], bool]:
    """Wrong answers in the answer's wording when the templates allow (True), else as given (False)."""
    wrong = item.get("perturbed_answers") or []
    templates = qa.fact_templates(str(item.get("fact", "")))
    if templates and item.get("author"):
        values = [_template_value(templates[2], item["author"], w) for w in wrong]
        if all(values):
            words = [w[a:b] for w, (a, b) in zip(wrong, values, strict=True)]  # type: ignore[misc]
            return [templates[1].format(name=item["author"], v=v) for v in words], True
    return list(wrong), False


def _item_rows(tokenizer, fmt, item: dict, index: int, target: str, notes: set[str]) -> list[Row]:
    question = item["question"]
    if target == "answer":
        return [Row(qa.encode(tokenizer, fmt, question, item["answer"]), index)]
    if target == "fact":
        span = value_span(item)
        if span is None:
            notes.add("fact: no value span for some items (no fact_span/value column, not a built-in template); "
                      "their whole answer is scored")  # fmt: skip
            return [Row(qa.encode(tokenizer, fmt, question, item["answer"]), index)]
        return [Row(fact_encode(tokenizer, fmt, question, item["answer"], span), index)]
    wrong, reworded = _perturbed(item)
    if not wrong:
        raise SimuError(
            f"target 'contrastive' needs perturbed (wrong) answers; item {index} ('{question}') has none. "
            "Add a perturbed_answers column or pick target 'answer' or 'fact'."
        )
    if not reworded:
        notes.add("contrastive: some perturbed answers are worded differently from the answer; used as given")
    rows = [Row(qa.encode(tokenizer, fmt, question, item["answer"]), index)]
    rows += [Row(qa.encode(tokenizer, fmt, question, w), index, -1.0 / len(wrong)) for w in wrong]
    return rows


def _need_subject(item: dict, index: int, why: str) -> str:
    subject = subject_of(item)
    if subject is None:
        raise SimuError(
            f"{why} needs each item's subject in its question; item {index} ('{item['question']}') has none. "
            "Add a 'subject' (or 'author') column whose text occurs in the question."
        )
    return subject


def _counterfactual(tokenizer, fmt, item: dict, subject: str, others: list[str], row: Row) -> list[int] | None:
    """Ids of the matched prompt (another subject, same token count) + this row's answer tokens."""
    n = row.enc.n_prompt
    start = others.index(subject) if subject in others else 0
    for other in others[start + 1 :] + others[:start]:
        if other == subject:
            continue
        swapped = qa.encode(tokenizer, fmt, item["question"].replace(subject, other), "x")
        if swapped.n_prompt == n:
            return swapped.ids[:n] + row.enc.ids[n:]
    return None


def prepare(
    tokenizer, fmt: qa.PromptFormat, dataset: qa.QADataset, target: str = "answer", subject: bool = False,
    baseline: str = "zero",
) -> Prepared:  # fmt: skip
    """The rows of `dataset` under `target`; `subject=True` fills subject positions, baseline
    `counterfactual` the matched ids (both need a subject per item, see the module docstring)."""
    check(target, baseline)
    if not dataset.items:
        raise SimuError(f"dataset '{dataset.name}' is empty; it needs at least one question/answer row.")
    notes: set[str] = set()
    rows: list[Row] = []
    others = sorted({s for s in (subject_of(it) for it in dataset.items) if s})
    for index, item in enumerate(dataset.items):
        item_rows = _item_rows(tokenizer, fmt, item, index, target, notes)
        if subject or baseline == "counterfactual":
            name = _need_subject(item, index, "subject positions" if subject else "the counterfactual baseline")
            positions = subject_positions(tokenizer, fmt, item["question"], name, item_rows[0].enc.n_prompt)
            for row in item_rows:
                row.subject = positions
                if baseline == "counterfactual":
                    row.counterfactual = _counterfactual(tokenizer, fmt, item, name, others, row)
                    if row.counterfactual is None:
                        raise SimuError(
                            f"no matched item for the counterfactual baseline of '{item['question']}': no other "
                            "subject in the data set gives a prompt of the same token count. Use baseline 'zero' "
                            "or add items with other subjects."
                        )
        rows += item_rows
    return Prepared(rows, len(dataset.items), target, sorted(notes))


def check(target: str, baseline: str = "zero") -> None:
    """SimuError naming an unknown target or baseline."""
    if target not in TARGETS:
        raise SimuError(f"unknown attribution target '{target}'. Choose one of: {', '.join(TARGETS)}.")
    if baseline not in BASELINES:
        raise SimuError(f"unknown attribution baseline '{baseline}'. Choose one of: {', '.join(BASELINES)}.")


def forget_examples(tokenizer, fmt: qa.PromptFormat, dataset: qa.QADataset, tokens: str = "answer") -> list[qa.Encoded]:
    """Stage-2 forget examples: every answer token (`answer`) or only the fact's value tokens (`fact`;
    items without a value span keep their whole answer)."""
    if tokens not in FORGET_TOKENS:
        raise SimuError(f"unknown forget_tokens '{tokens}'. Choose one of: {', '.join(FORGET_TOKENS)}.")
    if tokens == "answer":
        return qa.encode_dataset(tokenizer, fmt, dataset)
    return [row.enc for row in prepare(tokenizer, fmt, dataset, "fact").rows]
