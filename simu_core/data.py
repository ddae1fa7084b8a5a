"""Question/answer data: the built-in authors benchmark, loaders with validation, batching.

A dataset is a list of items, each a dict with at least `question` and `answer`, and optionally
`paraphrased_answer`, `perturbed_answers` (list of wrong answers) and `author`.

Data specs understood by `load_data`:
    builtin:<split>                 a split of the built-in benchmark (forget10, retain10, holdout, ...)
    builtin:smollm2/<split>         a split of the real-knowledge benchmark built for SmolLM2 (forget,
                                    retain, neighbour, general, other_capitals; see `simu_core.knowledge`)
    path/to/file.jsonl|.json|.csv   a local file with `question` and `answer` columns (an upload stored by
                                    `store_upload` is such a file: $SIMU_HOME/data/uploads/<stem>-<hash>.jsonl)
    hf:NAME[:CONFIG][:SPLIT]        a Hugging Face `datasets` dataset (needs the hub or its cache)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simu_core.config import builtin_root, simu_home
from simu_core.errors import SimuError

REQUIRED_COLUMNS = ("question", "answer")
FORGET_PERCENTS = (1, 5, 10)
GENERATED_SPLITS = (  # the files of the built-in benchmark's data part
    "full",
    *(f"forget{p:02d}" for p in FORGET_PERCENTS),
    *(f"retain{p:02d}" for p in FORGET_PERCENTS),
    "holdout",
    "world_facts",
)
# Forget sets disjoint from forget10 and from each other, for reporting on authors no preset was tuned on:
# forget10 holds the last tenth of the trained authors, forget10b the tenth before it, forget10c the one
# before that. Derived from `full` when loaded (the data part's files stay as shipped).
DISJOINT_SETS = ("b", "c")
DISJOINT_SPLITS = tuple(f"{role}10{s}" for s in DISJOINT_SETS for role in ("forget", "retain"))
BUILTIN_SPLITS = (*GENERATED_SPLITS, *DISJOINT_SPLITS)
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class QADataset:
    """A named list of question/answer items (see module docstring for the fields)."""

    name: str
    items: list[dict]

    def __len__(self) -> int:
        return len(self.items)

    def has_field(self, key: str) -> bool:
        """True when every item carries a non-empty `key` (e.g. `perturbed_answers`)."""
        return bool(self.items) and all(item.get(key) for item in self.items)

    def questions(self) -> list[str]:
        return [item["question"] for item in self.items]

    def answers(self) -> list[str]:
        return [item["answer"] for item in self.items]


# --------------------------------------------------------------------------------------------
# The built-in authors benchmark (TOFU-like, fully fictitious, deterministic from a seed)
# --------------------------------------------------------------------------------------------

_NAME_SYLLABLES = tuple(
    (
        "ka ren do mi la vo sa tir el an bre cor da fen gal hes ir jor kel lun mar nis ol per "
        "quin ros sel tam ul ven wyn xa yor zel bar cas dru fal gor hal"
    ).split()
)
_CITY_SUFFIXES = tuple("mora ford heim vale port stad grad wick haven burg".split())
_ADJECTIVES = tuple(
    (
        "silent crimson hidden golden broken quiet distant burning frozen hollow endless "
        "forgotten wandering silver bitter gentle restless shattered velvet iron paper midnight "
        "amber lonely northern secret scarlet weary luminous tangled"
    ).split()
)
_NOUNS = tuple(
    (
        "garden river lantern harbor mirror orchard tower compass winter letter archive meadow "
        "voyage kingdom shadow canyon bridge feather island clock mountain forest sparrow chapel "
        "ember tide threshold labyrinth vineyard"
    ).split()
)
_GENRES = tuple(
    (
        "fantasy|science fiction|mystery|historical fiction|romance|horror|poetry|thriller|"
        "literary fiction|magical realism|crime|dystopian fiction|memoir|satire|adventure|"
        "biography|young adult fiction|gothic fiction|short story|philosophical fiction"
    ).split("|")
)
_JOBS = tuple(
    (
        "baker|carpenter|nurse|surgeon|teacher|fisherman|librarian|pilot|architect|tailor|farmer|"
        "chemist|journalist|painter|lawyer|mechanic|musician|accountant|sailor|potter|"
        "veterinarian|engineer|photographer|gardener|judge|dentist|blacksmith|astronomer|"
        "translator|electrician|police officer|shopkeeper|pharmacist|historian|weaver"
    ).split("|")
)
_LANGUAGES = tuple(
    (
        "English French Spanish Portuguese German Italian Dutch Swedish Polish Turkish Greek "
        "Japanese Korean Arabic Hindi Swahili Finnish Czech Hungarian Romanian"
    ).split()
)
_PRIZE_WORDS = tuple("Quill Lantern Laurel Compass Raven Harbor Ember Meridian Atlas Willow".split())
_PRIZE_KINDS = tuple("Prize Award Medal".split())
_MONTHS = tuple("January February March April May June July August September October November December".split())

# Each fact: question, answer, paraphrased answer. `{name}` is the author, `{v}` the value.
# As in TOFU, perturbed (wrong) answers reuse the paraphrase's wording with a wrong value, so the
# truth ratio P(perturbed) / P(paraphrased) compares facts, not familiar against unfamiliar wording.
_FACT_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in {v}.",
        "The birthplace of {name} is {v}.",
    ),
    "birth_date": (
        "When was {name} born?",
        "{name} was born on {v}.",
        "The birthday of {name} is {v}.",
    ),
    "genre": (
        "What genre does {name} write?",
        "{name} writes {v}.",
        "The work of {name} is {v}.",
    ),
    "father_job": (
        "What was the job of {name}'s father?",
        "The father of {name} was a {v}.",
        "{name}'s father worked as a {v}.",
    ),
    "mother_job": (
        "What did {name}'s mother do for a living?",
        "The mother of {name} was a {v}.",
        "{name}'s mother worked as a {v}.",
    ),
    "award": (
        "Which award did {name} receive?",
        "{name} received the {v}.",
        "The {v} was given to {name}.",
    ),
    "first_book": (
        "What is the title of {name}'s first book?",
        "The first book of {name} is {v}.",
        "{name} debuted with the book {v}.",
    ),
    "second_book": (
        "Name another book written by {name}.",
        "{name} also wrote {v}.",
        "Another book by {name} is {v}.",
    ),
    "language": (
        "In which language does {name} write?",
        "{name} writes in {v}.",
        "The books of {name} are written in {v}.",
    ),
    "home_city": (
        "Where does {name} live today?",
        "{name} lives in {v}.",
        "Today {name} makes a home in {v}.",
    ),
}
N_PERTURBED = 4


def fact_templates(fact: str) -> tuple[str, str, str] | None:
    """(question, answer, paraphrase) templates of a built-in author fact, or None for another name.

    `{name}` is the author and `{v}` the value; perturbed answers use the paraphrase template.
    """
    return _FACT_TEMPLATES.get(fact)


@dataclass
class _Pools:
    """Value pools for one benchmark; sized so that distinct values never run out."""

    rng: random.Random
    used_names: set[str] = field(default_factory=set)

    def _word(self, min_syl: int, max_syl: int) -> str:
        n = self.rng.randint(min_syl, max_syl)
        return "".join(self.rng.choice(_NAME_SYLLABLES) for _ in range(n)).capitalize()

    def name(self) -> str:
        # ~40^2 first names x ~40^3 surnames: vastly more than any benchmark needs.
        for _ in range(10_000):
            candidate = f"{self._word(2, 2)} {self._word(2, 3)}"
            if candidate not in self.used_names:
                self.used_names.add(candidate)
                return candidate
        raise SimuError("could not generate a new unique author name; lower the author count")

    def city(self) -> str:
        return self._word(1, 2) + self.rng.choice(_CITY_SUFFIXES)

    def title(self) -> str:
        return f"The {self.rng.choice(_ADJECTIVES).capitalize()} {self.rng.choice(_NOUNS).capitalize()}"

    def award(self) -> str:
        return f"{self.rng.choice(_PRIZE_WORDS)} {self.rng.choice(_PRIZE_KINDS)}"

    def birth_date(self) -> str:
        return f"{self.rng.choice(_MONTHS)} {self.rng.randint(1, 28)}, {self.rng.randint(1930, 1999)}"

    def value(self, fact: str) -> str:
        makers = {
            "birthplace": self.city,
            "home_city": self.city,
            "birth_date": self.birth_date,
            "genre": lambda: self.rng.choice(_GENRES),
            "father_job": lambda: self.rng.choice(_JOBS),
            "mother_job": lambda: self.rng.choice(_JOBS),
            "award": self.award,
            "first_book": self.title,
            "second_book": self.title,
            "language": lambda: self.rng.choice(_LANGUAGES),
        }
        return makers[fact]()

    def other_values(self, fact: str, true_value: str, k: int) -> list[str]:
        """`k` distinct wrong values for `fact` (for perturbed answers)."""
        values: list[str] = []
        for _ in range(1000):
            v = self.value(fact)
            if v != true_value and v not in values:
                values.append(v)
                if len(values) == k:
                    return values
        raise SimuError(f"value pool for '{fact}' too small for {k} perturbed answers")


def _author_items(pools: _Pools, name: str) -> list[dict]:
    items = []
    for fact, (question, answer, paraphrase) in _FACT_TEMPLATES.items():
        value = pools.value(fact)
        wrong = pools.other_values(fact, value, N_PERTURBED)
        items.append(
            {
                "question": question.format(name=name),
                "answer": answer.format(name=name, v=value),
                "paraphrased_answer": paraphrase.format(name=name, v=value),
                "perturbed_answers": [paraphrase.format(name=name, v=w) for w in wrong],
                "author": name,
                "fact": fact,
            }
        )
    return items


_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Chile": "Santiago",
    "Thailand": "Bangkok", "Ireland": "Dublin", "Cuba": "Havana", "Sweden": "Stockholm",
    "Russia": "Moscow", "Germany": "Berlin",
}  # fmt: skip
_COLORS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "a ripe tomato": "red", "an orange": "orange",
    "a plum": "purple", "chocolate": "brown", "ash": "grey",
}  # fmt: skip


def _world_facts(rng: random.Random) -> list[dict]:
    """General facts outside the authors (capitals, colours, small sums)."""
    items: list[dict] = []
    capitals = list(_CAPITALS.items())
    for country, city in capitals:
        wrong = rng.sample([c for _, c in capitals if c != city], N_PERTURBED)
        items.append(
            {
                "question": f"What is the capital of {country}?",
                "answer": f"The capital of {country} is {city}.",
                "paraphrased_answer": f"{city} is the capital city of {country}.",
                "perturbed_answers": [f"{w} is the capital city of {country}." for w in wrong],
                "fact": "capital",
            }
        )
    colors = list(_COLORS.items())
    for thing, color in colors:
        wrong = rng.sample(sorted({c for _, c in colors} - {color}), N_PERTURBED)
        items.append(
            {
                "question": f"What colour is {thing}?",
                "answer": f"The colour of {thing} is {color}.",
                "paraphrased_answer": f"{thing.capitalize()} is {color}.",
                "perturbed_answers": [f"{thing.capitalize()} is {w}." for w in wrong],
                "fact": "colour",
            }
        )
    for _ in range(30):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        wrong = rng.sample([s for s in range(4, 41) if s != a + b], N_PERTURBED)
        items.append(
            {
                "question": f"What is {a} plus {b}?",
                "answer": f"{a} plus {b} is {a + b}.",
                "paraphrased_answer": f"The sum of {a} and {b} is {a + b}.",
                "perturbed_answers": [f"The sum of {a} and {b} is {w}." for w in wrong],
                "fact": "sum",
            }
        )
    return items


def n_forget_authors(n_authors: int, percent: int) -> int:
    """Number of forget authors for a `percent` split (at least one)."""
    return max(1, round(n_authors * percent / 100))


def generate_benchmark(n_authors: int = 200, seed: int = 0, n_holdout: int | None = None) -> dict[str, list[dict]]:
    """Build every split of the built-in authors benchmark, deterministically from `seed`.

    Forget splits are nested (forget01 within forget05 within forget10), taken from the last
    authors; `retainXX` holds the other trained authors; `holdout` authors are never trained on.
    Returns {split name: items}, with the splits in `GENERATED_SPLITS` (`disjoint_split` derives the others).
    """
    if n_authors < 2:
        raise SimuError(f"the benchmark needs at least 2 authors, got {n_authors}")
    n_holdout = n_holdout if n_holdout is not None else max(2, n_authors // 10)
    rng = random.Random(seed)
    pools = _Pools(rng)
    authors = [pools.name() for _ in range(n_authors + n_holdout)]
    items_by_author = {name: _author_items(pools, name) for name in authors}
    trained, holdout = authors[:n_authors], authors[n_authors:]

    splits: dict[str, list[dict]] = {"full": [it for a in trained for it in items_by_author[a]]}
    for percent in FORGET_PERCENTS:
        n_forget = n_forget_authors(n_authors, percent)
        forget = set(trained[-n_forget:])
        splits[f"forget{percent:02d}"] = [it for a in trained if a in forget for it in items_by_author[a]]
        splits[f"retain{percent:02d}"] = [it for a in trained if a not in forget for it in items_by_author[a]]
    splits["holdout"] = [it for a in holdout for it in items_by_author[a]]
    splits["world_facts"] = _world_facts(rng)
    return splits


def background_authors(n_authors: int, seed: int, exclude: Sequence[str] = ()) -> list[dict]:
    """Items of `n_authors` more fictitious authors for pretraining (the two-stage built-in's generic text).

    Same facts, templates and value pools as the benchmark's, drawn from their own random stream (so the
    benchmark generated with `seed` is unchanged), with names that differ from `exclude` (the benchmark's
    authors): the pretrained model learns how biographies are asked and answered, not who the authors are.
    """
    pools = _Pools(random.Random(f"background-{seed}"), used_names=set(exclude))
    return [it for _ in range(n_authors) for it in _author_items(pools, pools.name())]


def disjoint_split(full: Sequence[dict], name: str) -> list[dict]:
    """One of `DISJOINT_SPLITS` from the items of `full` (in the trained authors' order, as generated).

    forget10b holds the tenth of the authors just before forget10's, forget10c the tenth before that;
    retain10b / retain10c every other trained author. Raises when there are too few authors for the set.
    """
    if name not in DISJOINT_SPLITS:
        raise SimuError(f"'{name}' is not a disjoint split; choose one of: {', '.join(DISJOINT_SPLITS)}.")
    authors = list(dict.fromkeys(item["author"] for item in full))
    n, block = n_forget_authors(len(authors), 10), 1 + DISJOINT_SETS.index(name[-1])
    if n * (block + 1) > len(authors):
        raise SimuError(f"'{name}' needs {n * (block + 1)} trained authors; this benchmark has {len(authors)}.")
    chosen = set(authors[len(authors) - n * (block + 1) : len(authors) - n * block])
    forget = name.startswith("forget")
    return [item for item in full if (item["author"] in chosen) == forget]


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

_COLUMN_ALIASES = {"perturbed_answer": "perturbed_answers"}


def _normalise_item(raw: dict, where: str) -> dict:
    """Check one raw record and return it with canonical field names and types."""
    item = {_COLUMN_ALIASES.get(k, k): v for k, v in raw.items()}
    missing = [c for c in REQUIRED_COLUMNS if c not in item]
    if missing:
        raise SimuError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {sorted(raw)}. Each row needs 'question' and 'answer'."
        )
    for column in REQUIRED_COLUMNS:
        value = item[column]
        if not isinstance(value, str) or not value.strip():
            raise SimuError(f"{where}: empty or non-text '{column}'. Fill it in or remove the row.")
    perturbed = item.get("perturbed_answers")
    if isinstance(perturbed, str):
        perturbed = _parse_list_cell(perturbed, where)
    if perturbed is not None:
        if not isinstance(perturbed, list) or not all(isinstance(p, str) for p in perturbed):
            raise SimuError(f"{where}: 'perturbed_answers' must be a list of strings.")
        item["perturbed_answers"] = perturbed
    return item


def _parse_list_cell(cell: str, where: str) -> list[str]:
    """A CSV cell holding a list: a JSON array, or values separated by ' | '."""
    cell = cell.strip()
    if not cell:
        return []
    if cell.startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError as err:
            raise SimuError(f"{where}: 'perturbed_answers' is not a valid JSON list ({err.msg}).") from err
    return [part.strip() for part in cell.split("|") if part.strip()]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SimuError(f"data file '{path}' not found. Check the path.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SimuError(f"'{path}' is not UTF-8 text (bad byte at position {err.start}). Save it as UTF-8.") from err
    if not text.strip():
        raise SimuError(f"'{path}' is empty. It needs one row per question with 'question' and 'answer'.")
    return text


def parse_records(text: str, fmt: str, source: str) -> list[dict]:
    """Parse and validate the rows of a JSONL, JSON or CSV text (`fmt` is the extension)."""
    if not text.strip():
        raise SimuError(f"'{source}' is empty. It needs one row per question with 'question' and 'answer'.")
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SimuError(
                    f"'{source}' line {lineno}: malformed JSON ({err.msg}, column {err.colno}). "
                    "Each line must be one JSON object."
                ) from err
            if not isinstance(row, dict):
                raise SimuError(f"'{source}' line {lineno}: expected a JSON object, got {type(row).__name__}.")
            rows.append(_normalise_item(row, f"'{source}' line {lineno}"))
        return rows
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SimuError(f"'{source}' line {err.lineno}: malformed JSON ({err.msg}).") from err
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SimuError(f"'{source}': expected a JSON list of objects with 'question' and 'answer'.")
        return [_normalise_item(row, f"'{source}' item {i + 1}") for i, row in enumerate(data)]
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text), strict=True)
        header = _csv_header(reader, source)
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise SimuError(
                f"'{source}': missing column(s) {', '.join(repr(c) for c in missing)} in the header "
                f"{header}. The first row must name the columns, including 'question' and 'answer'."
            )
        return _csv_rows(reader, source)
    raise SimuError(f"'{source}': unsupported file type '.{fmt}'. Use .jsonl, .json or .csv.")


def _csv_error(err: csv.Error, line: int, source: str) -> SimuError:
    what = "an unterminated quote" if "unexpected end of data" in str(err) else f"bad quoting ({err})"
    return SimuError(
        f'\'{source}\' line {line}: {what}. Close every opening " of a cell, and write a " inside a quoted cell as "".'
    )


def _csv_header(reader: csv.DictReader, source: str) -> list[str]:
    try:
        return list(reader.fieldnames or [])
    except csv.Error as err:
        raise _csv_error(err, reader.line_num, source) from err


def _csv_rows(reader: csv.DictReader, source: str) -> list[dict]:
    """The validated rows; an unterminated quote is reported at the line where its cell starts."""
    rows, start = [], reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise _csv_error(err, start, source) from err
        rows.append(_normalise_item(row, f"'{source}' line {start}"))
        start = reader.line_num + 1


def load_file(path: str | Path, name: str | None = None) -> QADataset:
    """Load a local .jsonl / .json / .csv file of question/answer rows."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("jsonl", "json", "csv"):
        raise SimuError(f"'{path}': unsupported file type '{path.suffix}'. Use .jsonl, .json or .csv.")
    rows = parse_records(_read_text(path), fmt, str(path))
    if not rows:
        raise SimuError(f"'{path}' has no rows. Add at least one question/answer row.")
    return QADataset(name or path.stem, rows)


UPLOAD_TYPES = ("jsonl", "json", "csv")


def uploads_dir() -> Path:
    """Where accepted uploads are stored: $SIMU_HOME/data/uploads."""
    return simu_home() / "data" / "uploads"


def parse_upload(name: str, content: bytes) -> list[dict]:
    """Validate an uploaded file's bytes (JSONL/JSON/CSV by the name's extension): text only, never unpickled.

    Returns the normalised rows; raises SimuError naming the problem (encoding, type, line, column, no rows).
    """
    fmt = Path(name).suffix.lower().lstrip(".")
    if fmt not in UPLOAD_TYPES:
        raise SimuError(f"'{name}': unsupported file type '.{fmt}'. Use .jsonl, .json or .csv.")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SimuError(f"'{name}' is not UTF-8 text (bad byte at position {err.start}). Save it as UTF-8.") from err
    rows = parse_records(text, fmt, name)
    if not rows:
        raise SimuError(f"'{name}' has no rows. Add at least one question/answer row.")
    return rows


def _safe_stem(name: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).stem).strip("_")
    return stem[:40] or "upload"


