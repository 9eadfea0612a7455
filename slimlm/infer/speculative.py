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
own greedy tokens. The greedy path compares argmaxes directly (no distributions are built).

As plain decoding does (`slimlm.infer.engine`), the target first prefills the whole prompt and the
first token comes from that forward's last logits; the iterations start from there. The caches
hold S[:-1] between iterations and are rolled back (`truncate`) to it after each verification, so
rejected tokens leave nothing behind. A draft with a cache of its own prefills the prompt too and
may lag by one token after a full acceptance (it then feeds two); a draft built from the target
(`slimlm.infer.draft`) decodes in the target's own cache instead (`share_cache`).

The verification forward runs with `exact_rows` (`slimlm.infer.runner.ModelRunner.forward`):
attention one query at a time, as single-token steps compute it. On the bf16 decode path, with a
target whose linears are all PyTorch's packed int4/int8 kernels (which compute each row the same way
for any number of rows, e.g. `rtn-w4g64-head8`), the verified logits are then bitwise those of plain
decoding, so greedy speculative output is plain greedy output even though bfloat16 activations round
coarsely. On the native path, and for a float32 target, a multi-row verification sums in another order
than a one-token step (float32 rounding, about 1e-7 relative): a greedy token can then differ from
plain decoding only at an exact near-tie (the benchmark checks every run).

Choosing gamma (the default, `gamma=None`). Leviathan et al. (Sec. 3.3, Theorem 3.8) give the
expected improvement in walltime of one iteration, for a per-token acceptance rate alpha, a draft
step that costs c target steps, and a verification forward that costs as much as one target step:

    (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + 1))

and choose gamma by maximising it (their Sec. 3.5 / Figure 3). On a CPU a forward over gamma + 1
tokens costs more than one over a single token, so slimlm replaces the 1 by the measured
v(gamma) = T_target(gamma + 1 tokens) / T_target(1 token). What is measured and how:

