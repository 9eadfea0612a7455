"""Tiny randomly initialised models of each supported family, built from a config (no download).

Used by the tests and by anyone who wants to try a method in seconds. Every model has 2 blocks,
hidden size 64 and grouped-query attention where the family has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

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
    "qwen3": dict(_COMMON, head_dim=16),
    "phi3": dict(_COMMON, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "phi": dict(_COMMON),
    "gpt_neox": dict(_COMMON),
    "falcon": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True, max_position_embeddings=512, bos_token_id=0, eos_token_id=0),
}
# Config changes that give the layers of one model different attention types (a sliding window shorter
# than the tests' segments on some layers, full attention on others), for tests of per-layer inputs.
MIXED_ATTENTION: dict[str, dict] = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
}
TINY_FAMILIES = tuple(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0, vocab_size: int | None = None, blocks: int = 2,
               **config) -> PreTrainedModel:
    """A random model of `family` with `blocks` decoder blocks (2 by default), in float32 eval mode;
    `config` overrides the tiny config's settings."""
    kwargs = dict(TINY_CONFIGS[family], **config)
    kwargs["n_layer" if family == "gpt2" else "num_hidden_layers"] = blocks
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
        kwargs.update({k: 0 for k in ("bos_token_id", "eos_token_id") if k in kwargs})
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 262 tokens for the tiny models (build them with `vocab_size=262`); with
    `adds_bos`, it puts its BOS token in front of every text it encodes, as Llama 2/3's and Gemma's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({char: index + 3 for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[("<|im_start|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny(directory: str | os.PathLike[str], family: str = "llama", blocks: int = 2, seed: int = 0) -> Path:
    """Save a tiny random model of `family` with the 262-token byte-level tokenizer, as a model folder the
    command line loads (tests and benchmarks of the command line)."""
    directory = Path(directory)
    tiny_model(family, seed=seed, vocab_size=262, blocks=blocks).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
