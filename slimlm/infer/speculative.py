"""Speculative decoding (Leviathan, Kalman and Matias, 2023, "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1; the same scheme as Chen et al., 2023, "speculative sampling").

Each iteration, with committed tokens S (prompt + output so far):

1. the draft model M_q proposes gamma tokens x_1..x_gamma autoregressively, x_i ~ q_i = q(. | S, x_<i);
2. the target M_p scores S[-1], x_1..x_gamma in ONE forward pass, giving p_1..p_{gamma+1};
3. for i = 1..gamma: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
   sample the replacement from the residual norm(max(0, p_i - q_i)) and stop;
4. if all gamma were accepted, sample one extra token from p_{gamma+1}.

Each token then has exactly the target's distribution (Leviathan et al., Theorem 3.5 / Appendix
A.1), where p and q are the processed distributions (temperature, top-k, top-p applied to both,
`slimlm.infer.sampling`). Greedy decoding is the one-hot case: x_i is accepted iff it is the
target's argmax, and the replacement is the target's argmax, so the output equals the target's
own greedy tokens.

Draft and target keep their own KV caches; after each iteration both are rolled back (`truncate`)
to the committed prefix, so rejected tokens leave nothing behind. Both caches hold S[:-1] between
iterations (the draft may lag by one token after a full acceptance and then feeds two tokens).

Adaptive gamma (optional, a heuristic in the spirit of Leviathan et al. Sec. 3.5's choice of gamma
from the acceptance rate): after an iteration that accepts all gamma drafts, gamma grows by 1 (up
to `max_gamma`); after one that rejects the first draft, gamma shrinks by 1 (down to 1).

Batch 1: prompts of a batch are decoded one after another. The draft must share the target's
vocabulary (`check_compatible`: same logits width; with tokenizers, the same vocabulary and the same
ids for a probe string).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.infer.cache import ContiguousCache, PagedCache
from slimlm.infer.engine import CacheSettings, GenerationResult, GenerationStats, as_runner, validate_request
from slimlm.infer.runner import ModelRunner
from slimlm.infer.sampling import SamplingSettings, choose, next_token_probs, sample

PROBE_TEXT = "Speculative decoding: 123 tokens, ünïcode & code() {}\n"


@dataclass
class SpeculativeStats:
    gamma: int  # initial
    adaptive: bool
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    iterations: int = 0  # = target verification forwards
    draft_forwards: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    final_gamma: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.iterations if self.iterations else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_forward": self.tokens_per_target_forward, "tokens_per_s": self.tokens_per_s}


def check_gamma(gamma: int, max_gamma: int | None = None) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise SlimlmError(f"gamma (draft tokens per step) must be an integer >= 1, got {gamma!r}")
    if max_gamma is not None and max_gamma < gamma:
        raise SlimlmError(f"max_gamma ({max_gamma}) must be >= gamma ({gamma})")


def check_compatible(target: ModelRunner, draft: ModelRunner, target_tokenizer: PreTrainedTokenizerBase | None = None,
                     draft_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """The draft must propose tokens in the target's vocabulary, with the same ids."""
    if target.vocab_size != draft.vocab_size:
        raise SlimlmError(f"the draft model's vocabulary ({draft.vocab_size} logits) differs from the target's "
                          f"({target.vocab_size}): speculative decoding needs a draft with the same tokenizer")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    same_vocab = (len(target_tokenizer) == len(draft_tokenizer)
                  and target_tokenizer.get_vocab() == draft_tokenizer.get_vocab())
    same_ids = target_tokenizer.encode(PROBE_TEXT) == draft_tokenizer.encode(PROBE_TEXT)
    if not (same_vocab and same_ids):
        raise SlimlmError("the draft model's tokenizer differs from the target's (vocabulary or the ids of a probe "
                          "string): speculative decoding needs a draft with the same tokenizer")


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to sample after a rejection (Leviathan et al., Algorithm 1)."""
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return residual / total if total > 0 else p  # total = 0 only if p == q, where nothing is ever rejected


def verify(drafts: Sequence[int], q: torch.Tensor, p: torch.Tensor, settings: SamplingSettings,
           generator: torch.Generator | None) -> tuple[int, int]:
    """Modified rejection sampling. `q` [gamma, vocab]: the draft's distributions of the drafted tokens;
    `p` [gamma + 1, vocab]: the target's. Returns (number of drafts accepted, the token that follows them)."""
    device = generator.device if generator is not None else p.device  # a generator draws on its own device
    for i, token in enumerate(drafts):
        ratio = (p[i, token] / q[i, token]).item()
        if ratio >= 1 or torch.rand((), generator=generator, device=device).item() < ratio:
            continue
        if settings.greedy:
            return i, int(p[i].argmax())
        return i, int(sample(residual_distribution(p[i], q[i])[None], generator))
    return len(drafts), int(choose(p[len(drafts)][None], settings, generator))


def _cache(runner: ModelRunner, kind: str, capacity: int, block_size: int):
    shape = runner.cache_shape()
    if kind == "paged":
        return PagedCache.for_lengths(shape, [capacity], block_size)
    if kind == "contiguous":
        return ContiguousCache(shape, 1, capacity)
    raise SlimlmError(f"speculative decoding needs a cache it can roll back (contiguous or paged), not {kind!r}")