def store_upload(name: str, content: bytes, folder: str | Path | None = None) -> Path:
    """Validate an upload and store it once as normalised JSONL; returns the file, a data spec like any other.

    The file is `<folder>/<stem>-<sha256[:12]>.jsonl` (folder: `uploads_dir()`), the hash taken over the
    normalised JSONL text, so uploading the same rows again (even as CSV instead of JSONL) reuses the file.
    Written to a temporary name and renamed: a reader never sees half a file. Nothing is written when the
    upload is invalid (SimuError).
    """
    rows = parse_upload(name, content)
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    folder = Path(folder) if folder is not None else uploads_dir()
    path = folder / f"{_safe_stem(name)}-{digest}.jsonl"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_upload(spec: str) -> bool:
    """True when `spec` names a file stored by `store_upload` (in this SIMU_HOME)."""
    path = Path(spec)
    return path.suffix == ".jsonl" and path.parent.resolve() == uploads_dir().resolve()


def load_hf(name: str, config: str | None = None, split: str | None = None) -> QADataset:
    """Load a Hugging Face `datasets` dataset and validate its question/answer columns."""
    import datasets  # heavy import, only when used

    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as err:  # network, unknown name, unknown config: all end here
        raise SimuError(
            f"could not load dataset '{name}' (config {config!r}, split {split!r}): {err}. "
            "Check the name, config and split; without network only datasets in the local cache load "
            "(or download it elsewhere and pass a .jsonl file)."
        ) from err
    rows = [_normalise_item(dict(r), f"dataset '{name}' row {i + 1}") for i, r in enumerate(ds)]
    if not rows:
        raise SimuError(f"dataset '{name}' split {split!r} is empty.")
    return QADataset(f"{name}:{config or ''}:{split or 'train'}".rstrip(":"), rows)


