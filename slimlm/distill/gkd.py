"""GKD: generalized knowledge distillation, on-policy (Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist,
Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024,
Algorithm 1).

Each step, with probability lambda the batch's outputs are sequences the student itself samples from the
batch's prompts (on-policy: the student is trained where it goes at inference time, not only on the data's
prefixes); otherwise the data's own outputs are used. The token-level loss is the generalized
Jensen-Shannon divergence JSD(beta) between teacher and student at every output position
(`slimlm.distill.losses.generalized_jsd`; beta = 0 forward KL, beta = 1 reverse KL). No gradient flows
through the sampling (the paper's Sec. 3.1: the objective is differentiated through the token-level
divergence only, not through the student's sampling distribution).

Prompts: an instruction/answer example's prompt, or the first `prompt_tokens` tokens of a text segment;
the student continues for `max_new_tokens` tokens (stopping at its end-of-sequence token) at
`sampling_temperature` (the paper samples at temperature 1), rows of equal prompt length together
(`slimlm.distill.sampling`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch
from slimlm.distill.losses import generalized_jsd, masked_mean
from slimlm.distill.objective import TeacherObjective, predictions
from slimlm.distill.sampling import sample_continuations
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective
from slimlm.errors import SlimlmError


class GeneralizedKD(TeacherObjective):
    def __init__(self, teacher: nn.Module, lam: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                 max_new_tokens: int = 64, sampling_temperature: float = 1.0, eos_id: int | None = None,
                 pad_id: int = 0):
        for name, value in (("lambda", lam), ("beta", beta)):
            if not 0 <= value <= 1:
                raise SlimlmError(f"gkd: {name} must be in [0, 1] (got {value})")
        if not temperature > 0 or not sampling_temperature > 0:
            raise SlimlmError(f"gkd: temperatures must be > 0 (got {temperature}, {sampling_temperature})")
        super().__init__(teacher)
        self.lam, self.beta, self.temperature = lam, beta, temperature
        self.max_new_tokens, self.sampling_temperature = max_new_tokens, sampling_temperature
        self.eos_id, self.pad_id = eos_id, pad_id
        self.name = "gkd"

    def fingerprint(self) -> str:
        return f"gkd:{self.lam}:{self.beta}:{self.temperature}:{self.max_new_tokens}:{self.sampling_temperature}"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        on_policy = bool(torch.rand((), generator=generator, device=generator.device) < self.lam)
        if on_policy:
            batch = sample_continuations(student, batch, self.max_new_tokens, self.sampling_temperature, generator,
                                         self.eos_id, self.pad_id)
        logits = predictions(student, batch)
        divergence = generalized_jsd(logits, self.teacher_logits(batch), self.beta, self.temperature)
        loss = masked_mean(divergence, batch.targets)
        return loss, {"on_policy": float(on_policy)}


@register
class GKDStage(DistillStage):
    """GKD: on-policy distillation with the generalized JSD (lambda: share of student-sampled batches)."""

    method: Literal["gkd"] = "gkd"
    lam: float = Field(0.5, ge=0, le=1, alias="lambda", description="share of batches sampled from the student")
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation: 0 forward KL, 1 reverse KL")
    temperature: float = Field(1.0, gt=0)
    prompt_tokens: int = Field(64, ge=1, description="tokens of each calibration segment kept as the prompt")
    max_new_tokens: int = Field(64, ge=1)
    sampling_temperature: float = Field(1.0, gt=0)

    model_config = {**DistillStage.model_config, "populate_by_name": True}

    def objective(self, teacher, student, report) -> Objective:
        config = getattr(student, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        return GeneralizedKD(teacher, self.lam, self.beta, self.temperature, self.max_new_tokens,
                             self.sampling_temperature, eos, pad_id=0)
