"""Tokenizing a corpus once, and drawing calibration segments from it.

Calibration segments are `n` windows of `seqlen` tokens whose start offsets are drawn uniformly
from the tokenized calibration split with a seeded generator, so the same seed gives the same
segments on every machine. Segments may cross document boundaries (as the GPTQ reference code's
WikiText-2 sampler does). Calibration always reads the corpus's calibration split, which shares
no text with its evaluation split (see `slimlm.data.corpora`).
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedTokenizerBase

from slimlm.data.corpora import Corpus, load_corpus
from slimlm.errors import SlimlmError


def added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token id the tokenizer puts in front of a text it encodes (Llama 2/3, Gemma), or None when it
    adds none (GPT-2, SmolLM2, Qwen2: a BOS token may exist without being added)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return int(bos) if special[:1] == [bos] and plain[:1] != [bos] else None


def tokenize_corpus(tokenizer: PreTrainedTokenizerBase, corpus: Corpus) -> torch.Tensor:
    """The whole corpus as one 1-D tensor of token ids (joined with blank lines, tokenized once)."""
    ids = tokenizer(corpus.text, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() < 2:
        raise SlimlmError(f"corpus {corpus.name!r} ({corpus.source}) tokenizes to fewer than 2 tokens")
    return ids


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase,
    corpus: str | Corpus = "c4",
    num_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """`num_samples` random segments of `seqlen` tokens, shape (num_samples, seqlen), from the calibration split."""
    if num_samples < 1 or seqlen < 1:
        raise SlimlmError(f"calibration needs num_samples >= 1 and seqlen >= 1 (got {num_samples}, {seqlen})")
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, split="calibration", data_dir=data_dir)
    ids = tokenize_corpus(tokenizer, corpus)
    if ids.numel() < seqlen:
        raise SlimlmError(
            f"calibration corpus {corpus.name!r} has {ids.numel()} tokens, fewer than one segment of {seqlen}: "
            "lower --calib-seqlen or use a larger corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (num_samples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])
