"""The built-in default: the authors benchmark, its tokenizer and tiny Llama models, trained
locally and cached with a manifest (seed, config, file hashes), so that everything works offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import BuiltinConfig, TrainConfig, builtin_config, builtin_root, to_dict
from simu_core.models import BUILTIN_MODELS, SIMU_JSON, exact_match, greedy_answers, pick_device

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])

MANIFEST_NAME = "manifest.json"
# Bump when the generator or the training recipe changes, so old caches count as stale.
BUILTIN_FORMAT = 3  # 2: perturbed answers in the paraphrase wording (TOFU); 3: unbucketed batches


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


def make_tiny_llama(config: BuiltinConfig, tokenizer) -> nn.Module:
    """A freshly initialised tiny LlamaForCausalLM (seeded by `config.seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
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
    torch.manual_seed(config.seed)
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
        for batch in qa.iter_batches(examples, cfg.batch_size, pad_id, shuffle=True, seed=seed * 1000 + epoch):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        progress(f"epoch {epoch + 1}/{cfg.epochs}, loss {epoch_losses[-1]:.3f}", (epoch + 1) / cfg.epochs)
    model.eval()
    return epoch_losses


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
    }


def read_manifest(root: str | Path | None = None) -> dict | None:
    path = Path(root or builtin_root()) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def builtin_status(root: str | Path | None = None, config: BuiltinConfig | None = None) -> str:
    """'ok', 'missing' or 'stale: <why>' for the cache at `root` (against `config` if given)."""
    root = Path(root or builtin_root())
    manifest = read_manifest(root)
    if manifest is None:
        return "missing"
    if manifest.get("format") != BUILTIN_FORMAT:
        return f"stale: built by format {manifest.get('format')}, this version uses {BUILTIN_FORMAT}"
    if config is not None and manifest.get("config") != to_dict(config):
        return "stale: built with other settings"
    if _hash_tree(root) != manifest.get("files"):
        return "stale: files changed or incomplete since the build"
    return "ok"


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    import simu_core

    return {
        "simu_core": simu_core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _save_model(model: nn.Module, tokenizer, folder: Path, info: dict) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / SIMU_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")


def build_default(
    out: str | Path | None = None,
    config: BuiltinConfig | None = None,
    progress: Progress = _no_progress,
    device: str | None = None,
) -> dict:
    """Build the built-in benchmark and models into `out` (default `builtin_root()`).

    Everything is built in a temporary sibling folder that replaces `out` only once complete
    (the manifest is written last), so a half-built cache is never taken for a good one.
    Returns the manifest: config, versions, file hashes, exact-match scores, seconds, device.
    `config` defaults to `builtin_config()` (the size $SIMU_BUILTIN_SIZE names); training runs on
    `device` (default: the best available).
    """
    out = Path(out or builtin_root())
    config = config or builtin_config()  # the size named by $SIMU_BUILTIN_SIZE
    device = pick_device(device)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        splits = qa.generate_benchmark(config.n_authors, config.seed)
        (tmp / "data").mkdir()
        for name, items in splits.items():
            qa.write_jsonl(items, tmp / "data" / f"{name}.jsonl")
        progress("benchmark written; training tokenizer", 0.01)
        fmt = qa.PromptFormat()
        texts = [
            f"{fmt.prompt(it['question'])} {a}"
            for items in splits.values()
            for it in items
            for a in [it["answer"], it["paraphrased_answer"], *it["perturbed_answers"]]
        ]
        tokenizer = train_tokenizer(texts, config.model.vocab_size)
        scores: dict[str, float] = {}
        for i, name in enumerate(BUILTIN_MODELS):
            train_items = splits[name] + splits["world_facts"]
            examples = qa.encode_dataset(tokenizer, fmt, qa.QADataset(name, train_items))
            model = make_tiny_llama(config, tokenizer).to(device)

            def report(message: str, fraction: float, i: int = i, name: str = name) -> None:
                progress(
                    f"model {name} ({i + 1}/{len(BUILTIN_MODELS)}): {message}",
                    0.02 + 0.93 * (i + fraction) / len(BUILTIN_MODELS),
                )

            train_lm(model, examples, qa.pad_id_of(tokenizer), config.train, config.seed, report)
            eval_splits = ["full"] if name == "full" else [name, f"forget{name[-2:]}"]
            for split in eval_splits:
                items = splits[split]
                predicted = greedy_answers(model, tokenizer, fmt, [it["question"] for it in items])
                scores[f"{name}/{split}"] = exact_match(predicted, [it["answer"] for it in items])
            _save_model(
                model,
                tokenizer,
                tmp / "models" / name,
                {"prompt_template": fmt.template, "builtin": name, "trained_on": f"{name} + world_facts"},
            )
        manifest = {
            "format": BUILTIN_FORMAT,
            "config": to_dict(config),
            "seed": config.seed,
            "versions": _versions(),
            "exact_match": scores,
            "seconds": round(time.perf_counter() - start, 1),
            "device": str(device),
            "files": _hash_tree(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("built-in default ready", 1.0)
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_builds(out: Path) -> None:
    """Delete temporary build folders left by killed builds (their process is gone)."""
    for folder in out.parent.glob(f".{out.name}.building-*"):
        pid = folder.name.split("-")[1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, swapping out an existing (stale) `target` in two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_builtin(
    root: str | Path | None = None, config: BuiltinConfig | None = None, progress: Progress = _no_progress
) -> Path:
    """The built-in cache folder, built first if missing or stale.

    With `config=None` any complete, intact cache is accepted (whatever its author count);
    with a config, the cache must have been built with exactly that config.
    """
    root = Path(root or builtin_root())
    status = builtin_status(root, config)
    if status != "ok":
        progress(f"building the built-in default ({status})", 0.0)
        build_default(root, config, progress)
    return root
