"""Knowledge distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, Sec. 2).

The student matches the teacher's temperature-softened next-token distribution at every target position,
mixed with the cross-entropy on the data's own next tokens:

    L = alpha * tau^2 * KL(p_T^tau || q_S^tau) + (1 - alpha) * CE(y, q_S)

The tau^2 factor keeps the soft term's gradient on the scale of the hard term's when tau changes (Sec. 2:
the soft targets' gradients scale as 1 / tau^2). alpha = 1 is pure distillation (the forward-KL row of GKD's
and MiniLLM's comparisons). `divergence: reverse` swaps the KL's arguments, KL(q_S || p_T): the token-level
reverse KL on fixed data (MiniLLM's objective without its sampling, and GKD with lambda = 0, beta = 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch
from slimlm.distill.losses import forward_kl, masked_mean, reverse_kl
from slimlm.distill.objective import TeacherObjective, cross_entropy, predictions
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective
from slimlm.errors import SlimlmError


class KnowledgeDistillation(TeacherObjective):
    def __init__(self, teacher: nn.Module, temperature: float = 1.0, alpha: float = 1.0,
                 divergence: str = "forward"):
        if not temperature > 0:
            raise SlimlmError(f"kd: temperature must be > 0 (got {temperature}); 1 uses the teacher's own distribution")
        if not 0 <= alpha <= 1:
            raise SlimlmError(f"kd: alpha (the share of the distillation term) must be in [0, 1] (got {alpha})")
        super().__init__(teacher)
        self.temperature, self.alpha, self.divergence = temperature, alpha, divergence
        self.name = "kd" if divergence == "forward" else "reverse-kl"

    def fingerprint(self) -> str:
        return f"{self.name}:{self.temperature}:{self.alpha}"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        logits = predictions(student, batch)
        divergence = forward_kl if self.divergence == "forward" else reverse_kl
        kl = masked_mean(divergence(logits, self.teacher_logits(batch), self.temperature), batch.targets)
        loss = self.alpha * self.temperature**2 * kl
        shown = {"kl": float(kl.detach())}
        if self.alpha < 1:
            ce = cross_entropy(logits, batch)
            loss = loss + (1 - self.alpha) * ce
            shown["ce"] = float(ce.detach())
        return loss, shown


@register
class KDStage(DistillStage):
    """Hinton knowledge distillation from the uncompressed model into the compressed one."""

    method: Literal["kd"] = "kd"
    temperature: float = Field(1.0, gt=0, description="softens both distributions (tau)")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the cross-entropy")
    divergence: Literal["forward", "reverse"] = "forward"

    def objective(self, teacher, student, report) -> Objective:
        return KnowledgeDistillation(teacher, self.temperature, self.alpha, self.divergence)
