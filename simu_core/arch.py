"""Where the MLP neurons live in each model family (the adapter table).

A neuron of layer l is one intermediate unit of its MLP: one input of the MLP's output
projection. Its outgoing weights are one column of an `nn.Linear` weight (shape [d, d_ff]) or
one row of a GPT-2 `Conv1D` weight (stored [d_ff, d]). Its incoming weights (the input side:
gate/up projections) are the matching row (Linear) or column (Conv1D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from simu_core.errors import SimuError


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths of one model family, relative to the model root; `{i}` is the layer index."""

    layers: str  # path of the ModuleList of decoder blocks
    down: str  # output projection, relative to a block
    ups: tuple[str, ...]  # input-side projections (gate/up), relative to a block
    attention: tuple[str, ...]  # attention projections, relative to a block
    conv1d: bool = False  # GPT-2 style Conv1D (weight stored [in, out])


_LLAMA = FamilyAdapter(
    layers="model.layers",
    down="mlp.down_proj",
    ups=("mlp.gate_proj", "mlp.up_proj"),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
)
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gpt2": FamilyAdapter(
        layers="transformer.h",
        down="mlp.c_proj",
        ups=("mlp.c_fc",),
        attention=("attn.c_attn", "attn.c_proj"),
        conv1d=True,
    ),
    "gpt_neox": FamilyAdapter(
        layers="gpt_neox.layers",
        down="mlp.dense_4h_to_h",
        ups=("mlp.dense_h_to_4h",),
        attention=("attention.query_key_value", "attention.dense"),
    ),
    "opt": FamilyAdapter(
        layers="model.decoder.layers",
        down="fc2",
        ups=("fc1",),
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    ),
    "phi": FamilyAdapter(
        layers="model.layers",
        down="mlp.fc2",
        ups=("mlp.fc1",),
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    ),
}


@dataclass(frozen=True)
class NeuronLayer:
    """The MLP neurons of one decoder layer.

    `down` is the output projection; `down_dim` is the axis of its weight that indexes neurons
    (1 for Linear [d, d_ff], 0 for Conv1D [d_ff, d]). `ups` are the input-side projections and
    `up_dim` the axis of their weights that indexes neurons. `d_ff` is the neuron count.
    """

    index: int
    down_name: str
    down: nn.Module
    down_dim: int
    ups: tuple[tuple[str, nn.Module], ...]
    up_dim: int
    attention: tuple[tuple[str, nn.Module], ...]
    d_ff: int


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for `model`'s family, or a clear error naming the supported ones."""
    model_type = model_type_of(model)
    if model_type not in ADAPTERS:
        raise SimuError(
            f"unsupported model family '{model_type}'. Supported: {', '.join(sorted(ADAPTERS))}. "
            "Add an entry to simu_core.arch.ADAPTERS naming its MLP output projection."
        )
    return ADAPTERS[model_type]


def neuron_layers(model: nn.Module) -> list[NeuronLayer]:
    """One `NeuronLayer` per decoder layer of `model`, in order."""
    adapter = adapter_for(model)
    blocks = model.get_submodule(adapter.layers)
    prefix = adapter.layers
    down_dim, up_dim = (0, 1) if adapter.conv1d else (1, 0)
    result = []
    for i, block in enumerate(blocks):
        down = block.get_submodule(adapter.down)
        ups = tuple((f"{prefix}.{i}.{p}", block.get_submodule(p)) for p in adapter.ups)
        attention = tuple((f"{prefix}.{i}.{p}", block.get_submodule(p)) for p in adapter.attention)
        d_ff = down.weight.shape[down_dim]
        result.append(NeuronLayer(i, f"{prefix}.{i}.{adapter.down}", down, down_dim, ups, up_dim, attention, d_ff))
    return result


def neuron_widths(model: nn.Module) -> list[int]:
    """Number of MLP neurons (d_ff) in each layer."""
    return [layer.d_ff for layer in neuron_layers(model)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def neuron_out_weights(layer: NeuronLayer) -> torch.Tensor:
    """The output-projection weight with neurons on axis 0: shape [d_ff, d] (a view)."""
    w = layer.down.weight
    return w if layer.down_dim == 0 else w.t()
