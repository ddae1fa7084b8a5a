"""Memory planner: how many bytes an unlearning run needs per device, before running it.

`plan(shape, config, seq_len)` estimates, for one process of `unlearn.unlearn` as it is implemented:

- weights: the loaded base model (its dtype) + the float32 working copy (+ a reference copy for
  NPO / KL losses when the base sits on another device);
- gradients: float32, one per trainable entry (SIMU's masked slices train through compact leaves,
  so its gradients scale with the mask);
- optimiser state: two float32 moments per trainable entry (Sophia m, h; AdamW m, v);
- curvature (transient): Sophia's estimate on refresh steps (GNB: the sampled-label gradient and its
  square; Hutchinson: the gradient with its graph and the Hessian-vector product; sqgrad: the
  square), or the step's temporaries (a few copies of the largest trainable tensor) if larger;
- activations: what the forward passes over the forget and retain batches keep for the backward.
  Per token and layer, ~`ACT_FIXED_D` x d + `ACT_FIXED_FF` x d_ff float32 values are kept whatever
  trains (norm inputs, q/k/v for attention, the MLP's gate/up outputs), plus the inputs of the
  projections whose weights train (`ACT_ATTN_D` x d for trainable attention, d + d_ff for a fully
  trainable MLP, the selected neurons only for SIMU's slices); SDPA attention keeps one log-sum-exp
  per head and token, eager attention (Hutchinson's double backward needs it) heads x T scores;
  the logits keep ~`ACT_LOGITS` x vocab per token (logits, log-softmax, their gradients, GNB's
  sampled-label pass). bf16 autocast (CUDA) halves the layer activations.

The peak is weights + gradients + optimiser state + the larger of activations and curvature: the
curvature estimate is built after the backward has freed the activations (its own forward's are
freed by the time the estimates are squared).

The coefficients started from counting what the Llama graph saves and were then fitted to measured
CPU peaks of the small and default built-ins (`unlearn.measure_unlearn`: both models and both SIMU and SOUL
were ~1.3x over with the first counts, the same factor everywhere); the SmolLM2-shaped model is the
held-out check (docs/RESULTS.md "Scale (issue 18)"). `shape_of_config` builds the model on the meta
device, so planning needs only a config, never the weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from simu_core.arch import neuron_layers
from simu_core.config import UnlearnConfig
from simu_core.errors import SimuError
from simu_core.losses import NEEDS_REFERENCE
from simu_core.methods import get_method, preset_config

ACT_FIXED_D = 6.0  # floats per token and layer kept whatever trains, in units of d
ACT_FIXED_FF = 2.5  # ... in units of d_ff (gate and up outputs, the SiLU)
ACT_ATTN_D = 2.0  # extra inputs saved when the attention projections train
ACT_LOGITS = 2.5  # floats per token, in units of vocab
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: sizes (counts of entries) and its MLP / attention layout."""

    params: int
    layers: int
    d: int
    d_ff: int
    heads: int
    vocab: int
    attention_params: int  # entries of the attention projections, all layers
    mlp_params: int  # entries of the MLP projections, all layers
    largest: int  # entries of the largest parameter tensor


def shape_of(model: nn.Module) -> ModelShape:
    """The shape of a model (real or on the meta device)."""
    cfg = model.config
    layers = neuron_layers(model)
    attention = sum(p.numel() for layer in layers for _, m in layer.attention for p in m.parameters(recurse=False))
    mlp = sum(layer.down.weight.numel() for layer in layers)
    mlp += sum(p.numel() for layer in layers for _, m in layer.ups for p in m.parameters(recurse=False))
    d_ff = int(layers[0].down.weight.shape[layers[0].down_dim])
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layers=len(layers),
        d=int(getattr(cfg, "hidden_size", None) or cfg.n_embd),
        d_ff=d_ff,
        heads=int(getattr(cfg, "num_attention_heads", None) or cfg.n_head),
        vocab=int(cfg.vocab_size),
        attention_params=attention,
        mlp_params=mlp,
        largest=max(p.numel() for p in model.parameters()),
    )


def shape_of_config(config) -> ModelShape:
    """The shape of the model a transformers config describes, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of(model)


def llama_config(layers: int, d: int, d_ff: int, heads: int, kv_heads: int, vocab: int, tied: bool = True):
    """A LlamaConfig of the given shape (e.g. SmolLM2-135M: 30, 576, 1536, 9, 3, 49152)."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=d_ff, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=2048)  # fmt: skip


