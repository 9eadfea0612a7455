"""Speculative decoding: greedy output equals the target's, sampled output has the target's distribution."""

import copy
import itertools
import math

import pytest
import torch

import slimlm.infer.speculative as speculative
from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, ModelRunner, SamplingSettings, generate_ids, next_token_probs
from slimlm.infer.draft import LeanRunner
from slimlm.infer.speculative import check_compatible, speculative_decode, verify
from slimlm.models.tiny import tiny_model

PROMPT = [5, 17, 3, 99, 42, 7]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


def _noisy_copy(model, scale: float, seed: int):
    """A draft close to the target: some drafts are accepted, some rejected."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return draft


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_greedy_speculative_equals_target_greedy(target, kind):
    cache = CacheSettings(kind, block_size=4)
    expected = generate_ids(target, [PROMPT], 40).tokens[0]
    unrelated = tiny_model("llama", seed=1)
    tokens, stats = speculative_decode(target, unrelated, PROMPT, 40, gamma=4, cache=cache)
    assert tokens == expected and stats.accepted < stats.drafted

    tokens, stats = speculative_decode(target, _noisy_copy(target, 0.5, seed=2), PROMPT, 40, gamma=3, cache=cache)
    assert tokens == expected
    assert 0 < stats.accepted < stats.drafted  # both paths (accept, reject + roll back) really ran

    tokens, stats = speculative_decode(target, target, PROMPT, 40, gamma=4, cache=cache)
    assert tokens == expected and stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_forward == 5.0  # gamma accepted + 1 extra per target forward

    tokens, stats = speculative_decode(target, target, [PROMPT[0]], 40, gamma=2, adaptive=True, max_gamma=6)
    assert tokens == generate_ids(target, [[PROMPT[0]]], 40).tokens[0] and stats.final_gamma == 6


def test_eos_and_max_tokens_cut_the_output(target):
    expected = generate_ids(target, [PROMPT], 12).tokens[0]
    tokens, _ = speculative_decode(target, target, PROMPT, 12, gamma=5)
    assert tokens == expected
    stop = expected[4]
    tokens, _ = speculative_decode(target, target, PROMPT, 12, gamma=5, eos_token_ids=[stop])
    assert tokens == expected[: expected.index(stop) + 1]


def _chi_square_critical(dof: int, z: float = 4.265) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z (4.265: 1 - 1e-5)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the categories expected >= 5 times (the rest pooled into one)."""
    total = counts.sum()
    expected = probs * total
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return statistic, int(keep.sum()) - 1


# How sound the distribution tests are. Every draw is seeded, so each test is deterministic on a given machine;
# a platform whose rounding differs draws another sample, so each check is sized for any sample. A correct
# algorithm fails a check with probability about 1e-5 (the chi-square quantile at z = 4.265; simulated with the
# exact distributions, 1e6 samples: 1.4e-5 to 2.7e-5 with the pooling of small categories). The classic error,
# resampling from p instead of the residual norm(max(0, p - q)), puts the statistic's mean 6.7 to 16 standard
# deviations above the critical value (simulated likewise). That error adds lambda = N * sum((wrong - p)^2 / p)
# = N (|m| - |m|^2), at most N / 4, where m = min(p, q) and |m| its mass: p and q are chosen with |m| near 1/2.