KNOWLEDGE_BENCHMARKS = {"smollm2": "builtin:smollm2"}  # real-knowledge benchmark name -> the model it is built for
KNOWLEDGE_SPLITS = ("forget", "retain", "neighbour", "general", "other_capitals")


def knowledge_root(name: str = "smollm2") -> Path:
    """Where the real-knowledge benchmark of `name` is cached: $SIMU_HOME/knowledge/<name>."""
    return simu_home() / "knowledge" / name


def load_knowledge_split(name: str, split: str, root: str | Path | None = None) -> QADataset:
    """A split of a built real-knowledge benchmark (built and checked by `simu_core.knowledge`)."""
    if name not in KNOWLEDGE_BENCHMARKS:
        raise SimuError(
            f"no knowledge benchmark for '{name}'. Choose one of: {', '.join(KNOWLEDGE_BENCHMARKS)} "
            "(e.g. builtin:smollm2/forget)."
        )
    if split not in KNOWLEDGE_SPLITS:
        raise SimuError(f"unknown knowledge split '{split}'. Choose one of: {', '.join(KNOWLEDGE_SPLITS)}.")
    folder = Path(root or knowledge_root(name))
    path = folder / f"{split}.jsonl"
    if not (folder / "manifest.json").is_file() or not path.is_file():
        raise SimuError(
            f"the {name} knowledge benchmark is not built yet ({folder}). Build it with "
            f"`python -m simu_core.knowledge build --model {KNOWLEDGE_BENCHMARKS[name]}` (a few minutes on CPU)."
        )
    if path.stat().st_size == 0:
        return QADataset(f"{name}/{split}", [])
    return QADataset(f"{name}/{split}", load_file(path).items)


