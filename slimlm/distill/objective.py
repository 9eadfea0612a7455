"""What every white-box distillation objective shares: a frozen teacher, logits of both models on a batch,
and the check that both predict over the same vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.distill.data import Batch
from slimlm.distill.losses import masked_mean
from slimlm.distill.trainer import Objective, freeze_teacher
from slimlm.errors import SlimlmError


def predictions(model: nn.Module, batch: Batch, **kwargs) -> torch.Tensor:
    """Logits (B, L - 1, V) of the next token at every position but the last (the model's own output otherwise)."""
    output = model(input_ids=batch.ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
    return output if kwargs else output.logits[:, :-1]


def vocabulary_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocabulary(teacher: nn.Module, student: nn.Module, teacher_tokenizer=None,
                          student_tokenizer=None) -> None:
    """White-box losses compare distributions token by token: both models must share one vocabulary."""
    sizes = vocabulary_size(teacher), vocabulary_size(student)
    if sizes[0] != sizes[1]:
        raise SlimlmError(f"the teacher predicts over {sizes[0]} tokens and the student over {sizes[1]}: white-box "
                          "distillation (kd, gkd, hidden) needs one tokenizer for both; pick a student of the "
                          "teacher's family, or distill black-box from the teacher's generated text")
    if teacher_tokenizer is not None and student_tokenizer is not None \
            and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise SlimlmError("the teacher's and the student's tokenizers differ (same size, other tokens): white-box "
                          "distillation needs one tokenizer for both; distill black-box from the teacher's text "
                          "instead")


class TeacherObjective(Objective):
    """An objective with a frozen teacher."""

    def __init__(self, teacher: nn.Module):
        self.teacher = freeze_teacher(teacher)

    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        return predictions(self.teacher, batch)


def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's target positions."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), batch.ids[:, 1:], reduction="none")
    return masked_mean(per_token, batch.targets)