- c and v(gamma), per draft/target pair (`measure_costs`): the first time a pair decodes with an
  automatic gamma, right after the prompt is prefilled and on the real caches, the target runs one
  forward over each of 1..max_gamma + 1 new tokens (1 token `CALIBRATION_REPEATS` times) and the
  draft `CALIBRATION_REPEATS` single-token steps, alternating, each followed by a truncation back to
  the prompt (the tokens fed are the prompt's own, so the work is that of decoding). That is
  max_gamma + CALIBRATION_REPEATS target forwards, once per pair (`SpeculativeStats.calibration_s`,
  counted in that call's time). After it, every verification forward and every single-token draft
  step is timed as it runs and kept (the `COST_SAMPLES` most recent per width); c and v are medians
  of what is kept, so they follow the widths actually used. The target's timings are kept per target
  and shared by all its drafts (a second draft of a measured target times only width 1 and its own
  steps); acceptance counts and draft timings per pair (its two models and runner types). Both are
  forgotten with their models (`forget_costs` drops them by hand).
- alpha, online. Heuristic (slimlm's, not the paper's): alpha is estimated as the maximum-likelihood
  value of the paper's i.i.d. model from the tokens seen so far, accepted / (accepted + rejections)
  (a rejection is an iteration that stopped at a draft; a fully accepted iteration is a censored
  observation), smoothed by a prior of `ALPHA_PRIOR` worth `ALPHA_PRIOR_WEIGHT` tokens, and pooled
  over earlier calls of the same pair (their counts decayed to at most `ALPHA_HISTORY` tokens).
  gamma is re-chosen before every iteration as the maximiser of the formula above over
  1..min(max_gamma, AUTO_MAX_GAMMA) (`choose_gamma`), so a draft that stops agreeing gets shorter
  proposals. When even the best gamma is expected to lose (expected speedup < 1: a draft too slow or
  too often wrong for this target on this machine), the iteration is a plain target step instead
  (gamma = 0, no draft work); every `PROBE_EVERY`-th such iteration drafts one token anyway, so that
  alpha keeps being measured. Plain steps also keep measuring T_target(1 token), the normaliser.

`adaptive=True` keeps slimlm's earlier heuristic (+1 after a full acceptance, -1 after a rejection
of the first draft; within [1, max_gamma]) starting from `gamma` (4 when None).

Batch 1: prompts of a batch are decoded one after another. The draft must share the target's
vocabulary (`check_compatible`: same logits width; with tokenizers, the same vocabulary and the same
ids for a probe string).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.errors import SlimlmError
from slimlm.infer.cache import ContiguousCache, PagedCache
from slimlm.infer.engine import CacheSettings, GenerationResult, GenerationStats, as_runner, validate_request
from slimlm.infer.sampling import SamplingSettings, choose, next_token_probs, sample

PROBE_TEXT = "Speculative decoding: 123 tokens, ünïcode & code() {}\n"
AUTO_MAX_GAMMA = 6  # the automatic choice searches gamma in 1..min(max_gamma, 6)
CALIBRATION_REPEATS = 2  # target forwards over 1 token (and draft steps) timed when a pair is first seen
COST_SAMPLES = 15  # recent timings kept per width (the costs are their medians)
ALPHA_PRIOR = 0.75  # prior per-token acceptance before a pair has been seen ...
ALPHA_PRIOR_WEIGHT = 4.0  # ... worth this many observed tokens
ALPHA_HISTORY = 256.0  # earlier calls of a pair count for at most this many tokens
PROBE_EVERY = 16  # while drafting is expected to lose: plain steps between two gamma = 1 probes


@dataclass
class SpeculativeStats:
    gamma: int | None  # initial (None: chosen automatically)
    adaptive: bool
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # iterations that stopped at a rejected draft
    iterations: int = 0  # = target verification forwards (plain steps included)
    plain_steps: int = 0  # iterations without drafts (the last token, or drafting expected to lose)
    draft_forwards: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    draft_s: float = 0.0  # time in draft forwards
    target_s: float = 0.0  # time in target forwards (prefill excluded)
    calibration_s: float = 0.0  # measuring c and v (first call of a draft/target pair only)
    final_gamma: int = 0
    shared_cache: bool = False  # the draft decoded in the target's KV cache
    gammas: list[int] = field(default_factory=list)  # drafts per iteration
    costs: dict | None = None  # SpeculativeCosts.to_dict() of the pair, when gamma was chosen from them

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (drafts after a rejection count as not accepted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def alpha(self) -> float:
        """The per-token acceptance rate of Leviathan et al.'s i.i.d. model, estimated as
        accepted / (accepted + rejections) (maximum likelihood; fully accepted iterations are censored)."""
        seen = self.accepted + self.rejections
        return self.accepted / seen if seen else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.iterations if self.iterations else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "alpha": self.alpha,
                "tokens_per_target_forward": self.tokens_per_target_forward, "tokens_per_s": self.tokens_per_s}


def expected_speedup(alpha: float, gamma: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """Leviathan et al. Theorem 3.8, (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + v)), with the
    verification forward costing `verify_ratio` target steps (the paper assumes 1)."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + verify_ratio)


@dataclass(frozen=True)
class SpeculativeCosts:
    """Measured seconds of one draft/target pair: target forwards over k new tokens, one draft step."""

    target_s: dict[int, float]  # k -> median seconds, k = 1..max_gamma + 1
    draft_s: float
    context: int  # tokens in the caches when measured
    seconds: float = 0.0  # what measuring took

    @property
    def max_gamma(self) -> int:
        return max(self.target_s) - 1

    @property
    def cost_ratio(self) -> float:
        """c: a draft step / a target step."""
        return self.draft_s / self.target_s[1]

    def verify_ratio(self, gamma: int) -> float:
        """v(gamma): a target forward over gamma + 1 tokens / over 1 token."""
        return self.target_s[gamma + 1] / self.target_s[1]

    def expected_speedup(self, alpha: float, gamma: int) -> float:
        return expected_speedup(alpha, gamma, self.cost_ratio, self.verify_ratio(gamma))

    def to_dict(self) -> dict:
        return {"target_s": {str(k): v for k, v in self.target_s.items()}, "draft_s": self.draft_s,
                "context": self.context, "seconds": self.seconds, "cost_ratio_c": self.cost_ratio,
                "verify_ratio_v": {str(g): self.verify_ratio(g) for g in range(1, self.max_gamma + 1)}}


def choose_gamma(alpha: float, costs: SpeculativeCosts, max_gamma: int | None = None) -> tuple[int, float]:
    """(gamma, expected speedup): the gamma in 1..max_gamma that maximises `costs.expected_speedup(alpha, .)`
    (the smallest such gamma on a tie)."""
    limit = costs.max_gamma if max_gamma is None else min(max_gamma, costs.max_gamma)
    if limit < 1:
        raise SlimlmError(f"no gamma to choose from: max_gamma is {limit}")
    alpha = min(max(alpha, 0.0), 1.0)
    best = max(range(1, limit + 1), key=lambda g: (costs.expected_speedup(alpha, g), -g))
    return best, costs.expected_speedup(alpha, best)


def check_gamma(gamma: int | None, max_gamma: int | None = None) -> None:
    """gamma: an integer >= 1, or None (chosen automatically); max_gamma (when given) >= 1 and >= gamma."""
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1):
        raise SlimlmError(f"gamma (draft tokens per step) must be an integer >= 1 (or None: chosen automatically), "
                          f"got {gamma!r}")
    if max_gamma is not None:
        if isinstance(max_gamma, bool) or not isinstance(max_gamma, int) or max_gamma < 1:
            raise SlimlmError(f"max_gamma must be an integer >= 1, got {max_gamma!r}")
        if gamma is not None and max_gamma < gamma:
            raise SlimlmError(f"max_gamma ({max_gamma}) must be >= gamma ({gamma})")


def check_compatible(target, draft, target_tokenizer: PreTrainedTokenizerBase | None = None,
                     draft_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """The draft must propose tokens in the target's vocabulary, with the same ids."""
    if target.vocab_size != draft.vocab_size:
        raise SlimlmError(f"the draft model's vocabulary ({draft.vocab_size} logits) differs from the target's "
                          f"({target.vocab_size}): speculative decoding needs a draft with the same tokenizer")
    if target_tokenizer is None or draft_tokenizer is None or target_tokenizer is draft_tokenizer:
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


def verify_greedy(drafts: Sequence[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: the drafts up to the first that differs from the target's argmax are accepted,
    and the target's argmax at that position follows. `target_logits` [gamma + 1, vocab]."""
    best = target_logits.argmax(dim=-1).tolist()
    for i, token in enumerate(drafts):
        if token != best[i]:
            return i, best[i]
    return len(drafts), best[len(drafts)]


def _cache(runner, kind: str, capacity: int, block_size: int):
    if kind not in ("paged", "contiguous"):
        raise SlimlmError(f"speculative decoding needs a cache it can roll back (contiguous or paged), not {kind!r}")
    if hasattr(runner, "new_cache"):  # a runner with a cache of its own kind (LeanRunner: contiguous)
        return runner.new_cache(capacity)
    shape = runner.cache_shape()
    if kind == "paged":
        return PagedCache.for_lengths(shape, [capacity], block_size)
    if kind == "contiguous":
        return ContiguousCache(shape, 1, capacity)
    raise SlimlmError(f"speculative decoding needs a cache it can roll back (contiguous or paged), not {kind!r}")


# ---------------------------------------------------------------------------------------------
# What a draft/target pair has shown so far: measured costs and acceptance counts
# ---------------------------------------------------------------------------------------------


@dataclass
class _PairRecord:
    target_samples: dict[int, list[float]] = field(default_factory=dict)  # width -> recent seconds
    draft_samples: list[float] = field(default_factory=list)  # recent single-token draft steps
    context: int = 0
    calibration_s: float = 0.0
    accepted: float = 0.0
    rejections: float = 0.0

    def add(self, samples: list[float], seconds: float) -> None:
        samples.append(seconds)
        del samples[:-COST_SAMPLES]

    def add_target(self, width: int, seconds: float) -> None:
        self.add(self.target_samples.setdefault(width, []), seconds)

    def costs(self, max_gamma: int) -> SpeculativeCosts | None:
        """Medians of the recent samples, or None while a width in 1..max_gamma + 1 or the draft step is unmeasured."""
        widths = range(1, max_gamma + 2)
        if not self.draft_samples or any(not self.target_samples.get(k) for k in widths):
            return None
        return SpeculativeCosts({k: statistics.median(self.target_samples[k]) for k in widths},
                                statistics.median(self.draft_samples), self.context, self.calibration_s)


_PAIRS: dict[tuple, _PairRecord] = {}
_TARGETS: dict[tuple, dict[int, list[float]]] = {}  # a target's forward timings, shared by its pairs


def _target_key(target) -> tuple:
    return (id(target.model), type(target).__name__, getattr(target, "fast_kernels", None),
            getattr(target, "small_gemm", None))


def _pair_key(target, draft) -> tuple:
    return (id(target.model), id(draft.model), type(target).__name__, type(draft).__name__,
            getattr(target, "fast_kernels", None), getattr(draft, "fast_kernels", None))


def _pair_record(target, draft) -> _PairRecord:
    key = _pair_key(target, draft)
    if key not in _PAIRS:
        target_key = _target_key(target)
        if target_key not in _TARGETS:
            _TARGETS[target_key] = {}
            weakref.finalize(target.model, _TARGETS.pop, target_key, None)
        _PAIRS[key] = _PairRecord(target_samples=_TARGETS[target_key])
        for model in {id(target.model): target.model, id(draft.model): draft.model}.values():
            weakref.finalize(model, _PAIRS.pop, key, None)  # forget the pair with either model
    return _PAIRS[key]


def pair_costs(target, draft, max_gamma: int = AUTO_MAX_GAMMA) -> SpeculativeCosts | None:
    """What has been measured for this draft/target pair (None before its first automatic-gamma call)."""
    key = _pair_key(as_runner(target), as_runner(draft))
    return _PAIRS[key].costs(max_gamma) if key in _PAIRS else None


def forget_costs(target=None, draft=None) -> None:
    """Drop what was measured for a pair (both None: for every pair), e.g. after the machine's load changed."""
    if target is None and draft is None:
        _PAIRS.clear()
        _TARGETS.clear()
        return
    target, draft = as_runner(target), as_runner(draft)
    _PAIRS.pop(_pair_key(target, draft), None)
    _TARGETS.pop(_target_key(target), None)


def measure_costs(target, draft, target_cache, draft_cache, tokens: Sequence[int], max_gamma: int,
                  record: _PairRecord | None = None, repeats: int = CALIBRATION_REPEATS) -> SpeculativeCosts:
    """Time target forwards over 1..max_gamma + 1 new tokens and single draft steps on caches that hold the
    committed tokens (truncated back after each forward); the tokens fed are taken from `tokens`, so the work
    is that of decoding. Width 1 (the normaliser of c and v) and the draft step are timed `repeats` times
    (alternating with the other widths), the others once; decoding adds samples of the widths it uses."""
    record = record if record is not None else _PairRecord()
    start = time.perf_counter()
    length = target_cache.lengths[0]
    feed = (list(tokens) * (max_gamma + 2))[: max_gamma + 1] if tokens else [0] * (max_gamma + 1)
    widths = [k for k in range(2, max_gamma + 2) if not record.target_samples.get(k)]  # the target's, if known
    rounds = [widths[i::repeats] for i in range(repeats)]  # each round: width 1, a draft step, some widths
    for chunk in rounds:
        for width in [1, *chunk]:
            begin = time.perf_counter()
            target.forward(torch.tensor([feed[:width]]), [width], target_cache, all_logits=True, exact_rows=True)
            record.add_target(width, time.perf_counter() - begin)
            target_cache.truncate(0, length)
            if width == 1:
                begin = time.perf_counter()
                if getattr(draft, "proposes", False):
                    draft.propose(list(tokens), 1)
                else:
                    draft.forward(torch.tensor([feed[:1]]), [1], draft_cache)
                    draft_cache.truncate(0, length)
                record.add(record.draft_samples, time.perf_counter() - begin)
    record.context, record.calibration_s = length, time.perf_counter() - start
    return record.costs(max_gamma)


def _estimated_alpha(record: _PairRecord, stats: SpeculativeStats) -> float:
    accepted = record.accepted + stats.accepted
    rejections = record.rejections + stats.rejections
    return (accepted + ALPHA_PRIOR * ALPHA_PRIOR_WEIGHT) / (accepted + rejections + ALPHA_PRIOR_WEIGHT)


def _remember(record: _PairRecord, stats: SpeculativeStats) -> None:
    record.accepted += stats.accepted
    record.rejections += stats.rejections
    seen = record.accepted + record.rejections
    if seen > ALPHA_HISTORY:  # keep the pooled counts recent
        record.accepted *= ALPHA_HISTORY / seen
        record.rejections *= ALPHA_HISTORY / seen


@torch.no_grad()
def speculative_decode(target, draft, prompt: Sequence[int], max_new_tokens: int, gamma: int | None = None,
                       sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
                       eos_token_ids: Sequence[int] = (), adaptive: bool = False, max_gamma: int = 16,
                       generator: torch.Generator | None = None, share_cache: bool | None = None,
                       costs: SpeculativeCosts | None = None) -> tuple[list[int], SpeculativeStats]:
    """Generate up to `max_new_tokens` tokens after `prompt` (ids) with speculative decoding.

    `target`: a model or a runner; `draft`: a model, a runner (`ModelRunner`, `slimlm.infer.draft.LeanRunner`)
    or a proposer (`slimlm.infer.draft.LookupDraft`). `gamma`: draft tokens per target forward; None chooses
    it before every iteration from the pair's measured costs and the acceptance seen so far (see the module
    docstring; searched within 1..min(max_gamma, AUTO_MAX_GAMMA)). `share_cache`: whether the draft decodes
    in the target's KV cache (None: where the draft says it can, see `slimlm.infer.draft`). `costs`: fixed
    costs for the automatic gamma instead of measured ones."""
    validate_request([prompt], max_new_tokens)
    check_gamma(gamma, max_gamma if adaptive or gamma is None else None)
    if cache.kv_quant is not None:
        raise SlimlmError("speculative decoding rolls its caches back, which a quantized KV cache cannot do: "
                          "use the contiguous or paged cache")
    target, draft = as_runner(target), as_runner(draft)
    check_compatible(target, draft)
    proposer = getattr(draft, "proposes", False)  # slimlm.infer.draft.LookupDraft: no model, no cache
    if target.device != draft.device:
        raise SlimlmError(f"the draft model is on {draft.device} and the target on {target.device}: "
                          "speculative decoding compares their distributions, so put both on one device")
    auto = gamma is None and not adaptive
    gamma = 4 if gamma is None and adaptive else gamma
    search = min(max_gamma, AUTO_MAX_GAMMA)
    can_share = cache.kind == "contiguous" and getattr(draft, "can_share_cache", lambda _: False)(target)
    if share_cache and not can_share:
        raise SlimlmError("this draft cannot decode in the target's KV cache (it needs a draft built from the "
                          "target, slimlm.infer.draft.build_draft, and the contiguous cache)")
    shared = can_share if share_cache is None else bool(share_cache)
    stats = SpeculativeStats(gamma, adaptive, shared_cache=shared)
    output: list[int] = []
    if max_new_tokens == 0:
        return output, stats
    start = time.perf_counter()
    longest = search if auto else (max_gamma if adaptive else gamma)
    capacity = len(prompt) + max_new_tokens + longest + 2
    target_cache = _cache(target, cache.kind, capacity, cache.block_size)
    draft_cache = None if proposer else target_cache if shared else _cache(draft, cache.kind, capacity,
                                                                            cache.block_size)
    generator = generator if generator is not None else sampling.generator(target.device)
    stop = set(eos_token_ids)
    # As plain decoding does: prefill the whole prompt, take the first token from its last logits.
    ids = torch.tensor([list(prompt)])
    logits = target.forward(ids, [len(prompt)], target_cache)
    output.append(int(choose(next_token_probs(logits, sampling), sampling, generator)[0]))
    committed = [*prompt, output[0]]  # both caches hold committed[:-1] between iterations
    stats.time_to_first_token_s = time.perf_counter() - start
    if not shared and not proposer:
        draft.forward(ids, [len(prompt)], draft_cache)
    record = _pair_record(target, draft)
    fixed, since_probe = costs, 0
    if fixed is not None and fixed.max_gamma < search:
        raise SlimlmError(f"the given costs stop at gamma {fixed.max_gamma}; the automatic choice needs {search}")
    if auto and fixed is None and max_new_tokens > 2 and output[0] not in stop:
        costs = record.costs(search)
        if costs is None:
            costs = measure_costs(target, draft, target_cache, draft_cache, prompt, search, record)
            stats.calibration_s = costs.seconds
    while len(output) < max_new_tokens and output[-1] not in stop:
        remaining = max_new_tokens - len(output)
        if auto and remaining > 1:
            costs = fixed or record.costs(search)
            gamma, expected = choose_gamma(_estimated_alpha(record, stats), costs, search)
            if expected < 1 and since_probe < PROBE_EVERY:  # drafting is expected to lose: a plain step
                gamma, since_probe = 0, since_probe + 1
            else:
                since_probe = 0
        step = min(gamma, remaining - 1)  # a draft beyond the last needed token would be wasted
        begin = time.perf_counter()
        if proposer:
            drafts = draft.propose(committed, step) if step else []
            record.add(record.draft_samples, time.perf_counter() - begin)
            q = None if sampling.greedy or not drafts else _one_hot(drafts, target.vocab_size)
        elif sampling.greedy:
            drafts, q = _propose_greedy(draft, draft_cache, committed, step, record), None
        else:
            drafts, q = _propose(draft, draft_cache, committed, step, sampling, generator, record)
        stats.draft_s += time.perf_counter() - begin
        stats.draft_forwards += 0 if proposer else step
        if shared:  # the target overwrites the draft's keys and values of the block it verifies
            target_cache.truncate(0, len(committed) - 1)
        block = torch.tensor([[committed[-1], *drafts]])
        begin = time.perf_counter()
        logits = target.forward(block, [block.shape[1]], target_cache, all_logits=True, exact_rows=True)[0]
        elapsed = time.perf_counter() - begin
        stats.target_s += elapsed
        record.add_target(block.shape[1], elapsed)
        if sampling.greedy:
            accepted, following = verify_greedy(drafts, logits)
        else:
            accepted, following = verify(drafts, q, next_token_probs(logits, sampling), sampling, generator)
        new = _cut_at_stop((drafts[:accepted] + [following])[:remaining], stop)
        target_cache.truncate(0, len(committed) + accepted)
        if draft_cache is not None and not shared:
            draft_cache.truncate(0, min(draft_cache.lengths[0], len(committed) + accepted))
        committed += new
        output += new
        stats.iterations += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.rejections += accepted < len(drafts)
        stats.gammas.append(len(drafts))
        stats.plain_steps += not drafts
        if adaptive and drafts:
            gamma = adapted_gamma(gamma, accepted, len(drafts), max_gamma)
    if costs is not None:
        stats.costs = costs.to_dict()
    _remember(record, stats)
    stats.new_tokens, stats.final_gamma = len(output), gamma or 0
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


def _propose_greedy(draft, cache, committed: list[int], count: int, record: _PairRecord) -> list[int]:
    """`count` greedy draft tokens (argmax of the draft's logits; no distributions). Single-token steps are
    timed into `record`."""
    if count == 0:
        return []
    feed = committed[cache.lengths[0]:]  # the last committed token, or two after a full acceptance
    begin = time.perf_counter()
    token = int(draft.forward(torch.tensor([feed]), [len(feed)], cache)[0].argmax())
    if len(feed) == 1:
        record.add(record.draft_samples, time.perf_counter() - begin)
    drafts = [token]
    for _ in range(count - 1):
        begin = time.perf_counter()
        token = int(draft.forward(torch.tensor([[token]]), [1], cache)[0].argmax())
        record.add(record.draft_samples, time.perf_counter() - begin)
        drafts.append(token)
    return drafts


def _propose(draft, cache, committed: list[int], count: int, sampling: SamplingSettings,
             generator: torch.Generator | None, record: _PairRecord) -> tuple[list[int], torch.Tensor | None]:
    """`count` draft tokens and the draft distributions they were drawn from, [count, vocab]."""
    if count == 0:
        return [], None
    feed = committed[cache.lengths[0]:]  # the last committed token, or two after a full acceptance
    logits = draft.forward(torch.tensor(feed)[None], [len(feed)], cache)
    drafts, distributions = [], []
    for i in range(count):
        q = next_token_probs(logits[0], sampling)
        token = int(choose(q[None], sampling, generator))
        drafts.append(token)
        distributions.append(q)
        if i < count - 1:
            begin = time.perf_counter()
            logits = draft.forward(torch.tensor([[token]]), [1], cache)
            record.add(record.draft_samples, time.perf_counter() - begin)
    return drafts, torch.stack(distributions)


def _one_hot(tokens: list[int], vocab_size: int) -> torch.Tensor:
    """The distributions of a deterministic draft: one-hot at each proposed token, [len(tokens), vocab]."""
    return torch.zeros(len(tokens), vocab_size).scatter_(1, torch.tensor(tokens)[:, None], 1.0)


def _cut_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[: index + 1]
    return tokens


def speculative_generate(target: PreTrainedModel, draft, tokenizer: PreTrainedTokenizerBase,
                         prompts: str | Sequence[str], max_new_tokens: int = 64, gamma: int | None = None,
                         sampling: SamplingSettings = SamplingSettings(), cache: CacheSettings = CacheSettings(),
                         draft_tokenizer: PreTrainedTokenizerBase | None = None, adaptive: bool = False,
                         stop_at_eos: bool = True,
                         max_gamma: int = 16) -> tuple[GenerationResult, list[SpeculativeStats]]:
    """Text in, text out: each prompt decoded speculatively (one after another), with per-prompt statistics.

    `draft`: a model, a runner (`ModelRunner`, `LeanRunner`), or a spec that builds one from the target in
    memory (`"self"`, `"self:<preset>"`, e.g. `"self:rtn-w4g64-head8"`; `slimlm.infer.draft.build_draft`)."""
    from slimlm.infer.draft import build_draft
    from slimlm.infer.engine import encode_prompts, eos_ids

    ids = encode_prompts(tokenizer, prompts)
    validate_request(ids, max_new_tokens)
    check_gamma(gamma, max_gamma if adaptive or gamma is None else None)
    target_runner = as_runner(target)
    draft_runner = build_draft(target, draft) if isinstance(draft, str) else as_runner(draft)
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


__all__ = ["SpeculativeCosts", "SpeculativeStats", "check_compatible", "check_gamma", "choose_gamma",
           "expected_speedup", "forget_costs", "measure_costs", "pair_costs", "speculative_decode",
           "speculative_generate", "verify", "verify_greedy"]