def _first_token_counts(p: torch.Tensor, q: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Draw x ~ q, run the verification step once (gamma = 1), count the emitted first token."""
    generator = torch.Generator().manual_seed(seed)
    settings = SamplingSettings(temperature=1.0)
    counts = torch.zeros(p.shape[-1])
    for _ in range(draws):
        drafted = int(torch.multinomial(q, 1, generator=generator))
        accepted, following = verify([drafted], q[None], torch.stack([p, p]), settings, generator)
        counts[drafted if accepted else following] += 1
    return counts


def test_rejection_sampling_keeps_the_target_distribution(monkeypatch):
    # TV(p, q) = 0.42; the wrong algorithm adds 0.088 per draw: 440 at 5000 draws (critical value ~44).
    p = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2, -1)
    q = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2, -1)
    statistic, dof = _chi_square(_first_token_counts(p, q, 5000, seed=3), p)
    assert statistic < _chi_square_critical(dof)
    # The test has the power to catch a wrong algorithm: resample from p instead of the residual.
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_i, q_i: p_i)
    statistic, dof = _chi_square(_first_token_counts(p, q, 5000, seed=3), p)
    assert statistic > _chi_square_critical(dof)


def test_a_deterministic_draft_keeps_the_target_distribution(monkeypatch):
    """A draft that copies from the context proposes one token with certainty (q one-hot, LookupDraft):
    accepted with probability p(x), else drawn from p without x; together exactly p."""
    p = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(4)) * 2, -1)
    q = torch.zeros(1, 12).index_fill_(1, torch.tensor([int(p.argmax())]), 1.0)  # p there: 0.54

    def counts(draws: int) -> torch.Tensor:
        generator, settings = torch.Generator().manual_seed(5), SamplingSettings(temperature=1.0)
        observed = torch.zeros(12)
        for _ in range(draws):
            accepted, following = verify([int(p.argmax())], q, torch.stack([p, p]), settings, generator)
            observed[int(p.argmax()) if accepted else following] += 1
        return observed

    statistic, dof = _chi_square(counts(3000), p)
    assert statistic < _chi_square_critical(dof)
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_i, q_i: p_i)  # adds 0.25 per draw
    statistic, dof = _chi_square(counts(3000), p)
    assert statistic > _chi_square_critical(dof)


def test_verification_takes_each_position_from_its_own_rows():
    """gamma = 2 with a different p and q at each position: the first emitted token has p_0's distribution, the
    second (after an accepted first draft) p_1's, the extra token (after two) p_2's. Rows taken from the wrong
    position would be far off: the rows of p differ by a total variation of 0.74 to 0.94."""
    rows = torch.softmax(torch.randn(5, 8, generator=torch.Generator().manual_seed(6)) * 2, -1)
    p, q = rows[:3], rows[3:]
    generator, settings = torch.Generator().manual_seed(7), SamplingSettings(temperature=1.0)
    counts = torch.zeros(3, 8)
    for _ in range(4000):
        drafts = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
        accepted, following = verify(drafts, q, p, settings, generator)
        for position, token in enumerate(drafts[:accepted] + [following]):
            counts[position, token] += 1
    assert counts[2].sum() > 300  # 10% of the runs (about 420) accept both drafts
    for position in range(3):
        statistic, dof = _chi_square(counts[position], p[position])
        assert statistic < _chi_square_critical(dof), position


VOCAB, NEW_TOKENS, RUNS = 4, 4, 600
SAMPLED_PROMPT = [3, 1, 2]


@pytest.fixture(scope="module")
def sampling_pair():
    """One-block vocab-4 models, cheap enough to decode hundreds of times. The target's LM head is scaled so
    that its most probable token has about half the mass (0.53 on average over the contexts), and the draft is
    the same model with a 4x sharper head: q is close to one-hot where p is spread (TV 0.33), so over half of
    the drafts are accepted, every path of the algorithm runs, and |min(p, q)| is near 1/2."""
    target = tiny_model("llama", seed=0, vocab_size=VOCAB, blocks=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.lm_head.weight.mul_(4.0)
    return target, draft


def _exact_joint(model, prompt: list[int], length: int) -> torch.Tensor:
    """The target's own distribution of its next `length` tokens, [VOCAB ** length] (the product of its
    conditionals, one batched forward per position over every continuation)."""
    settings = SamplingSettings(temperature=1.0)
    joint = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for k in range(length):
            inputs = torch.tensor([prompt + list(c) for c in itertools.product(range(VOCAB), repeat=k)])
            conditional = next_token_probs(model(inputs).logits[:, -1], settings).double()
            joint = (joint[:, None] * conditional).reshape(-1)
    return joint.float()


def _sampled_joint(target, draft, runs: int, cache: CacheSettings = CacheSettings()) -> tuple[torch.Tensor, dict]:
    """Counts of the decoded sequences of NEW_TOKENS tokens, [VOCAB ** NEW_TOKENS], with gamma = 2: the first
    token comes from the prefill (as in plain decoding), then two drafts are verified together (the first or
    the second rejected and replaced by a residual sample, or both accepted with the extra sample from p), and
    what is left is drafted again or, for the last token, a plain step."""
    generator = torch.Generator().manual_seed(11)
    settings = SamplingSettings(temperature=1.0)
    counts = torch.zeros(VOCAB ** NEW_TOKENS)
    seen = {"drafted": 0, "accepted": 0, "rejections": 0, "shared": set()}
    for _ in range(runs):
        tokens, stats = speculative_decode(target, draft, SAMPLED_PROMPT, NEW_TOKENS, gamma=2, sampling=settings,
                                           cache=cache, generator=generator)
        counts[sum(token * VOCAB ** (NEW_TOKENS - 1 - i) for i, token in enumerate(tokens))] += 1
        for key in ("drafted", "accepted", "rejections"):
            seen[key] += getattr(stats, key)
        seen["shared"].add(stats.shared_cache)
    return counts, seen


def _lean_sharing(model) -> LeanRunner:
    """The draft as a draft built from the target runs it: LeanRunner, decoding in the target's KV cache."""
    runner = LeanRunner(model)
    runner.shares_target_cache = True  # same cache shape as the target's (build_draft sets it for self drafts)
    return runner


