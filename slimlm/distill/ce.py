"""Plain fine-tuning on the data's next tokens (cross-entropy): the baseline every distillation method must beat
at an equal token budget, and the recovery step of structured pruning when no teacher is at hand."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch
from slimlm.distill.objective import cross_entropy, predictions
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective


class CrossEntropy(Objective):
    name = "ce"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss = cross_entropy(predictions(student, batch), batch)
        return loss, {}


@register
class FinetuneStage(DistillStage):
    """Fine-tuning on the calibration tokens with the next-token cross-entropy (no teacher)."""

    method: Literal["finetune"] = "finetune"
    uses_teacher = False

    def objective(self, teacher, student, report) -> Objective:
        return CrossEntropy()
