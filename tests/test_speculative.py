"""Speculative decoding: greedy output equals the target's, sampled output has the target's distribution."""

import copy
import math

import pytest
import torch

import slimlm.infer.speculative as speculative
from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, ModelRunner, SamplingSettings, generate_ids, next_token_probs
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


def _chi_square_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z (3.719: 1 - 1e-4)."""
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
    p = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2, -1)
    q = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2, -1)
    statistic, dof = _chi_square(_first_token_counts(p, q, 20000, seed=3), p)
    assert statistic < _chi_square_critical(dof)
    # The test has the power to catch a wrong algorithm: resample from p instead of the residual.
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_i, q_i: p_i)
    statistic, dof = _chi_square(_first_token_counts(p, q, 20000, seed=3), p)
    assert statistic > _chi_square_critical(dof)


def _sharpened(factor: float):
    """The tiny vocab-16 model with its LM head scaled: random init gives almost uniform distributions,
    and a draft that is a flatter version of the target overlaps it partly (TV ~ 0.44): the regime
    where a wrong residual would show most."""
    model = tiny_model("llama", seed=0, vocab_size=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


def test_speculative_sampling_matches_the_target_end_to_end(monkeypatch):
    target, draft = _sharpened(40.0), _sharpened(10.0)
    runner_p, runner_q = ModelRunner(target), ModelRunner(draft)
    settings = SamplingSettings(temperature=1.0)
    prompt = [3, 1, 4]
    with torch.no_grad():
        p_first = next_token_probs(target(torch.tensor([prompt])).logits[0, -1], settings)
        q_first = next_token_probs(draft(torch.tensor([prompt])).logits[0, -1], settings)
        # Exact marginal of the second token: sum over x1 of p(x1) p(x2 | x1).
        contexts = torch.tensor([prompt + [x] for x in range(16)])
        p_second = p_first @ next_token_probs(target(contexts).logits[:, -1], settings)
    assert 0.5 * (p_first - q_first).abs().sum() > 0.3  # the draft is really different

    def counts(runs: int, new_tokens: int) -> torch.Tensor:
        observed = torch.zeros(new_tokens, 16)
        generator = torch.Generator().manual_seed(11)
        for _ in range(runs):
            tokens, _ = speculative_decode(runner_p, runner_q, prompt, new_tokens, gamma=1, sampling=settings,
                                           generator=generator)
            for position, token in enumerate(tokens):
                observed[position, token] += 1
        return observed

    # gamma = 1, two tokens: the second comes from a residual, an accepted draft or the extra sample from p.
    observed = counts(800, 2)
    for position, exact in enumerate((p_first, p_second)):
        statistic, dof = _chi_square(observed[position], exact)
        assert statistic < _chi_square_critical(dof), position
    monkeypatch.setattr(speculative, "residual_distribution", lambda p_i, q_i: p_i)
    statistic, dof = _chi_square(counts(800, 1)[0], p_first)
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
