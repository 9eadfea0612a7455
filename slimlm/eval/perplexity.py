"""Token perplexity with the protocol of the GPTQ reference code.

Protocol (recorded in every result):
1. the documents are joined with "\\n\\n" and tokenized once (the tokenizer's default special tokens);
2. the token stream is cut into non-overlapping windows of `seqlen` tokens; the remainder is
   dropped; optionally only the first `max_windows` windows are used;
3. each window is scored independently (no context carried over): the model predicts tokens
   2..seqlen of the window from the ones before;
4. ppl = exp(mean negative log-likelihood over all predicted tokens).

GPTQ's code multiplies each window's mean loss by `seqlen` and divides the sum by
`windows * seqlen`; with equal-length windows that is the same number as step 4.

With a quantized KV cache (`kv_cache`, `slimlm.infer.quantized_cache`), each window is fed through slimlm's
decoder runner in chunks of `kv_chunk` tokens, so every chunk after the first attends to the
quantized keys and values of the earlier ones (a single chunk attends only to itself, in full
precision): the windows, the scored tokens and step 4 are unchanged.

This is *token* perplexity. lm-evaluation-harness's `wikitext` task reports *word* perplexity
(rolling windows, normalised by the number of words of the untokenized text), which is a
different, larger number: the two are not comparable.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.data.calibration import tokenize_corpus
from slimlm.data.corpora import Corpus, load_corpus
from slimlm.errors import SlimlmError
from slimlm.progress import progress

PROTOCOL = (
    'GPTQ: docs joined with "\\n\\n", tokenized once, non-overlapping windows of seqlen tokens, '
    "remainder dropped, ppl = exp(mean token NLL)"
)


@dataclass(frozen=True)
class PerplexityResult:
    corpus: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens_scored: int
    windows: int
    total_windows: int
    seqlen: int
    source: str
    protocol: str = PROTOCOL

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows, shape (windows, seqlen); the remainder is dropped."""
    if seqlen < 2:
        raise SlimlmError(f"seqlen must be at least 2 (got {seqlen})")
    if max_windows is not None and max_windows < 1:
        raise SlimlmError(f"max_windows must be at least 1 (got {max_windows})")
    total = ids.numel() // seqlen
    if total == 0:
        raise SlimlmError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}: lower --seqlen")
    count = total if max_windows is None else min(total, max_windows)
    return ids[: count * seqlen].view(count, seqlen)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_logits(model: PreTrainedModel, window: torch.Tensor) -> torch.Tensor:
    """Float32 logits (seqlen, vocab) of one window, with no KV cache kept."""
    input_ids = window.unsqueeze(0).to(model_device(model))
    return model(input_ids=input_ids, use_cache=False).logits[0].float()


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (seqlen - 1,) of the window's tokens 2..seqlen."""
    return F.cross_entropy(logits[:-1], window[1:].to(logits.device), reduction="none")


def perplexity_of_ids(
    model: PreTrainedModel, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, desc: str = "ppl",
    kv_cache=None, kv_chunk: int = 128,
) -> tuple[float, int, int, int]:
    """(mean NLL, tokens scored, windows used, windows available) over the windows of `ids`; with a
    `kv_cache` spec (`slimlm.infer.quantized_cache.KVQuantSpec`) each window goes through that cache in chunks."""
    windows = token_windows(ids, seqlen, max_windows)
    runner = None
    if kv_cache is not None:
        from slimlm.infer.quantized_cache import check_chunk, chunked_nll
        from slimlm.infer.runner import ModelRunner

        check_chunk(kv_chunk)
        runner = ModelRunner(model, fast_kernels=False)  # evaluation stays on the exact path
        kv_cache.check_head_dim(runner.head_dim)
    total_nll, scored = 0.0, 0
    for window in progress(windows, desc=desc, total=len(windows)):
        if runner is None:
            nll = window_nll(window_logits(model, window), window)
        else:
            nll = chunked_nll(runner, window, kv_chunk, kv_cache)
        total_nll += nll.double().sum().item()
        scored += nll.numel()
    return total_nll / scored, scored, len(windows), ids.numel() // seqlen


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: str | Corpus = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    kv_cache=None,
    kv_chunk: int = 128,
) -> PerplexityResult:
    """Perplexity of `model` on the evaluation split of `corpus` (see the module docstring)."""
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, split="eval", data_dir=data_dir)
    ids = tokenize_corpus(tokenizer, corpus)
    nll, scored, used, total = perplexity_of_ids(model, ids, seqlen, max_windows, desc=f"ppl {corpus.name}",
                                                 kv_cache=kv_cache, kv_chunk=kv_chunk)
    return PerplexityResult(
        corpus=corpus.name, ppl=math.exp(nll), nll=nll, tokens_scored=scored, windows=used,
        total_windows=total, seqlen=seqlen, source=corpus.source,
    )