@torch.no_grad()
def speculative_decode(target: PreTrainedModel | ModelRunner, draft: PreTrainedModel | ModelRunner,
                       prompt: Sequence[int], max_new_tokens: int, gamma: int = 4,
                       sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
                       eos_token_ids: Sequence[int] = (), adaptive: bool = False, max_gamma: int = 16,
                       generator: torch.Generator | None = None) -> tuple[list[int], SpeculativeStats]:
    """Generate up to `max_new_tokens` tokens after `prompt` (ids) with speculative decoding."""
    validate_request([prompt], max_new_tokens)
    check_gamma(gamma, max_gamma if adaptive else None)
    if cache.kv_quant is not None:
        raise SlimlmError("speculative decoding rolls its caches back, which a quantized KV cache cannot do: "
                          "use the contiguous or paged cache")
    target, draft = as_runner(target), as_runner(draft)
    check_compatible(target, draft)
    if target.device != draft.device:
        raise SlimlmError(f"the draft model is on {draft.device} and the target on {target.device}: "
                          "speculative decoding compares their distributions, so put both on one device")
    stats = SpeculativeStats(gamma, adaptive, final_gamma=gamma)
    start = time.perf_counter()
    capacity = len(prompt) + max_new_tokens + (max_gamma if adaptive else gamma) + 1
    target_cache = _cache(target, cache.kind, capacity, cache.block_size)
    draft_cache = _cache(draft, cache.kind, capacity, cache.block_size)
    generator = generator if generator is not None else sampling.generator(target.device)
    committed, output, stop = list(prompt), [], set(eos_token_ids)
    if len(prompt) > 1:  # both caches hold everything but the last committed token
        head = torch.tensor(prompt[:-1])[None]
        target.forward(head, [head.shape[1]], target_cache)
        draft.forward(head, [head.shape[1]], draft_cache)
    while len(output) < max_new_tokens and not (output and output[-1] in stop):
        step = min(gamma, max_new_tokens - len(output))
        drafts, q = _propose(draft, draft_cache, committed, step, sampling, generator, stats)
        block = torch.tensor([committed[-1], *drafts])[None]
        p = next_token_probs(target.forward(block, [block.shape[1]], target_cache, all_logits=True)[0], sampling)
        accepted, following = verify(drafts, q, p, sampling, generator)
        new = (drafts[:accepted] + [following])[: max_new_tokens - len(output)]
        new = _cut_at_stop(new, stop)
        target_cache.truncate(0, len(committed) + accepted)
        draft_cache.truncate(0, min(draft_cache.lengths[0], len(committed) + accepted))
        committed += new
        output += new
        if not stats.iterations:
            stats.time_to_first_token_s = time.perf_counter() - start
        stats.iterations += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        if adaptive:
            gamma = adapted_gamma(gamma, accepted, len(drafts), max_gamma)
    stats.new_tokens, stats.final_gamma = len(output), gamma
    stats.total_s = time.perf_counter() - start
    return output, stats


def adapted_gamma(gamma: int, accepted: int, drafted: int, max_gamma: int) -> int:
    """+1 after a full acceptance (the draft is doing well: draft further), -1 after the first draft
    was rejected (the draft work was wasted), else unchanged; kept within [1, max_gamma]."""
    if accepted == drafted:
        return min(gamma + 1, max_gamma)
    if accepted == 0:
        return max(1, gamma - 1)
    return gamma


def _propose(draft: ModelRunner, cache, committed: list[int], count: int, sampling: SamplingSettings,
             generator: torch.Generator | None, stats: SpeculativeStats) -> tuple[list[int], torch.Tensor]:
    """`count` draft tokens and the draft distributions they were drawn from, [count, vocab]."""
    feed = committed[cache.lengths[0]:]  # the last committed token, or two after a full acceptance
    logits = draft.forward(torch.tensor(feed)[None], [len(feed)], cache)
    drafts, distributions = [], []
    for i in range(count):
        q = next_token_probs(logits[0], sampling)
        token = int(choose(q[None], sampling, generator))
        drafts.append(token)
        distributions.append(q)
        if i < count - 1:
            logits = draft.forward(torch.tensor([[token]]), [1], cache)
    stats.draft_forwards += count
    return drafts, torch.stack(distributions)


def _cut_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[: index + 1]
    return tokens


def speculative_generate(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         prompts: str | Sequence[str], max_new_tokens: int = 64, gamma: int = 4,
                         sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
                         draft_tokenizer: PreTrainedTokenizerBase | None = None, adaptive: bool = False,
                         stop_at_eos: bool = True, max_gamma: int = 16) -> tuple[GenerationResult, list[SpeculativeStats]]:
    """Text in, text out: each prompt decoded speculatively (one after another), with per-prompt statistics."""
    from slimlm.infer.engine import encode_prompts, eos_ids

    ids = encode_prompts(tokenizer, prompts)
    validate_request(ids, max_new_tokens)
    check_gamma(gamma, max_gamma if adaptive else None)
    target_runner, draft_runner = ModelRunner(target), ModelRunner(draft)
    check_compatible(target_runner, draft_runner, tokenizer, draft_tokenizer or tokenizer)
    stop = eos_ids(target, tokenizer) if stop_at_eos else []
    generator = sampling.generator(target_runner.device)
    outputs, all_stats = [], []
    for prompt in ids:
        tokens, stats = speculative_decode(target_runner, draft_runner, prompt, max_new_tokens, gamma, sampling,
                                           cache, stop, adaptive, max_gamma, generator=generator)
        outputs.append(tokens)
        all_stats.append(stats)
    summary = GenerationStats([len(p) for p in ids], [len(t) for t in outputs], cache.kind,
                              time_to_first_token_s=all_stats[0].time_to_first_token_s,
                              total_s=sum(s.total_s for s in all_stats))
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    return GenerationResult(outputs, summary, texts), all_stats