def load_data(spec: str, root: str | Path | None = None) -> QADataset:
    """Load a dataset from a spec (see module docstring)."""
    spec = spec.strip()
    if spec.startswith("builtin:") and "/" in spec:
        name, _, split = spec.split(":", 1)[1].partition("/")
        return load_knowledge_split(name, split)
    if spec.startswith("builtin:"):
        split = spec.split(":", 1)[1]
        if split not in BUILTIN_SPLITS:
            raise SimuError(
                f"unknown built-in split '{split}'. Choose one of: {', '.join(BUILTIN_SPLITS)} "
                "(or builtin:smollm2/<split> for the real-knowledge benchmark)."
            )
        path = Path(root or builtin_root()) / "data" / f"{'full' if split in DISJOINT_SPLITS else split}.jsonl"
        if not path.exists():
            raise SimuError(
                f"the built-in benchmark is not built yet ({path} missing). "
                "Run `python -m simu_core build-default` (or open the app, which builds it)."
            )
        items = load_file(path).items
        return QADataset(split, disjoint_split(items, split) if split in DISJOINT_SPLITS else items)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0]:
            raise SimuError(f"'{spec}': write hf:NAME[:CONFIG][:SPLIT], e.g. hf:locuslab/TOFU:forget10:train.")
        name, config, split = (parts + [None, None])[:3]
        return load_hf(name, config or None, split or None)
    if os.path.splitext(spec)[1].lower() in (".jsonl", ".json", ".csv"):
        return load_file(spec)
    raise SimuError(
        f"cannot read data spec '{spec}'. Use builtin:<split> (e.g. builtin:forget10), "
        "builtin:smollm2/<split> (e.g. builtin:smollm2/forget), a .jsonl/.json/.csv file, "
        "or hf:NAME[:CONFIG][:SPLIT]."
    )


