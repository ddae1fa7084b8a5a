"""Models: device and dtype choice, loading (built-in, local folder, hub id), greedy answers,
and the built-in default (tokenizer + tiny Llama models trained on the authors benchmark).

Model specs understood by `load_model`:
    builtin:full | builtin:retain01 | builtin:retain05 | builtin:retain10
    path/to/folder      a `save_pretrained` folder with safetensors weights
    org/name            a Hugging Face hub id (needs the hub or its local cache)
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import BuiltinConfig, TrainConfig, builtin_config, builtin_root, to_dict
from simu_core.errors import SimuError

BUILTIN_MODELS = ("full", *(f"retain{p:02d}" for p in qa.FORGET_PERCENTS))
MANIFEST_NAME = "manifest.json"
# Bump when the generator or the training recipe changes, so old caches count as stale.
BUILTIN_FORMAT = 3  # 2: perturbed answers in the paraphrase wording (TOFU); 3: unbucketed batches
SIMU_JSON = "simu.json"

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])


def _no_progress(message: str, fraction: float) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given (and available), else cuda, then mps, then cpu."""
    if prefer and prefer != "auto":
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SimuError("device 'cuda' asked for, but no CUDA GPU is visible. Use --device cpu.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise SimuError("device 'mps' asked for, but MPS is not available. Use --device cpu.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM ready for use: the model (eval mode), its tokenizer and prompt format."""

    model: nn.Module
    tokenizer: object
    fmt: qa.PromptFormat
    spec: str
    source: str  # the folder or hub id it was loaded from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_model_source(spec: str, root: str | Path | None = None) -> str:
    """The folder or hub id behind a model spec; raises with a fix for missing builtins/folders."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise SimuError(f"unknown built-in model '{name}'. Choose one of: {', '.join(BUILTIN_MODELS)}.")
        folder = Path(root or builtin_root()) / "models" / name
        if not (folder / "config.json").exists():
            raise SimuError(
                f"the built-in model '{name}' is not built yet ({folder} missing). "
                "Run `python -m simu_core build-default` (or open the app, which builds it)."
            )
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SimuError(f"'{spec}' is a file; a model is a folder written by save_pretrained.")
        if not (path / "config.json").exists():
            raise SimuError(f"folder '{spec}' has no config.json; save the model with save_pretrained().")
        if not any(path.glob("*.safetensors")):
            raise SimuError(
                f"folder '{spec}' has no safetensors weights (only safetensors are loaded, for safety). "
                "Convert it: model.save_pretrained(folder, safe_serialization=True)."
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.count("/") > 1:
        raise SimuError(f"model folder '{spec}' not found. Check the path.")
    return spec  # a hub id


def read_prompt_template(source: str) -> str | None:
    """The prompt template stored in a model folder's simu.json, if any."""
    path = Path(source) / SIMU_JSON
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("prompt_template")
    return None


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    prompt_template: str | None = None,
    root: str | Path | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see module docstring), in eval mode.

    Weights load from safetensors only; remote code runs only with `trust_remote_code=True`.
    The family must be one `simu_core.arch` knows (its MLP neurons must be findable).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simu_core.arch import adapter_for

    source = resolve_model_source(spec, root)
    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = dtype or pick_dtype(device)
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = "folder" if Path(source).exists() else "hub id"
        raise SimuError(
            f"could not load model {where} '{spec}': {err}. Check the name; without network only "
            "models already in the local Hugging Face cache load (or pass a local folder)."
        ) from err
    adapter_for(model)  # fail early, with the supported families named
    model.to(device).eval()
    template = prompt_template or read_prompt_template(source) or qa.DEFAULT_PROMPT_TEMPLATE
    return LoadedModel(model, tokenizer, qa.PromptFormat(template), spec, source)


# --------------------------------------------------------------------------------------------
# Greedy answers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    fmt: qa.PromptFormat,
    questions: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 128,
) -> list[str]:
    """Greedy-decoded answers (stripped text after the prompt), batched with left padding."""
    device = next(model.parameters()).device
    pad = qa.pad_id_of(tokenizer)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(questions), batch_size):
        prompts = [qa.encode(tokenizer, fmt, q, "", max_length=10_000) for q in questions[start : start + batch_size]]
        prompts = [qa.Encoded(p.ids[: p.n_prompt], p.n_prompt) for p in prompts]
        batch = qa.collate(prompts, pad, padding_side="left")
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return answers


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference (whitespace-stripped)."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)


# --------------------------------------------------------------------------------------------
# The built-in default: tokenizer, tiny Llama, training, cache with manifest
# --------------------------------------------------------------------------------------------


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
