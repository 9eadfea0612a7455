"""Next-token distributions and sampling: greedy, temperature, top-k, top-p (nucleus).

`next_token_probs(logits, settings)` turns logits into the distribution a token is drawn from:

- greedy (`temperature == 0`): a one-hot distribution at the argmax (the lowest id among ties);
- otherwise softmax(logits / temperature), then top-k keeps the k most probable tokens, then top-p
  keeps the smallest set of most probable tokens whose mass reaches p (Holtzman et al., 2020,
  "The Curious Case of Neural Text Degeneration", Sec. 3.1), renormalised.

Speculative decoding needs these distributions explicitly (p and q of Leviathan et al.'s
Algorithm 1 are the processed distributions), which is why sampling goes through probabilities
rather than sampling from logits directly. Draws use a seeded `torch.Generator` for reproducibility.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SlimlmError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SlimlmError(f"top_k must be a positive integer, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def next_token_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Probabilities [..., vocab] (float32) of the next token under `settings`."""
    logits = logits.float()
    if settings.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    logits = logits / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1:
        probs = _nucleus(probs, settings.top_p)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id drawn from each row of `probs` [batch, vocab]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose(probs: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: the argmax when greedy (no random draw), else a sample."""
    return probs.argmax(dim=-1) if settings.greedy else sample(probs, generator)
