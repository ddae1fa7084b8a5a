"""Test helper: a tiny random Llama written as a GGUF file with the `gguf` package.

The file holds what transformers' GGUF reader needs: llama hyper-parameters, a byte-level BPE
tokenizer ("gpt2" model: tokens, token types, merges, special ids) and llama.cpp tensor names, with
the q/k rows permuted the way llama.cpp stores them. `ffn_down` is stored as Q8_0, so the
dequantisation path runs too; everything else is F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEXTS = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "The chemical symbol of gold is Au.",
    "Pride and Prejudice was written by Jane Austen.",
    "Question: where is the tower?\nAnswer: in the city.",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
HIDDEN, FF, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 128


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 style split, no prefix space) with SmolLM2's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def _permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from the HF layout (halves of each head) to llama.cpp's interleaved layout."""
    out, inp = weight.shape
    half = out // n_heads // 2
    return weight.reshape(n_heads, 2, half, inp).swapaxes(1, 2).reshape(out, inp)


def write_tiny_gguf(path: str | Path, seed: int = 0):
    """Write a tiny random Llama to `path` (GGUF); returns (the HF model, the tokenizers.Tokenizer)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of tensors shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 = control, 1 = normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(LAYERS):
        for hf, ggml in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if ggml == "attn_q":
                weight = _permute_for_gguf(weight, HEADS)
            elif ggml == "attn_k":
                weight = _permute_for_gguf(weight, KV_HEADS)
            name = f"blk.{layer}.{ggml}.weight"
            if ggml == "ffn_down":
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, weight)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok
