"""Small transformers built from configs (no downloads), for the demo, tests and benchmarks."""
from __future__ import annotations

import torch

#: hidden, layers, attention heads, key/value heads, MLP width
LLAMA_SIZES = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (128, 4, 4, 2, 256),
    "base": (256, 6, 8, 4, 768),
}


def llama_config(vocab_size: int, size: str = "tiny", max_positions: int = 64):
    """A ``LlamaConfig`` of one of :data:`LLAMA_SIZES` for a given vocabulary."""
    from transformers import LlamaConfig
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(LLAMA_SIZES)}")
    hidden, layers, heads, kv, inter = LLAMA_SIZES[size]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)


def tiny_llama(vocab_size: int, size: str = "tiny", seed: int = 0, max_positions: int = 64):
    """A randomly initialised ``LlamaForCausalLM`` (seeded, float32, eager attention)."""
    from transformers import LlamaForCausalLM
    cfg = llama_config(vocab_size, size, max_positions)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def qwen3_06b_shapes(layers: int = 28, embedding: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Qwen3-0.6B-like model (hidden 1024, MLP 3072, 16 query and
    8 key/value heads of width 128), ``layers`` deep: the benchmark parameter set."""
    h, inter, hd, nq, nkv = 1024, 3072, 128, 16, 8
    out: list[tuple[str, tuple[int, ...]]] = []
    if embedding:
        out.append(("model.embed_tokens.weight", (151936, h)))
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (nq * hd, h)),
                (p + "self_attn.k_proj.weight", (nkv * hd, h)),
                (p + "self_attn.v_proj.weight", (nkv * hd, h)),
                (p + "self_attn.o_proj.weight", (h, nq * hd)),
                (p + "self_attn.q_norm.weight", (hd,)),
                (p + "self_attn.k_norm.weight", (hd,)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    return out
