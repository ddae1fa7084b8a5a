"""Models: device and dtype choice, loading (built-in, local folder, hub id) and greedy answers.
The built-in default itself (training and its cache) lives in `simu_core.builtin`.

Model specs understood by `load_model`:
    builtin:full | builtin:retain01 | builtin:retain05 | builtin:retain10
    path/to/folder      a `save_pretrained` folder with safetensors weights
    org/name            a Hugging Face hub id (needs the hub or its local cache)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import builtin_root
from simu_core.errors import SimuError

BUILTIN_MODELS = ("full", *(f"retain{p:02d}" for p in qa.FORGET_PERCENTS))
SIMU_JSON = "simu.json"

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
