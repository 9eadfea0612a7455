"""The causal language-modelling loss, shared by evaluation, gradient-based importance scores and training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def next_token_loss(model: PreTrainedModel, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Float32 cross-entropy of tokens 2..L of each segment of `ids` (batch, L) given those before it.
    Differentiable (no inference mode): the loss that LoRA training and gradient-based scores use."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)
