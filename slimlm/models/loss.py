"""The causal language-modelling loss, shared by evaluation, gradient-based importance scores and training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


def shifted_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Float32 cross-entropy of tokens 2..L of each segment of `ids` (batch, L) from the logits (batch, L, V)
    a model gave for them."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


def next_token_loss(model: PreTrainedModel, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Float32 cross-entropy of tokens 2..L of each segment of `ids` (batch, L) given those before it.
    Differentiable (no inference mode): the loss that LoRA training and gradient-based scores use."""
    return shifted_loss(model(input_ids=ids, use_cache=False).logits, ids, reduction)


@torch.no_grad()
def calibration_perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int,
                           device: torch.device | None = None) -> float:
    """exp(mean next-token loss) over calibration segments `ids` (n, L), `batch_size` at a time, on `device`
    (default: where the model's parameters are); the score of layer removal and of the low-rank searches."""
    device = device if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(device)
        nll += float(next_token_loss(model, batch, reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
