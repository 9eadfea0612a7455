"""Token perplexity with the protocol of the GPTQ reference code.

Protocol (recorded in every result):
1. the documents are joined with "\\n\\n" and tokenized once (the tokenizer's default special tokens);
2. the token stream is cut into non-overlapping windows of `seqlen` tokens; the remainder is
   dropped; optionally only the first `max_windows` windows are used;
3. each window is scored independently (no context carried over): the model predicts tokens
   2..seqlen of the window from the ones before;
4. ppl = exp(mean negative log-likelihood over all predicted tokens).

BOS: a model whose tokenizer puts a BOS token in front of every text it encodes (Llama 2/3, Gemma) was
trained with one at the start of every sequence, and scores far worse without it. For such a tokenizer
every window is the BOS followed by `seqlen - 1` tokens of the stream (the stream without the BOS the
tokenizer put in front of the corpus), and the model predicts those `seqlen - 1` tokens, the first from
the BOS alone: as many predictions per window as without a BOS. A tokenizer that adds no BOS (SmolLM2,
GPT-2, Qwen2) gets steps 1-4 unchanged. Results record which (`bos`).

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

from slimlm.data.calibration import added_bos, tokenize_corpus
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
    bos: bool = False  # every window started with the tokenizer's BOS token (see the module docstring)

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


def corpus_windows(tokenizer: PreTrainedTokenizerBase, corpus: Corpus, seqlen: int,
                   max_windows: int | None = None) -> tuple[torch.Tensor, int, bool]:
    """The evaluation windows of `corpus`, shape (windows, seqlen), the number of windows the corpus holds,
    and whether each starts with the tokenizer's BOS (see the module docstring)."""
    ids = tokenize_corpus(tokenizer, corpus)
    bos = added_bos(tokenizer)
    if bos is None:
        return token_windows(ids, seqlen, max_windows), ids.numel() // seqlen, False
    if seqlen < 3:
        raise SlimlmError(f"seqlen must be at least 3 with a BOS token in front of each window (got {seqlen})")
    ids = ids[1:] if ids[:1].tolist() == [bos] else ids
    text = token_windows(ids, seqlen - 1, max_windows)
    windows = torch.cat([torch.full((len(text), 1), bos, dtype=text.dtype), text], dim=1)
    return windows, ids.numel() // (seqlen - 1), True


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


def perplexity_of_windows(
    model: PreTrainedModel, windows: torch.Tensor, desc: str = "ppl", kv_cache=None, kv_chunk: int = 128,
) -> tuple[float, int]:
    """(mean NLL, tokens scored) over `windows` (windows, seqlen); with a `kv_cache` spec
    (`slimlm.infer.quantized_cache.KVQuantSpec`) each window goes through that cache in chunks."""
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
    return total_nll / scored, scored


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
    windows, total, bos = corpus_windows(tokenizer, corpus, seqlen, max_windows)
    nll, scored = perplexity_of_windows(model, windows, desc=f"ppl {corpus.name}", kv_cache=kv_cache,
                                        kv_chunk=kv_chunk)
    return PerplexityResult(
        corpus=corpus.name, ppl=math.exp(nll), nll=nll, tokens_scored=scored, windows=len(windows),
        total_windows=total, seqlen=seqlen, source=corpus.source, bos=bos,
    )