# Shapes known without a download: the SmolLM2-135M release and a 1B-shaped Llama (Llama-3.2-1B's sizes).
KNOWN_SHAPES = {
    "smollm2-135m": dict(layers=30, d=576, d_ff=1536, heads=9, kv_heads=3, vocab=49152),
    "llama-1b": dict(layers=16, d=2048, d_ff=8192, heads=32, kv_heads=8, vocab=128256),
}


def shape_of_spec(spec: str, root=None) -> ModelShape:
    """The shape of a model spec (builtin / folder / hub id: its config only), or `shape:<name>` of
    `KNOWN_SHAPES` (e.g. `shape:smollm2-135m`, `shape:llama-1b`)."""
    if spec.startswith("shape:"):
        name = spec.split(":", 1)[1]
        if name not in KNOWN_SHAPES:
            raise SimuError(f"unknown shape '{name}'. Choose one of: {', '.join(KNOWN_SHAPES)}.")
        return shape_of_config(llama_config(**KNOWN_SHAPES[name]))
    from transformers import AutoConfig

    from simu_core.models import resolve_model_source

    source = resolve_model_source(spec, root=root)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SimuError(f"cannot read the config of '{spec}' ({err}). Give a model folder with config.json.") from err
    return shape_of_config(config)


@dataclass
class MemoryPlan:
    """Estimated peak bytes of one run on one device, by part; `fits` against `available` bytes."""

    method: str
    trainable: int  # trainable entries
    weights: int
    gradients: int
    optimizer: int
    curvature: int
    activations: int
    total: int
    device: str = ""
    available: int | None = None
    shards: int = 1  # processes the working copy (and what trains whole) is sharded over (FSDP), 1 = not sharded
    processes: int = 1  # processes the batch rows are shared by (= shards when sharded)

    @property
    def label(self) -> str:
        if self.shards > 1:
            return f"{self.method} /{self.shards}"
        return self.method if self.processes == 1 else f"{self.method} x{self.processes}"

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def trainable_entries(shape: ModelShape, config: UnlearnConfig, neurons: int) -> int:
    """Entries the method trains: all weights, or SIMU's attention (if on) + `neurons` neuron slices."""
    if get_method(config.method).whole_tensors:
        return shape.params
    per_neuron = shape.d * (3 if config.mlp_parts == "down_up" else 1)  # down column (+ gate, up rows)
    return (shape.attention_params if config.attention else 0) + neurons * per_neuron


def activation_bytes(shape: ModelShape, config: UnlearnConfig, seq_len: int, neurons: int, bf16: bool) -> int:
    """Bytes the forward passes over one forget and one retain batch keep for the backward."""
    full = get_method(config.method).whole_tensors
    eager = config.estimator == "hutchinson" and config.optimizer == "sophia"  # eager attention keeps the scores
    per_layer = ACT_FIXED_D * shape.d + ACT_FIXED_FF * shape.d_ff + shape.heads * (seq_len if eager else 1)
    if full or config.attention:
        per_layer += ACT_ATTN_D * shape.d
    per_layer += (shape.d + shape.d_ff) if full else 2 * neurons / max(1, shape.layers)
    rows = config.batch_size + (config.retain_batch_size if config.retain else 0)
    tokens = rows * seq_len
    layer_bytes = tokens * shape.layers * per_layer * (2 if bf16 else 4)
    if eager:
        layer_bytes *= 3  # the double backward keeps the first backward's graph
    return int(layer_bytes + tokens * ACT_LOGITS * shape.vocab * 4)


def curvature_bytes(trainable: int, config: UnlearnConfig) -> int:
    if config.optimizer != "sophia":
        return 0
    return 4 * trainable * {"gnb": 2, "hutchinson": 3, "sqgrad": 1}[config.estimator]


