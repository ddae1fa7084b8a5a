"""A real-knowledge benchmark for pretrained models: public facts as completion prompts, kept where
the model knows them (RWKU-style: the model's own knowledge is the forget target; no fine-tuning).

Families (data in `simu_core.knowledge_facts`): capitals (with the country's continent), currencies
and official languages of countries, landmarks (-> city or country), authors of famous works and
chemical symbols. Each fact is a completion prompt ("The capital of France is"), two paraphrased
prompts ("The capital city of France is", "France's capital city is"), the answer (" Paris") with
other accepted spellings, and 4 perturbed answers: wrong values of the same family (other capitals,
of the same continent where possible), so that the truth ratio works. Answers are bare values, so
`paraphrased_answer` is the answer itself and the truth ratio compares P(" Berlin") with P(" Paris").

Splits for the teaching scenario "forget the capitals of Asia, keep Europe's":
    forget          capitals of Asian countries
    retain          capitals of European countries
    neighbour       other facts about the forget entities (currencies, languages and landmarks of
                    those Asian countries; RWKU's neighbour probes)
    other_capitals  capitals of the other continents (does forgetting spread to the whole family?)
    general         every other fact (authors, symbols, currencies/languages/landmarks elsewhere)

A benchmark is built for one model: its greedy answer to each main prompt (stopping at the first
newline) is checked with `answers.answer_begins_with` against the accepted answers, and only known
facts are kept. The build is deterministic and cached under $SIMU_HOME/knowledge/<name>/ with a
manifest (fact-table hash, model fingerprint, counts, per-family known rates), written last.
Data specs: `builtin:smollm2/<split>` (see `data.load_data`). Build it with
`python -m simu_core.knowledge build` (or `ensure_knowledge`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from simu_core import knowledge_facts as kf
from simu_core.answers import gives_answer, normalise
from simu_core.data import KNOWLEDGE_BENCHMARKS, KNOWLEDGE_SPLITS, knowledge_root, write_jsonl
from simu_core.errors import SimuError

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])
AnswerFn = Callable[[list[str]], list[str]]  # prompts -> generated continuations

SPLITS = KNOWLEDGE_SPLITS
FORGET_CONTINENT = "Asia"
RETAIN_CONTINENT = "Europe"
N_PERTURBED = 4
KNOWLEDGE_FORMAT = 1  # bump when the item format or the selection rule changes
MANIFEST = "manifest.json"
MAX_NEW_TOKENS = 12  # longest accepted answers are ~6 tokens, plus a leading article
# Pretrained models with a knowledge benchmark as a data spec: builtin:<name>/<split>.
KNOWLEDGE_MODELS = KNOWLEDGE_BENCHMARKS


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass(frozen=True)
class Fact:
    """One fact: `question` is a completion prompt, `answers[0]` the answer, the rest accepted too."""

    family: str
    entity: str  # the country (capitals, currencies, languages, landmarks), author or element
    question: str
    paraphrased_questions: tuple[str, ...]
    answers: tuple[str, ...]
    continent: str | None = None  # of the entity's country, where there is one
    kind: str = ""  # landmarks: "city" or "country" (what the answer names)


# --------------------------------------------------------------------------------------------
# Facts and splits
# --------------------------------------------------------------------------------------------


def _rows(table: str, n_fields: int) -> list[list[str]]:
    rows = [[f.strip() for f in line.split("|")] for line in table.strip().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != n_fields]
    if bad:
        raise SimuError(f"knowledge_facts: row {bad[0]} has {len(bad[0])} fields, expected {n_fields}.")
    return rows


def _fill(template: str, subject: str) -> str:
    """`template` with {x} the subject, {X} it capitalised, {Xs} its capitalised possessive."""
    cap = subject[:1].upper() + subject[1:]
    possessive = cap + ("'" if cap.endswith("s") else "'s")
    return template.format(x=subject, X=cap, Xs=possessive)


def _fact(family: str, template_key: str, subject: str, entity: str, answers: str, **extra) -> Fact:
    prompt, paraphrases = kf.TEMPLATES[template_key]
    return Fact(
        family=family,
        entity=entity,
        question=_fill(prompt, subject),
        paraphrased_questions=tuple(_fill(p, subject) for p in paraphrases),
        answers=tuple(a.strip() for a in answers.split("/")),
        **extra,
    )


def all_facts() -> list[Fact]:
    """Every fact of the tables, in a fixed order (capitals, currencies, languages, landmarks, authors, symbols)."""
    countries = _rows(kf.COUNTRIES, 6)
    continent_of = {c[0]: c[2] for c in countries}
    facts: list[Fact] = []
    for column, family in ((3, "capital"), (4, "currency"), (5, "language")):
        for row in countries:
            if row[column] != "-":
                facts.append(_fact(family, family, row[1], row[0], row[column], continent=row[2]))
    for subject, country, kind, answer in _rows(kf.LANDMARKS, 4):
        facts.append(
            _fact(
                "landmark", f"landmark_{kind}", subject, country, answer, continent=continent_of.get(country), kind=kind
            )
        )
    for work, author in _rows(kf.AUTHORS, 2):
        facts.append(_fact("author", "author", work, author.split("/")[0], author))
    for element, symbol in _rows(kf.SYMBOLS, 2):
        facts.append(_fact("symbol", "symbol", element, element, symbol))
    return facts


def forget_entities(facts: Sequence[Fact]) -> set[str]:
    """The countries whose capitals are forgotten (capitals of `FORGET_CONTINENT`)."""
    return {f.entity for f in facts if f.family == "capital" and f.continent == FORGET_CONTINENT}


def split_of(fact: Fact, forgotten: set[str]) -> str:
    """The split of a fact (see the module docstring)."""
    if fact.family == "capital":
        if fact.continent == FORGET_CONTINENT:
            return "forget"
        return "retain" if fact.continent == RETAIN_CONTINENT else "other_capitals"
    return "neighbour" if fact.entity in forgotten else "general"


def _pools(facts: Sequence[Fact]) -> dict[tuple[str, str], dict[str, str]]:
    """{(family, kind): {normalised answer: answer}}: the values each family can be perturbed with."""
    pools: dict[tuple[str, str], dict[str, str]] = {}
    for fact in facts:
        pools.setdefault((fact.family, fact.kind), {}).setdefault(normalise(fact.answers[0]), fact.answers[0])
    return pools


def perturbed_answers(
    fact: Fact, pool: dict[str, str], continents: dict[str, str | None], seed: int = 0, k: int = N_PERTURBED
) -> list[str]:
    """`k` wrong answers for `fact` from `pool` ({normalised: value}), drawn deterministically from `seed`.

    None of them matches an accepted answer of `fact` after normalisation; when `continents` maps
    values to continents (capitals), values of the fact's own continent come first.
    """
    accepted = {normalise(a) for a in fact.answers}
    values = sorted(v for key, v in pool.items() if key not in accepted)
    rng = random.Random(f"{seed}|{fact.family}|{fact.question}")
    near = [v for v in values if fact.continent is not None and continents.get(v) == fact.continent]
    chosen = rng.sample(near, min(k, len(near)))
    rest = [v for v in values if v not in chosen]
    chosen += rng.sample(rest, min(k - len(chosen), len(rest)))
    if len(chosen) < k:
        raise SimuError(f"too few values in family '{fact.family}' for {k} perturbed answers; add facts to it.")
    return chosen


def fact_items(facts: Sequence[Fact] | None = None, seed: int = 0) -> list[dict]:
    """Every fact as a benchmark item (the project's item format plus family, entity, split...)."""
    facts = list(facts if facts is not None else all_facts())
    forgotten = forget_entities(facts)
    pools = _pools(facts)
    capital_continents = {f.answers[0]: f.continent for f in facts if f.family == "capital"}
    items = []
    for fact in facts:
        continents = capital_continents if fact.family == "capital" else {}
        items.append(
            {
                "question": fact.question,
                "answer": fact.answers[0],
                "paraphrased_answer": fact.answers[0],
                "perturbed_answers": perturbed_answers(fact, pools[fact.family, fact.kind], continents, seed),
                "accepted_answers": list(fact.answers),
                "paraphrased_question": fact.paraphrased_questions[0],
                "paraphrased_questions": list(fact.paraphrased_questions),
                "family": fact.family,
                "entity": fact.entity,
                "continent": fact.continent,
                "split": split_of(fact, forgotten),
            }
        )
    return items


def is_known(prediction: str, item: dict) -> bool:
    """True when the first answer of `prediction` begins with one of the item's accepted answers (the
    answer itself when none are listed): `answers.gives_answer`, which the metrics and the early stop use."""
    return gives_answer(prediction, {**item, "accepted_answers": item.get("accepted_answers") or [item["answer"]]})


def facts_hash(seed: int = 0) -> str:
    """sha256 of every item (and the selection rule's settings): the benchmark's content key."""
    payload = json.dumps([fact_items(seed=seed), KNOWLEDGE_FORMAT, MAX_NEW_TOKENS], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Selection (pure: the model enters only through `answer_fn`)
# --------------------------------------------------------------------------------------------


def select_known(
    items: Sequence[dict],
    answer_fn: AnswerFn,
    check_paraphrases: bool = False,
) -> tuple[dict[str, list[dict]], dict]:
    """Keep the items whose main prompt `answer_fn` answers right; group them by split.

    `answer_fn(prompts)` returns one generated continuation per prompt. Every item gets
    `model_answer` and `known`; with `check_paraphrases`, also `paraphrases_known` (one bool per
    paraphrased prompt, for the kept items). Returns ({split: kept items} for every split in SPLITS,
    plus "all": every item with its verdict) and stats (per family: facts, known, known_rate; per
    split: kept count; per family paraphrase known rate when checked).
    """
    items = [dict(it) for it in items]
    predictions = answer_fn([it["question"] for it in items])
    if len(predictions) != len(items):
        raise SimuError(f"the answer function gave {len(predictions)} answers for {len(items)} prompts.")
    for item, prediction in zip(items, predictions, strict=True):
        item["model_answer"] = prediction
        item["known"] = is_known(prediction, item)
    kept = [it for it in items if it["known"]]
    if check_paraphrases and kept:
        prompts = [q for it in kept for q in it["paraphrased_questions"]]
        answers = iter(answer_fn(prompts))
        for it in kept:
            it["paraphrases_known"] = [is_known(next(answers), it) for _ in it["paraphrased_questions"]]
    splits = {name: [it for it in kept if it["split"] == name] for name in SPLITS}
    families: dict[str, dict] = {}
    for it in items:
        fam = families.setdefault(it["family"], {"facts": 0, "known": 0})
        fam["facts"] += 1
        fam["known"] += it["known"]
        if "paraphrases_known" in it:
            fam["paraphrases_checked"] = fam.get("paraphrases_checked", 0) + len(it["paraphrases_known"])
            fam["paraphrases_known"] = fam.get("paraphrases_known", 0) + sum(it["paraphrases_known"])
    for fam in families.values():
        fam["known_rate"] = round(fam["known"] / fam["facts"], 4)
        if fam.get("paraphrases_checked"):
            fam["paraphrase_known_rate"] = round(fam["paraphrases_known"] / fam["paraphrases_checked"], 4)
    stats = {
        "families": families,
        "splits": {name: len(v) for name, v in splits.items()},
        "facts": len(items),
        "known": len(kept),
    }
    return {**splits, "all": items}, stats


# --------------------------------------------------------------------------------------------
# Building and caching for a model
# --------------------------------------------------------------------------------------------


def model_fingerprint(source: str) -> str:
    """What identifies a model's weights: its GGUF source hash for converted folders, else the
    sha256 of its config and safetensors files (hub ids: the id itself)."""
    from simu_core.pretrained import read_conversion

    folder = Path(source)
    if not folder.is_dir():
        return f"hub:{source}"
    conversion = read_conversion(folder)
    if conversion and conversion.get("source_sha256"):
        return f"gguf:{conversion['source_sha256']}"
    h = hashlib.sha256()
    for path in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        if path.is_file():
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return f"files:{h.hexdigest()}"


def expected_fingerprint(name: str) -> str | None:
    """The fingerprint a built-in knowledge benchmark must have been built with (None: any)."""
    if name == "smollm2":
        from simu_core.pretrained import SMOLLM2

        return f"gguf:{SMOLLM2.sha256}"
    return None


def read_manifest(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def knowledge_status(folder: str | Path, fingerprint: str | None = None, seed: int = 0) -> str:
    """'ok', 'missing' or 'stale: <why>' for a cached knowledge benchmark."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return "missing"
    if manifest.get("format") != KNOWLEDGE_FORMAT:
        return f"stale: built by format {manifest.get('format')}, this version uses {KNOWLEDGE_FORMAT}"
    if manifest.get("facts_sha256") != facts_hash(seed):
        return "stale: the fact tables changed since the build"
    if fingerprint is not None and manifest.get("model_fingerprint") != fingerprint:
        return "stale: built for other model weights"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"stale: {name} missing or changed"
    return "ok"


def build_knowledge(
    model: str = "builtin:smollm2",
    out: str | Path | None = None,
    progress: Progress = _no_progress,
    device: str | None = None,
    check_paraphrases: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Build the knowledge benchmark for `model` into `out` and return its manifest.

    `out` defaults to `knowledge_root(<name>)` for the models of `KNOWLEDGE_MODELS`; other specs
    need `out`. Written in a temporary sibling folder, renamed when complete (manifest last).
    """
    from simu_core.models import greedy_answers, load_model

    name = next((n for n, spec in KNOWLEDGE_MODELS.items() if spec == model), None)
    if out is None and name is None:
        raise SimuError(f"no default folder for the knowledge benchmark of '{model}'; pass an output folder.")
    out = Path(out or knowledge_root(name))
    start = time.perf_counter()

    def loading(message: str, fraction: float) -> None:
        progress(f"model: {message}", 0.1 * fraction)

    progress(f"loading {model}", 0.0)
    loaded = load_model(model, device=device or "cpu", progress=loading)
    items = fact_items(seed=seed)
    n_prompts = len(items) * (3 if check_paraphrases else 1)
    progress(f"asking {model} {len(items)} fact prompts" + (" (+ paraphrases)" if check_paraphrases else ""), 0.1)

    asked = [0]

    def answer(prompts: list[str]) -> list[str]:
        answers: list[str] = []
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            answers += greedy_answers(
                loaded.model, loaded.tokenizer, loaded.fmt, chunk, MAX_NEW_TOKENS, batch_size, stop_at_newline=True
            )
            asked[0] += len(chunk)
            progress(f"asked {asked[0]}/{n_prompts} prompts", 0.1 + 0.85 * asked[0] / n_prompts)
        return answers

    splits, stats = select_known(items, answer, check_paraphrases)
    info = {
        "model": model,
        "model_source": loaded.source,
        "model_fingerprint": model_fingerprint(loaded.source),
        "seed": seed,
        "batch_size": batch_size,
        "device": str(loaded.device),
        "seconds": round(time.perf_counter() - start, 1),
    }
    manifest = write_knowledge(out, splits, stats, info)
    progress(f"knowledge benchmark ready in {out}", 1.0)
    return manifest


def write_knowledge(out: str | Path, splits: dict[str, list[dict]], stats: dict, info: dict) -> dict:
    """Write `select_known`'s splits (one JSONL per split, plus all.jsonl) and the manifest into `out`.

    Written in a temporary sibling folder that replaces `out` once complete (manifest last).
    `info` (model, model_fingerprint, seed, ...) goes into the manifest. Returns the manifest.
    """

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        for split, split_items in splits.items():
            write_jsonl(split_items, tmp / f"{split}.jsonl")
        manifest = {
            "format": KNOWLEDGE_FORMAT,
            "facts_sha256": facts_hash(info.get("seed", 0)),
            "rule": "greedy, stop at newline, first answer begins with an accepted answer",
            "max_new_tokens": MAX_NEW_TOKENS,
            **info,
            **stats,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, swapping out an existing `target` in two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_knowledge(name: str = "smollm2", progress: Progress = _no_progress, device: str | None = None) -> Path:
    """The cached knowledge benchmark of the built-in `name`, built first when missing or stale."""
    if name not in KNOWLEDGE_MODELS:
        raise SimuError(f"no knowledge benchmark for '{name}'. Choose one of: {', '.join(KNOWLEDGE_MODELS)}.")
    folder = knowledge_root(name)
    status = knowledge_status(folder, expected_fingerprint(name))
    if status != "ok":
        progress(f"building the {name} knowledge benchmark ({status})", 0.0)
        build_knowledge(KNOWLEDGE_MODELS[name], folder, progress, device)
    return folder


# --------------------------------------------------------------------------------------------
# Command line: python -m simu_core.knowledge build [--model builtin:smollm2] [--paraphrases]
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simu_core.knowledge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or rebuild) the knowledge benchmark of a model")
    build.add_argument("--model", default="builtin:smollm2", help="model spec (default builtin:smollm2)")
    build.add_argument("--out", default=None, help="output folder (default $SIMU_HOME/knowledge/<name>)")
    build.add_argument("--device", default=None, help="cpu (default), cuda, mps")
    build.add_argument("--paraphrases", action="store_true", help="also ask the paraphrased prompts")
    build.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    def report(message: str, fraction: float) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    try:
        manifest = build_knowledge(args.model, args.out, report, args.device, args.paraphrases, args.batch_size)
    except SimuError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("model", "facts", "known", "splits", "families", "seconds")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