@pytest.mark.parametrize("variant", ["own-cache", "paged", "shared-cache"])
def test_speculative_sampling_matches_the_target_end_to_end(sampling_pair, variant):
    """The decoded sequences (VOCAB ** 4 = 256 of them) have the target's own distribution."""
    target, draft = sampling_pair
    cache = CacheSettings("paged", block_size=2) if variant == "paged" else CacheSettings()
    draft_runner = _lean_sharing(draft) if variant == "shared-cache" else ModelRunner(draft)
    counts, seen = _sampled_joint(ModelRunner(target), draft_runner, RUNS, cache)
    assert seen["shared"] == {variant == "shared-cache"}
    assert 0 < seen["rejections"] and 0 < seen["accepted"] < seen["drafted"]  # every path ran
    exact = _exact_joint(target, SAMPLED_PROMPT, NEW_TOKENS).view(*[VOCAB] * NEW_TOKENS)
    counts = counts.view(*[VOCAB] * NEW_TOKENS)
    # The whole sequence, and two views with fewer small categories (pooling loses less): the first three tokens
    # (those a rejection produces) and the last two (the extra token after accepted drafts, or a plain step).
    for name, observed, expected in [("all four", counts, exact), ("first three", counts.sum(3), exact.sum(3)),
                                     ("last two", counts.sum((0, 1)), exact.sum((0, 1)))]:
        statistic, dof = _chi_square(observed.reshape(-1), expected.reshape(-1))
        assert statistic < _chi_square_critical(dof), name


def test_the_end_to_end_test_catches_a_wrong_residual(sampling_pair, monkeypatch):
    """The same sampling with the classic error (resample from p after a rejection) fails the check of the first
    three tokens (the ones a rejection can produce): lambda ~ 250 at 600 runs, the statistic's mean about 6.7
    standard deviations above the critical value (~63)."""
    target, draft = sampling_pair
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_i, q_i: p_i)
    counts, _ = _sampled_joint(ModelRunner(target), ModelRunner(draft), RUNS)
    first_three = counts.view(-1, VOCAB).sum(dim=1)
    statistic, dof = _chi_square(first_three, _exact_joint(target, SAMPLED_PROMPT, NEW_TOKENS - 1))
    assert statistic > _chi_square_critical(dof)


class _Tokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(c, 0) for c in text]


def test_incompatible_draft_and_bad_gamma_are_clear_errors(target):
    runner = ModelRunner(target)
    other_vocab = ModelRunner(tiny_model("llama", vocab_size=128))
    with pytest.raises(SlimlmError, match="vocabulary .* differs"):
        speculative_decode(target, other_vocab, PROMPT, 4)
    same = _Tokenizer({chr(97 + i): i for i in range(26)})
    shuffled = _Tokenizer({chr(97 + i): 25 - i for i in range(26)})
    check_compatible(runner, runner, same, _Tokenizer(same.get_vocab()))
    with pytest.raises(SlimlmError, match="tokenizer differs"):
        check_compatible(runner, runner, same, shuffled)
    with pytest.raises(SlimlmError, match="gamma .* must be an integer >= 1"):
        speculative_decode(target, target, PROMPT, 4, gamma=0)
    with pytest.raises(SlimlmError, match="roll back"):
        speculative_decode(target, target, PROMPT, 4, cache=CacheSettings("sinks"))
    with pytest.raises(SlimlmError, match="max_new_tokens"):
        speculative_decode(target, target, PROMPT, -2)