def plan(
    shape: ModelShape,
    config: UnlearnConfig,
    seq_len: int,
    *,
    neurons: int | None = None,
    neuron_fraction: float = 0.05,
    base_dtype: str = "float32",
    device: str = "cpu",
    available: int | None = None,
    shards: int = 1,
    processes: int | None = None,
) -> MemoryPlan:
    """Estimated peak bytes of `config` on a model of `shape` with rows of `seq_len` tokens.

    `neurons`: SIMU's selected neurons in all (default `neuron_fraction` of the MLP neurons).
    `base_dtype`: the loaded base model's dtype (bf16 on GPUs that support it). `available`: free
    bytes of the device, for `fits`. `processes`: processes the run is spread over (`--processes N`,
    data parallel: each with 1/N of the batch rows and everything else whole; default `shards`).
    `shards`: processes the run is sharded over (`--processes N --shard`, FSDP; 1 or `processes`),
    each with 1/N of the batch rows and 1/N of the float32 working copy, plus the weights FSDP gathers
    while it computes (the root's, i.e. embeddings and head, all along, and two decoder blocks at a
    time: one computing, one prefetched); the loaded base model stays whole. What FSDP trains (every tensor of a whole-tensor method, SIMU's attention when it
    trains) has 1/N of its gradients, optimiser state and curvature per process, plus, while a unit's
    gradient is reduced, its unsharded gradient and the reduce-scatter's flat copy (two more of the
    largest such unit). SIMU's neuron slices train through compact leaves that every process holds
    whole: their gradients and state do not divide. The total is at least the whole float32 copy on
    top of the loaded weights (before FSDP shards it, and when the run is gathered back at the end,
    with the trained entries or this process's shard, whichever is smaller).
    """
    if seq_len < 2:
        raise SimuError(f"sequence length must be >= 2 tokens (got {seq_len}).")
    if base_dtype not in DTYPE_BYTES:
        raise SimuError(f"unknown dtype '{base_dtype}'. Choose one of: {', '.join(DTYPE_BYTES)}.")
    if neurons is None:
        neurons = math.ceil(neuron_fraction * shape.d_ff * shape.layers)
    processes = shards if processes is None else processes
    if shards < 1 or processes < 1:
        raise SimuError(f"shards and processes must be >= 1 (got {shards}, {processes}).")
    if shards not in (1, processes):
        raise SimuError(f"a sharded run shards over all its {processes} processes: shards must be 1 or {processes} "
                        f"(got {shards}).")  # fmt: skip
    trainable = trainable_entries(shape, config, neurons)
    whole = trainable == shape.params
    in_fsdp = trainable if whole else (shape.attention_params if config.attention else 0)  # trained sharded

    def held(bytes_per_entry: int) -> int:  # bytes of one value per trained entry on this process
        return bytes_per_entry * in_fsdp // shards + bytes_per_entry * (trainable - in_fsdp)

    blocks = shape.attention_params + shape.mlp_params
    root, block = shape.params - blocks, blocks // shape.layers
    reduced = (max(root, block) if whole else shape.attention_params // shape.layers) if in_fsdp else 0
    gathered = 0 if shards == 1 else 4 * (root + 2 * block + 2 * reduced)
    weights = shape.params * DTYPE_BYTES[base_dtype] + 4 * shape.params // shards + gathered
    if config.loss in NEEDS_REFERENCE and device != "cpu":
        weights += shape.params * DTYPE_BYTES[base_dtype]
    gradients, optimizer = held(4), held(8)
    curvature = max(held(curvature_bytes(1, config)), 3 * 4 * min(trainable, shape.largest))
    bf16 = device.startswith("cuda") and base_dtype == "bfloat16"  # autocast on CUDA
    rows = {"batch_size": -(-config.batch_size // processes),
            "retain_batch_size": -(-config.retain_batch_size // processes)}  # fmt: skip
    activations = activation_bytes(shape, replace(config, **rows), seq_len, neurons, bf16)
    total = weights + gradients + optimizer + max(curvature, activations)
    if shards > 1:  # the working copy is whole until FSDP shards it, and the run is gathered back whole at the end
        loaded = weights - 4 * shape.params // shards - gathered
        total = max(total, loaded + 4 * shape.params + min(4 * trainable, 4 * shape.params // shards))
    return MemoryPlan(config.method, trainable, weights, gradients, optimizer, curvature, activations, total,
                      device, available, shards, processes)  # fmt: skip


def device_memory(device: str | None = None) -> tuple[str, int]:
    """(device name, its free bytes) for the device `device` names (`models.pick_device`)."""
    from simu_core.models import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})", free_bytes(dev)
    return ("cpu (RAM)" if dev.type == "cpu" else dev.type), free_bytes(dev)


def free_bytes(device: torch.device) -> int:
    """Free bytes on `device`: the CUDA GPU's free memory, MPS's recommended limit, else available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def check_fits(needed: int, available: int, device: torch.device, limit_gb: float | None = None) -> None:
    """SimuError when a run needing `needed` bytes does not fit (in `available` or the user's limit)."""
    limit = available if limit_gb is None else min(available, int(limit_gb * 1024**3))
    if needed > limit:
        raise SimuError(
            f"not enough memory: this run needs about {size_text(needed)} on {device.type} but only "
            f"{size_text(limit)} is available. Lower --batch-size, use method 'simu' (its state covers only the "
            "selected neurons), shard it over several processes (--processes N --shard), or run on a machine "
            "with more memory."
        )


def longest_row(loaded, *datasets, limit: int = 500) -> int:
    """Tokens of the longest encoded item (question + answer) among the first `limit` of each dataset."""
    from simu_core import data as qa

    longest = 2
    for dataset in datasets:
        if dataset is not None:
            items = qa.QADataset(dataset.name, dataset.items[:limit])
            longest = max([longest] + [len(e.ids) for e in qa.encode_dataset(loaded.tokenizer, loaded.fmt, items)])
    return longest


def batch_rows(config: UnlearnConfig, forget_items: int, retain_items: int) -> UnlearnConfig:
    """`config` with the rows its batches will have: at most the examples there are (`retain_items` 0:
    no retain set, so no retain rows; `plan` counts them when `retain` names a set)."""
    return replace(config, batch_size=min(config.batch_size, forget_items),
                   retain_batch_size=max(1, min(config.retain_batch_size, retain_items)),
                   retain=(config.retain or "given") if retain_items else "")  # fmt: skip


def run_plans(
    loaded, forget, retain, config: UnlearnConfig, neurons: int | None, device: str | None
) -> list[MemoryPlan]:
    """This run's plan and the comparison method's (SOUL for SIMU-like runs, else SIMU), on the device
    `device` names, with the batches as they will be (`batch_rows`)."""
    this = batch_rows(config, len(forget.items), len(retain.items) if retain else 0)
    other = "so_graddiff" if config.method != "so_graddiff" else "simu"
    configs = [this, preset_config(other, batch_size=this.batch_size, retain_batch_size=this.retain_batch_size,
                                   retain=this.retain)]  # fmt: skip
    name, free = device_memory(device)
    return compare(shape_of(loaded.model), configs, longest_row(loaded, forget, retain), neurons=neurons,
                   base_dtype=dtype_name(loaded.model), device=name.split(" ")[0], available=free)  # fmt: skip


def dtype_name(model: nn.Module) -> str:
    """The model's parameter dtype as `plan` names it (float32 for any it does not know)."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return dtype if dtype in DTYPE_BYTES else "float32"


def compare(shape: ModelShape, configs: list[UnlearnConfig], seq_len: int, **kwargs) -> list[MemoryPlan]:
    """One plan per config (e.g. SIMU and SOUL side by side), same shape, length and device."""
    return [plan(shape, c, seq_len, **kwargs) for c in configs]


def size_text(n_bytes: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


PARTS = ("weights", "gradients", "optimizer", "curvature", "activations", "total")


def table(plans: list[MemoryPlan]) -> str:
    """A plain-text table: one column per plan, one row per part, then whether it fits."""
    head = f"{'':<12}" + "".join(f"{p.label:>16}" for p in plans)
    rows = [head] + [f"{part:<12}" + "".join(f"{size_text(getattr(p, part)):>16}" for p in plans) for part in PARTS]
    rows.append(f"{'trainable':<12}" + "".join(f"{p.trainable:>16,}" for p in plans))
    if plans and plans[0].available is not None:
        rows.append(f"{'fits':<12}" + "".join(f"{'yes' if p.fits else 'NO':>16}" for p in plans))
        rows.append(f"device: {plans[0].device}, {size_text(plans[0].available)} free")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Measuring (to check the planner): peak resident memory of a call, Linux only
# --------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise SimuError(f"/proc/self/status has no {key}; measuring needs Linux.")


def measure_peak(fn) -> tuple[object, int]:
    """(fn(), the rise of peak resident memory during the call in bytes). Linux only.

    Resets the kernel's high-water mark (`/proc/self/clear_refs`), then reads VmHWM - VmRSS. Run the
    process with `MALLOC_MMAP_THRESHOLD_=65536` so that tensors above 64 KiB are their own mappings
    and go back to the system when freed (else malloc's heap may keep them and inflate the peak);
    call `fn` once before measuring so that lazily loaded code pages do not count.
    """
    import gc

    gc.collect()
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError as err:
        raise SimuError(f"cannot reset the peak memory counter ({err}); measuring needs Linux.") from err
    result = fn()
    return result, _status_bytes("VmHWM") - before


def plan_json(plans: list[MemoryPlan]) -> str:
    return json.dumps([p.to_dict() for p in plans])


def base_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
