"""Tiny randomly initialised models of each supported family, built from a config (no download).

Used by the tests and by anyone who wants to try a method in seconds. Every model has 2 blocks,
hidden size 64 and grouped-query attention where the family has it.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=False),
    "qwen2": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16),
    "gemma3_text": dict(_COMMON, head_dim=16),
    "opt": dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=512),
    "gpt2": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0),
}
TINY_FAMILIES = tuple(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0, vocab_size: int | None = None, blocks: int = 2) -> PreTrainedModel:
    """A random model of `family` with `blocks` decoder blocks (2 by default), in float32 eval mode."""
    kwargs = dict(TINY_CONFIGS[family])
    kwargs["n_layer" if family == "gpt2" else "num_hidden_layers"] = blocks
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
        kwargs.update({k: 0 for k in ("bos_token_id", "eos_token_id") if k in kwargs})
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
