"""KL divergence of a model's next-token distribution from a reference model's, as llama.cpp reports it.

For every predicted position t of every window (same windows as the perplexity protocol),
with P the reference distribution and Q the evaluated model's:

    KL(P || Q)_t = sum_v P_t(v) * (log P_t(v) - log Q_t(v))

Reported: the mean over all positions (the headline number), median, 99th percentile and maximum,
and top-1 agreement: the share of positions where both models put the most probability on the
same token (llama.cpp's "Same top p"). Unlike llama.cpp, which scores only the second half of each
window, every position of the window is scored; the reference perplexity comes out of the same
pass, so both perplexities are reported beside the KL.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.data.corpora import Corpus, load_corpus
from slimlm.eval.perplexity import PROTOCOL, corpus_windows, window_logits, window_nll
from slimlm.progress import progress


@dataclass(frozen=True)
class KLResult:
    corpus: str
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl: float
    ppl_reference: float
    tokens_scored: int
    windows: int
    seqlen: int
    protocol: str = "KL(reference || model) per predicted token over the windows of the perplexity protocol: " + PROTOCOL
    bos: bool = False  # every window started with the tokenizer's BOS token (as in the perplexity protocol)

    def to_dict(self) -> dict:
        return asdict(self)


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) for each row of two (positions, vocab) logit tensors."""
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def kl_divergence(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: str | Corpus = "wikitext2",
    seqlen: int = 512,
    max_windows: int | None = 40,
    data_dir: str | os.PathLike[str] | None = None,
) -> KLResult:
    """KL divergence of `model` from `reference` on the evaluation split of `corpus`."""
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, split="eval", data_dir=data_dir)
    windows, _, bos = corpus_windows(tokenizer, corpus, seqlen, max_windows)
    kls, agree, nll, nll_ref = [], 0, 0.0, 0.0
    for window in progress(windows, desc=f"kl {corpus.name}", total=len(windows)):
        ref_logits = window_logits(reference, window)
        logits = window_logits(model, window).to(ref_logits.device)
        kls.append(token_kl(ref_logits[:-1], logits[:-1]).cpu())
        agree += (ref_logits[:-1].argmax(-1) == logits[:-1].argmax(-1)).sum().item()
        nll += window_nll(logits, window).double().sum().item()
        nll_ref += window_nll(ref_logits, window).double().sum().item()
    values = torch.cat(kls).double()
    count = values.numel()
    return KLResult(
        corpus=corpus.name,
        kl_mean=values.mean().item(),
        kl_median=values.median().item(),
        kl_p99=torch.quantile(values, 0.99).item(),
        kl_max=values.max().item(),
        top1_agreement=agree / count,
        ppl=math.exp(nll / count),
        ppl_reference=math.exp(nll_ref / count),
        tokens_scored=count,
        windows=len(windows),
        seqlen=seqlen,
        bos=bos,
    )