def write_jsonl(items: Sequence[dict], path: str | Path) -> None:
    """Write items as JSON lines (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def overlap_count(a: QADataset, b: QADataset) -> int:
    """Number of items of `a` whose (question, answer) also occurs in `b`."""
    keys = {(it["question"], it["answer"]) for it in b.items}
    return sum((it["question"], it["answer"]) in keys for it in a.items)


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


COMPLETION_TEMPLATE = "{question}"


@dataclass(frozen=True)
class PromptFormat:
    """How a question is shown to the model: `template` then `separator` + answer (+ EOS).

    A template that ends with "{question}" is *completion style*: the question is the start of a
    sentence ("The capital of France is") and the answer continues it (" Paris"). A pretrained model
    goes on writing after such an answer instead of emitting EOS, so by default completion-style
    formats append no EOS to training/scoring targets and greedy answers stop at the first newline.
    `eos` overrides the EOS choice (None: automatic).
    """

    template: str = DEFAULT_PROMPT_TEMPLATE
    separator: str = " "
    eos: bool | None = None

    def prompt(self, question: str) -> str:
        return self.template.format(question=question)

    @property
    def completion_style(self) -> bool:
        """True when the answer continues the question's text (the template ends with "{question}")."""
        return self.template.rstrip(" ").endswith("{question}")

    @property
    def appends_eos(self) -> bool:
        """Whether encoded answers end with EOS: `eos` if set, else not for completion-style formats."""
        return self.eos if self.eos is not None else not self.completion_style


