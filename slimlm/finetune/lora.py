"""LoRA: low-rank adaptation, for recovering quality after structured pruning.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022 (arXiv:2106.09685). A frozen linear W gets a trainable update B A of rank r:
h = W x + (alpha / r) B A x (Eq. 3), A initialised like a linear layer (Kaiming uniform), B with
zeros, so training starts from the unchanged model; dropout on the LoRA input as in the `peft`
library. After training the update is merged, W <- W + (alpha / r) B A, and the model is a plain
one again (what LLM-Pruner's recovery step saves).

Training here is deliberately small and CPU-friendly: next-token loss on fixed-length segments of
a corpus, AdamW on the LoRA parameters only, a progress bar, and a count of the tokens seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimlm.core.blocks import replace_module
from slimlm.core.stage import StrictModel
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.models.loss import next_token_loss
from slimlm.progress import progress


class LoRALinear(nn.Module):
    """A frozen linear (nn.Linear or GPT-2's Conv1D) plus a trainable rank-r update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise SlimlmError(f"LoRA rank must be at least 1 (got {rank})")
        in_features, out_features = linear_shape(base)
        self.base, self.scaling = base, alpha / rank
        for param in base.parameters():
            param.requires_grad_(False)
        weight = next(base.parameters())
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base module with W + scaling * B A written into its weight."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        weight = self.base.weight
        weight += delta if isinstance(self.base, nn.Linear) else delta.T  # Conv1D keeps (in, out)
        return self.base


def add_lora(model: nn.Module, roles: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"),
             rank: int = 8, alpha: float = 16.0, dropout: float = 0.05) -> int:
    """Freeze the model and wrap the block linears with the given roles in LoRA; returns how many."""
    for param in model.parameters():
        param.requires_grad_(False)
    adapter, wrapped = ModelAdapter(model), 0
    for block in adapter:
        for role, module in block.linears.items():
            if role in roles:
                parent_name, _, child = block.linear_names[role].rpartition(".")
                parent = block.module.get_submodule(parent_name) if parent_name else block.module
                lora = LoRALinear(module, rank, alpha, dropout)
                setattr(parent, child, lora.train(model.training))  # new modules default to training mode
                wrapped += 1
    if not wrapped:
        raise SlimlmError(f"no block linear has a role in {roles}")
    return wrapped


def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain module back; returns how many."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace_module(model, name, module.merged())
            merged += 1
    for param in model.parameters():
        param.requires_grad_(True)
    return merged


@dataclass
class TrainingReport:
    steps: int
    tokens: int
    first_loss: float
    last_loss: float


def train_lora(model: nn.Module, segments: torch.Tensor, steps: int, batch_size: int = 4, lr: float = 1e-4,
               seed: int = 0) -> TrainingReport:
    """Next-token training of the LoRA parameters on `segments` (token ids, (N, L)), cycling through them."""
    if segments.dim() != 2 or len(segments) == 0:
        raise SlimlmError("LoRA training needs token segments of shape (N, L)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SlimlmError("no trainable parameters: call add_lora(model) first")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(segments), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    was_training, losses, tokens = model.training, [], 0
    model.train()
    try:
        for step in progress(range(steps), desc="LoRA recovery", total=steps):
            rows = order[(torch.arange(batch_size) + step * batch_size) % len(segments)]
            ids = segments[rows].to(device)
            loss = next_token_loss(model, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            tokens += ids.numel()
    finally:
        model.train(was_training)
    return TrainingReport(steps, tokens, losses[0], losses[-1])


class LoRARecovery(StrictModel):
    """LoRA fine-tuning after structural pruning, on the calibration segments."""

    steps: int = Field(100, ge=1)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
