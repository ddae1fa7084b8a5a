"""The adapter table finds the MLP neurons of every supported family (tiny random models)."""

import pytest
import torch
import transformers as tf

from simu_core.arch import ADAPTERS, neuron_layers, neuron_out_weights, neuron_widths
from simu_core.errors import SimuError

D, D_FF, LAYERS = 32, 48, 2

TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(
        hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64
    ),
    "mistral": lambda: tf.MistralConfig(
        hidden_size=D,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "qwen2": lambda: tf.Qwen2Config(
        hidden_size=D,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "olmo": lambda: tf.OlmoConfig(
        hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64
    ),
    "gpt2": lambda: tf.GPT2Config(n_embd=D, n_inner=D_FF, n_layer=LAYERS, n_head=4, vocab_size=64, n_positions=32),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64
    ),
    "opt": lambda: tf.OPTConfig(
        hidden_size=D,
        ffn_dim=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=64,
        word_embed_proj_dim=D,
    ),
    "phi": lambda: tf.PhiConfig(
        hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64
    ),
}


def tiny_model(family: str):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_layer_has_d_ff_neurons(family):
    model = tiny_model(family)
    assert model.config.model_type in ADAPTERS
    assert neuron_widths(model) == [D_FF] * LAYERS


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_neuron_k_outgoing_weights_are_what_unit_k_writes(family):
    # Independent check of the row/column convention: feeding the one-hot unit k into the output
    # projection must add exactly neuron_out_weights[k] to its output.
    layer = neuron_layers(tiny_model(family))[0]
    k = 5
    one_hot = torch.zeros(1, D_FF)
    one_hot[0, k] = 1.0
    with torch.no_grad():
        written = layer.down(one_hot) - layer.down(torch.zeros(1, D_FF))
    torch.testing.assert_close(written[0], neuron_out_weights(layer)[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_input_side_and_attention_modules_are_found(family):
    layer = neuron_layers(tiny_model(family))[1]
    assert layer.ups and layer.attention
    for _, up in layer.ups:
        assert up.weight.shape[layer.up_dim] == D_FF


def test_unsupported_family_names_the_supported_ones():
    model = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(hidden_size=D, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(SimuError, match="unsupported model family 'bloom'.*llama"):
        neuron_layers(model)