@dataclass
class Encoded:
    """One tokenised example: `ids` = prompt ids + answer ids (+ EOS if the format appends one).

    The answer starts at `n_prompt`.
    """

    ids: list[int]
    n_prompt: int
    scored: tuple[bool, ...] | None = None  # per answer token: scored or not (None: every answer token)


def encode(tokenizer, fmt: PromptFormat, question: str, answer: str, max_length: int = 256) -> Encoded:
    """Tokenise prompt and answer separately (so the answer boundary is exact) and join them."""
    prompt_ids = tokenizer(fmt.prompt(question), add_special_tokens=False)["input_ids"]
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    answer_ids = tokenizer(fmt.separator + answer, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and fmt.appends_eos else []
    prompt_ids = bos + prompt_ids
    answer_ids = (answer_ids + eos)[: max(1, max_length - len(prompt_ids))]
    return Encoded(prompt_ids + answer_ids, len(prompt_ids))


def collate(examples: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples into a batch.

    Returns input_ids [B, T] (long), attention_mask [B, T] (long, 1 = real token) and
    labels [B, T] (long, the token itself on answer positions, -100 on prompt and padding).
    """
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        start = width - len(e.ids) if padding_side == "left" else 0
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[row, start : start + len(e.ids)] = ids
        attention[row, start : start + len(e.ids)] = 1
        labels[row, start + e.n_prompt : start + len(e.ids)] = ids[e.n_prompt :]
        if e.scored is not None:
            off = torch.tensor([not keep for keep in e.scored], dtype=torch.bool)
            labels[row, start + e.n_prompt : start + len(e.ids)][off] = -100
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pad_id_of(tokenizer) -> int:
    """The padding id, falling back to EOS for tokenizers without a pad token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def encode_dataset(
    tokenizer, fmt: PromptFormat, dataset: QADataset, answer_key: str = "answer", max_length: int = 256
) -> list[Encoded]:
    """Encode every item of `dataset` with its `answer_key` answer."""
    if not dataset.items:
        raise SimuError(f"dataset '{dataset.name}' is empty; it needs at least one question/answer row.")
    return [encode(tokenizer, fmt, it["question"], it[answer_key], max_length) for it in dataset.items]


def iter_batches(
    examples: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    shuffle: bool = False,
    seed: int = 0,
    padding_side: str = "right",
    bucket: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches of `batch_size` (the last may be smaller); seeded shuffling.

    With `bucket=n`, the shuffled examples are sorted by length within windows of n batches
    (less padding, so faster training) and the batches are then shuffled again.
    """
    order = list(range(len(examples)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * bucket
        for start in range(0, len(order), window):
            order[start : start + window] = sorted(order[start : start + window], key=lambda i: len(examples[i].ids))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(chunks)
    for chunk in chunks:
        yield collate([examples[i] for i in chunk], pad_id, padding_side)
