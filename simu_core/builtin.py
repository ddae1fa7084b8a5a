"""The built-in default: the authors benchmark, its tokenizer and tiny Llama models, trained
locally and cached with a manifest (seed, config, file hashes), so that everything works offline.

The cache is built in parts (`BUILD_ORDER`: the data and tokenizer, then `full`, then the retain
references), each checked on its own against the manifest: a page that needs only `full` can start
while the references are still training, a damaged part is rebuilt alone, and stray files in the
folder are ignored. A build runs under an OS file lock, in-process (`build`, `ensure_builtin`) or
in a detached process that no browser tab owns (`start_background_build`), and reports its live
progress and ETA to any reader through `read_build_status`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core import versions
from simu_core.config import BuiltinConfig, TinyModelConfig, TrainConfig, builtin_config, builtin_root, to_dict
from simu_core.models import SIMU_JSON, exact_match, greedy_answers, pick_device

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])

MANIFEST_NAME = "manifest.json"
# Bump when the generator or the training recipe changes, so old caches count as stale.
BUILTIN_FORMAT = 4  # 2: perturbed answers in the paraphrase wording (TOFU); 3: unbucketed batches; 4: parts


def _no_progress(message: str, fraction: float) -> None:
    pass


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def make_tiny_llama(m: TinyModelConfig, tokenizer, seed: int) -> nn.Module:
    """A freshly initialised LlamaForCausalLM of shape `m` (weights drawn with `seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        max_position_embeddings=m.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config)


def train_lm(
    model: nn.Module,
    examples: Sequence[qa.Encoded],
    pad_id: int,
    cfg: TrainConfig,
    seed: int,
    progress: Progress = _no_progress,
) -> list[float]:
    """Train `model` on `examples` (loss on answer tokens): AdamW, linear warm-up then cosine decay.

    Returns the mean loss of each epoch (nats per answer token).
    """
    torch.manual_seed(seed)
    model.train()
    device = next(model.parameters()).device  # batches follow the model (GPU for the large built-in)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    epoch_losses = []
    for epoch in range(cfg.epochs):
        losses = []
        batches = qa.iter_batches(
            examples, cfg.batch_size, pad_id, shuffle=True, seed=seed * 1000 + epoch, bucket=cfg.bucket
        )
        for i, batch in enumerate(batches):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if i % 8 == 7:  # a few reports per epoch keep the ETA fresh
                progress(f"epoch {epoch + 1}/{cfg.epochs}", (epoch + (i + 1) / steps_per_epoch) / cfg.epochs)
        epoch_losses.append(sum(losses) / len(losses))
        progress(f"epoch {epoch + 1}/{cfg.epochs}, loss {epoch_losses[-1]:.3f}", (epoch + 1) / cfg.epochs)
    model.eval()
    return epoch_losses


# --------------------------------------------------------------------------------------------
# The cache: parts, manifest, status
# --------------------------------------------------------------------------------------------

DATA_PART = "data"  # the benchmark's JSONL splits and the tokenizer; every model depends on it
# What the first page needs comes first: the data and `full`, then the retain references (forget10's first).
BUILD_ORDER = (DATA_PART, "full", "retain10", "retain05", "retain01")
# Retain references of the disjoint forget sets (`qa.DISJOINT_SPLITS`): built only when asked for (a spec
# names them, or `build-default --parts`), as the app and the quality table do not need them.
EXTRA_PARTS = tuple(f"retain10{s}" for s in qa.DISJOINT_SETS)
PARTS = (*BUILD_ORDER, *EXTRA_PARTS)
BUILD_DIR = ".build"  # inside the cache folder: the build's lock, live status, config and log
OK, MISSING, DAMAGED, STALE = "ok", "missing", "damaged", "stale"


def part_folders(part: str) -> tuple[str, ...]:
    """The folders (relative to the cache root) that make up one part."""
    return ("data", "tokenizer") if part == DATA_PART else (f"models/{part}",)


def parts_for_specs(*specs: str | None) -> tuple[str, ...]:
    """The parts of the built-in default that model and data specs need: the data part for any of its models
    or splits, plus the named models (other `builtin:` specs, e.g. builtin:smollm2, are not part of it)."""
    names = {s.split(":", 1)[1] for s in specs if s and s.startswith("builtin:")}
    if not names & {*PARTS[1:], *qa.BUILTIN_SPLITS}:
        return ()
    return tuple(p for p in PARTS if p == DATA_PART or p in names)


def with_app_parts(parts: Sequence[str]) -> tuple[str, ...]:
    """`BUILD_ORDER` (what the app needs) plus the on-demand parts among `parts`, in build order."""
    return tuple(p for p in PARTS if p in BUILD_ORDER or p in parts)


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256: status checks stay cheap


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _hash_folders(root: Path, folders: Sequence[str]) -> dict[str, str]:
    """sha256 of every file under `folders` of `root`, keyed by its path relative to `root`."""
    return {
        str(p.relative_to(root)): _sha256(p)
        for folder in folders
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(root: str | Path | None = None) -> dict | None:
    """The cache's manifest (None when absent or unreadable).

    Keys: format, config, seed, versions, parts (per finished part: files and their sha256, seconds, and for
    models exact_match, device and the data digest they were trained on), and the merged views files,
    exact_match and seconds over the finished parts.
    """
    path = Path(root or builtin_root()) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _write_manifest(root: Path, config: BuiltinConfig, parts: dict[str, dict]) -> dict:
    ordered = {p: parts[p] for p in PARTS if p in parts}
    manifest = {
        "format": BUILTIN_FORMAT,
        "config": to_dict(config),
        "seed": config.seed,
        "versions": versions("torch", "transformers", "tokenizers"),
        "parts": ordered,
        "files": {f: h for entry in ordered.values() for f, h in entry["files"].items()},
        "exact_match": {k: v for entry in ordered.values() for k, v in entry.get("exact_match", {}).items()},
        "seconds": round(sum(entry.get("seconds", 0.0) for entry in ordered.values()), 1),
    }
    _write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def _stale_reason(manifest: dict, config: BuiltinConfig | None) -> str | None:
    if manifest.get("format") != BUILTIN_FORMAT:
        return f"built by format {manifest.get('format')}, this version uses {BUILTIN_FORMAT}"
    if config is not None and manifest.get("config") != to_dict(config):
        return "built with other settings"
    return None


def part_states(root: str | Path | None = None, config: BuiltinConfig | None = None) -> dict[str, str]:
    """Each part's state: 'ok', 'missing', 'damaged' (a listed file changed or is gone) or 'stale'.

    Only the files the manifest lists are checked, so stray files in the folder (a `.DS_Store`, an
    editor backup) change nothing. A model trained on other data than the current data part is stale.
    With `config=None` any complete build is accepted, whatever its settings.
    """
    root = Path(root or builtin_root())
    manifest = read_manifest(root)
    if manifest is None:
        return dict.fromkeys(PARTS, MISSING)
    if _stale_reason(manifest, config):
        return dict.fromkeys(PARTS, STALE)
    parts = manifest.get("parts", {})
    states = {}
    for part in PARTS:
        entry = parts.get(part)
        if entry is None:
            states[part] = MISSING
        elif any(not (root / f).is_file() or _sha256(root / f) != h for f, h in entry["files"].items()):
            states[part] = DAMAGED
        else:
            states[part] = OK
    data_digest = _digest(parts[DATA_PART]["files"]) if states[DATA_PART] == OK else None
    for part in PARTS[1:]:
        if states[part] == OK and parts[part].get("data_digest") != data_digest:
            states[part] = STALE
    return states


def builtin_status(root: str | Path | None = None, config: BuiltinConfig | None = None) -> str:
    """'ok', 'missing', 'stale: <why>' or 'partial: <which parts are missing or damaged>' for the cache."""
    root = Path(root or builtin_root())
    manifest = read_manifest(root)
    if manifest is None:
        return MISSING
    reason = _stale_reason(manifest, config)
    if reason:
        return f"stale: {reason}"
    states = {part: state for part, state in part_states(root, config).items() if part in BUILD_ORDER}
    if all(s == OK for s in states.values()):
        return OK  # the default parts; EXTRA_PARTS are built on demand
    return "partial: " + ", ".join(f"{part} {state}" for part, state in states.items() if state != OK)


def missing_parts(
    root: str | Path | None = None, parts: Sequence[str] = BUILD_ORDER, config: BuiltinConfig | None = None
) -> list[str]:
    """Which of `parts` are not ready (not 'ok'); the data part counts for every model."""
    states = part_states(root, config)
    wanted = {DATA_PART, *parts} if parts else set()
    return [p for p in PARTS if p in wanted and states[p] != OK]


# --------------------------------------------------------------------------------------------
# The lock: one builder per cache folder, released by the OS when its process dies
# --------------------------------------------------------------------------------------------


def _build_dir(root: Path) -> Path:
    folder = root / BUILD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _lock_holder(root: Path) -> int | None:
    """The pid written by the lock's holder (None if unreadable)."""
    try:
        return int((root / BUILD_DIR / "lock").read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextmanager
def build_lock(root: Path, on_wait: Callable[[int | None], None] | None = None, poll: float = 1.0):
    """Hold the build lock of cache folder `root` (blocking; `on_wait(holder_pid)` is called while waiting).

    The lock is an OS file lock (flock), so a killed builder leaves nothing behind: the next one gets it.
    """
    path = _build_dir(root) / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while not _try_lock(fd):
            if on_wait is not None and not waited:
                on_wait(_lock_holder(root))
            waited = True
            time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build_running(root: str | Path | None = None) -> bool:
    """True while some process holds the build lock of the cache folder."""
    root = Path(root or builtin_root())
    path = root / BUILD_DIR / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Live status for other processes (the app's tabs): progress, ETA, parts
# --------------------------------------------------------------------------------------------


@dataclass
class BuildStatus:
    """What a build reports to everyone (written to `.build/status.json`). Times are `time.time()` seconds."""

    state: str = "running"  # running | done | failed | interrupted (the builder died)
    pid: int = 0
    message: str = ""
    fraction: float = 0.0  # of the work this build does, in [0, 1]
    eta_seconds: float | None = None
    started: float = 0.0
    updated: float = 0.0
    building: str | None = None  # the part in progress
    parts: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def elapsed(self) -> float:
        return self.updated - self.started


def read_build_status(root: str | Path | None = None) -> BuildStatus | None:
    """The last build's status (None if no build ever reported); 'interrupted' if its process died."""
    root = Path(root or builtin_root())
    path = root / BUILD_DIR / "status.json"
    try:
        status = BuildStatus(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if status.state == "running" and not build_active(root):
        status.state = "interrupted"
    return status


class _Reporter:
    """Turns a build's progress into status.json (at most every `every` seconds) plus the caller's callback.

    `fraction` is weighted by training work (examples x epochs), so the ETA extrapolated from it is honest.
    """

    def __init__(self, root: Path, progress: Progress, every: float = 0.5) -> None:
        self.root, self.progress, self.every = root, progress, every
        self.status = BuildStatus(pid=os.getpid(), started=time.time())
        self._last = 0.0

    def __call__(self, message: str, fraction: float, force: bool = False) -> None:
        now = time.time()
        s = self.status
        s.message, s.fraction, s.updated = message, min(1.0, max(0.0, fraction)), now
        s.eta_seconds = eta_from_fraction(s.elapsed, s.fraction)
        self.progress(message, s.fraction)
        if force or now - self._last >= self.every:
            self._last = now
            self.write()

    def write(self) -> None:
        _write_json_atomic(_build_dir(self.root) / "status.json", asdict(self.status))

    def finish(self, state: str, message: str, error: str | None = None) -> None:
        s = self.status
        s.state, s.error, s.building, s.eta_seconds = state, error, None, None
        self(message, 1.0 if state == "done" else s.fraction, force=True)


def eta_from_fraction(elapsed: float, fraction: float, min_fraction: float = 0.02) -> float | None:
    """Seconds left if the rest goes at the pace so far; None until there is enough to go on."""
    if fraction < min_fraction or elapsed <= 0:
        return None
    return elapsed * (1 - fraction) / fraction


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _save_model(model: nn.Module, tokenizer, folder: Path, info: dict) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / SIMU_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")


def _tmp_folder(root: Path, part: str) -> Path:
    return root / f".{part}.building-{os.getpid()}-{time.time_ns()}"


def _install(tmp: Path, root: Path, part: str) -> None:
    """Move a finished part from its temp folder into place, replacing an old (damaged or stale) copy."""
    for folder in part_folders(part):
        target = root / folder
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp / folder).rename(target)
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_builds(root: Path) -> None:
    """Delete temp folders of builds that died (call with the lock held: then every one is abandoned)."""
    for folder in root.glob(".*.building-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _reset(root: Path) -> None:
    """Forget a stale build: its manifest and part folders go; anything else in the folder stays."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for part in PARTS:
        for folder in part_folders(part):
            shutil.rmtree(root / folder, ignore_errors=True)


def _build_data(root: Path, config: BuiltinConfig) -> dict:
    start = time.perf_counter()
    tmp = _tmp_folder(root, DATA_PART)
    try:
        splits = qa.generate_benchmark(config.n_authors, config.seed)
        (tmp / "data").mkdir(parents=True)
        for name, items in splits.items():
            qa.write_jsonl(items, tmp / "data" / f"{name}.jsonl")
        fmt = qa.PromptFormat()
        texts = [
            f"{fmt.prompt(it['question'])} {a}"
            for items in splits.values()
            for it in items
            for a in [it["answer"], it["paraphrased_answer"], *it["perturbed_answers"]]
        ]
        train_tokenizer(texts, config.model.vocab_size).save_pretrained(tmp / "tokenizer")
        _install(tmp, root, DATA_PART)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = _hash_folders(root, part_folders(DATA_PART))
    return {"files": files, "seconds": round(time.perf_counter() - start, 1)}


def _read_split(root: Path, name: str) -> list[dict]:
    return qa.load_data(f"builtin:{name}", root=root).items


def _build_model(root: Path, config: BuiltinConfig, name: str, device: torch.device, progress: Progress) -> dict:
    """Train built-in model `name` on its split + world facts, check it, save it as a part."""
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    fmt = qa.PromptFormat()
    train_items = _read_split(root, name) + _read_split(root, "world_facts")
    examples = qa.encode_dataset(tokenizer, fmt, qa.QADataset(name, train_items))
    model = make_tiny_llama(config.model, tokenizer, config.seed).to(device)
    train_lm(model, examples, qa.pad_id_of(tokenizer), config.train, config.seed, progress)
    scores = {}
    for split in ["full"] if name == "full" else [name, name.replace("retain", "forget")]:
        items = _read_split(root, split)
        predicted = greedy_answers(model, tokenizer, fmt, [it["question"] for it in items])
        scores[f"{name}/{split}"] = exact_match(predicted, [it["answer"] for it in items])
    tmp = _tmp_folder(root, name)
    try:
        info = {"prompt_template": fmt.template, "builtin": name, "trained_on": f"{name} + world_facts"}
        _save_model(model, tokenizer, tmp / "models" / name, info)
        _install(tmp, root, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "files": _hash_folders(root, part_folders(name)),
        "exact_match": scores,
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
    }


# --------------------------------------------------------------------------------------------
# The shipped default: the default-size build, made once by `build-default` and shipped with the package
# --------------------------------------------------------------------------------------------

ASSETS = Path(__file__).resolve().parent / "assets" / "builtin-default"


def shipped_manifest() -> dict | None:
    """The manifest of the build shipped in `ASSETS` (None if the package has none)."""
    return read_manifest(ASSETS) if ASSETS.is_dir() else None


def _shipped_entry(config: BuiltinConfig, part: str) -> dict | None:
    """The shipped copy of `part`, if one was built by exactly this format and config."""
    manifest = shipped_manifest()
    if manifest is None or _stale_reason(manifest, config):
        return None
    return manifest.get("parts", {}).get(part)


def shipped_covers(root: str | Path | None = None, parts: Sequence[str] = BUILD_ORDER) -> bool:
    """True when every missing one of `parts` can be copied from the shipped build (a second's work, no training)."""
    root = Path(root or builtin_root())
    config = existing_config(root) or builtin_config()
    return all(_shipped_entry(config, part) is not None for part in missing_parts(root, parts))


def _install_shipped(root: Path, part: str, entry: dict) -> dict | None:
    """Copy a shipped part into `root`, each file checked against its sha256; None if any does not match."""
    start = time.perf_counter()
    tmp = _tmp_folder(root, part)
    try:
        for name, digest in entry["files"].items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ASSETS / name, tmp / name)
            if _sha256(tmp / name) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
        _install(tmp, root, part)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return {**entry, "source": "shipped", "install_seconds": round(time.perf_counter() - start, 2)}


def _work(config: BuiltinConfig, part: str, use_shipped: bool = True) -> float:
    """Relative cost of building a part: training examples x epochs (the data part costs about one epoch;
    copying a shipped part next to nothing)."""
    n = config.n_authors * 10  # about ten facts per author
    if use_shipped and _shipped_entry(config, part) is not None:
        return n / 100
    if part == DATA_PART:
        return float(n)
    if part == "full":
        return float(n * config.train.epochs)
    return n * (1 - int(part.removeprefix("retain")[:2]) / 100) * config.train.epochs


def build(
    root: str | Path | None = None,
    config: BuiltinConfig | None = None,
    parts: Sequence[str] = BUILD_ORDER,
    progress: Progress = _no_progress,
    device: str | None = None,
    force: bool = False,
    use_shipped: bool = True,
) -> dict:
    """Build the missing, damaged or stale `parts` of the built-in default into `root`; returns the manifest.

    Parts are built in `BUILD_ORDER` (the data first, as every model needs it), each in a temp folder moved
    into place when complete, and the manifest is rewritten after each, so a killed build loses only the
    part it was working on and the next call resumes. One process builds a folder at a time (`build_lock`);
    others wait. `config` defaults to the existing build's (for missing parts), else `builtin_config()`;
    `force` rebuilds everything. A part of the shipped default build (`ASSETS`, same format and config) is
    copied and checked instead of trained, unless `use_shipped` is False. Live status for other processes:
    `read_build_status(root)`.
    """
    root = Path(root or builtin_root())
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, on_wait=lambda pid: progress(f"waiting for the build running in process {pid}", 0.0)):
        config = config or existing_config(root) or builtin_config()
        if force or STALE in part_states(root, config).values():
            _reset(root)
        _remove_abandoned_builds(root)
        todo = missing_parts(root, parts, config)
        done = {p: e for p, e in (read_manifest(root) or {}).get("parts", {}).items() if p not in todo}
        report = _Reporter(root, progress)
        shown = [p for p in PARTS if p in BUILD_ORDER or p in todo]
        report.status.parts = {p: OK if p in done else ("queued" if p in todo else MISSING) for p in shown}
        total = sum(_work(config, p, use_shipped) for p in todo) or 1.0
        finished = 0.0
        try:
            for part in todo:
                report.status.building, report.status.parts[part] = part, "building"
                share = _work(config, part, use_shipped) / total

                def within(
                    message: str, fraction: float, part: str = part, base: float = finished, share: float = share
                ) -> None:
                    report(f"{part}: {message}", base + share * fraction)

                shipped = _shipped_entry(config, part) if use_shipped else None
                if shipped is not None and (installed := _install_shipped(root, part, shipped)) is not None:
                    done[part] = installed  # the shipped build, checked file by file: no training needed
                elif part == DATA_PART:
                    within("generating the benchmark and training the tokenizer", 0.0)
                    done[part] = _build_data(root, config)
                else:
                    done[part] = _build_model(root, config, part, pick_device(device), within)
                    done[part]["data_digest"] = _digest(done[DATA_PART]["files"])
                _write_manifest(root, config, done)
                report.status.parts[part] = OK
                finished += share
                report(f"{part} ready", finished, force=True)
        except BaseException as err:
            report.finish("failed", f"build failed: {err}", error=f"{type(err).__name__}: {err}")
            raise
        report.finish("done", "built-in default ready" if not missing_parts(root) else "requested parts ready")
    return read_manifest(root) or {}


def existing_config(root: str | Path) -> BuiltinConfig | None:
    """The config of the build in `root`, if it is of this version's format (so missing parts match it)."""
    manifest = read_manifest(root)
    if manifest is None or manifest.get("format") != BUILTIN_FORMAT:
        return None
    return BuiltinConfig.from_json(manifest["config"])


def build_default(
    out: str | Path | None = None,
    config: BuiltinConfig | None = None,
    progress: Progress = _no_progress,
    device: str | None = None,
) -> dict:
    """Train the whole built-in default into `out` from scratch (see `build`); returns the manifest."""
    return build(out, config or builtin_config(), BUILD_ORDER, progress, device, force=True, use_shipped=False)


def ensure_builtin(
    root: str | Path | None = None,
    config: BuiltinConfig | None = None,
    progress: Progress = _no_progress,
    parts: Sequence[str] = BUILD_ORDER,
) -> Path:
    """The built-in cache folder, with `parts` (default: all) built first where missing, damaged or stale.

    With `config=None` any intact build is accepted (whatever its author count); with a config, the
    cache must have been built with exactly that config.
    """
    root = Path(root or builtin_root())
    if missing_parts(root, parts, config):
        build(root, config, parts, progress)
    return root


_SPAWNED: dict[str, subprocess.Popen] = {}  # build processes this process started, by cache folder


def build_active(root: str | Path | None = None) -> bool:
    """True while a build of `root` runs: a process holds its lock, or one we started is still starting up."""
    root = Path(root or builtin_root())
    child = _SPAWNED.get(str(root))
    return build_running(root) or (child is not None and child.poll() is None)


def start_background_build(
    root: str | Path | None = None, config: BuiltinConfig | None = None, parts: Sequence[str] = BUILD_ORDER
) -> bool:
    """Start a detached process that builds the missing ones of `parts` (default: the app's) at `root`.

    It belongs to no caller (closing the app's tabs, or the app itself, does not stop it) and reports
    through `read_build_status(root)`. Returns False when a build is already running there.
    """
    root = Path(root or builtin_root())
    if build_active(root):
        return False
    folder = _build_dir(root)
    # Half the cores: the build shares the machine with the app, and on two cores a two-thread torch process
    # next to other work crawls (its threads wait for each other); one thread each keeps both moving.
    threads = max(1, (os.cpu_count() or 2) // 2)
    command = [sys.executable, "-m", "simu_core", "build-default", "--out", str(root), "--threads", str(threads)]
    if config is not None:
        _write_json_atomic(folder / "config.json", to_dict(config))
        command += ["--config", str(folder / "config.json")]
    if tuple(parts) != BUILD_ORDER:
        command += ["--parts", ",".join(parts)]
    package_parent = str(Path(__file__).resolve().parents[1])  # so that `-m simu_core` imports from any cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    with open(folder / "log.txt", "ab") as log:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True, close_fds=True
        )
    _SPAWNED[str(root)] = child
    now = time.time()
    starting = BuildStatus(pid=child.pid, message="starting the build process", started=now, updated=now)
    _write_json_atomic(folder / "status.json", asdict(starting))
    return True
