"""TED: task-aware layer-wise distillation (Liang, Zuo, Zhang, He, Chen, Zhao, "Less is More: Task-aware Layer-wise
Distillation for Language Model Compression", ICML 2023, Sec. 3, Eq. 3-6).

Matching whole hidden states (`hidden`) asks a small student to copy everything a large teacher keeps, much of it
useless for the task. TED puts a **task-aware filter** g (a linear map) on intermediate layers of both models
and matches only what the filters let through, in two stages:

1. **Filters learn the task** (Eq. 3-4). With the model frozen, each filter g^k is trained so that the
   model's task head, applied to g^k(H^k), solves the task: here the next-token loss through the model's own
   final norm and LM head. The teacher's filters are learnt on the teacher, the student's on the student.
2. **Distillation** (Eq. 5-6). The teacher's filters are frozen; the student and its filters are trained on
   the prediction KL plus the filtered layers' MSE:
   L = kd_weight * tau^2 KL(p_T^tau || q_S^tau) + filter_weight * mean_k MSE(g_S^k(H_S^k), g_T^{m(k)}(H_T^{m(k)})).

Filters sit on every `filter_interval`-th student layer (and the teacher layer each maps to, as `hidden`'s
layer map: uniform, or each kept block after layer removal). Deviations: for a language model the task head is
the model's own final norm and LM head (frozen), so filters map the hidden width to itself, where the paper's
classification and QA heads are new linear layers on a filter output of any width; filters start as the
identity (the paper does not say; learnt filters from a random start would need far more steps than a CPU run
affords); the MSE is divided by the teacher's mean square filtered activation, as in `hidden` (a pre-norm
residual stream grows with depth). The filters are discarded after training: the student keeps its own shape.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch, TrainingData
from slimlm.distill.hidden import resolve_layer_map
from slimlm.distill.losses import forward_kl, masked_mean, relative_mse
from slimlm.distill.objective import TeacherObjective, predictions
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective, TrainingConfig, train
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter


class Filters(nn.Module):
    """One linear filter per chosen layer (1-based block outputs), starting as the identity."""

    def __init__(self, layers: list[int], width: int, device: torch.device):
        super().__init__()
        self.layers = layers
        self.maps = nn.ModuleList(nn.Linear(width, width, bias=False, device=device) for _ in layers)
        with torch.no_grad():
            for linear in self.maps:
                linear.weight.copy_(torch.eye(width, device=device))

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [linear(hidden_states[layer].float()) for layer, linear in zip(self.layers, self.maps)]


class FilterLearning(Objective):
    """Stage 1: the frozen model's own head reads each filter's output and predicts the next token."""

    name = "ted-filters"

    def __init__(self, model: nn.Module, filters: Filters):
        self.model, self.filters = model, filters
        adapter = ModelAdapter(model)
        self.final_norm, self.head = adapter.final_norm, adapter.lm_head

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.filters.named_parameters())

    def fingerprint(self) -> str:
        return f"ted-filters:{self.filters.layers}"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            hidden = predictions(self.model, batch, output_hidden_states=True).hidden_states
        losses = []
        for filtered in self.filters(hidden):
            logits = self.head(self.final_norm(filtered.to(self.head.weight.dtype)))[:, :-1].float()
            per_token = F.cross_entropy(logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")
            losses.append(masked_mean(per_token, batch.targets))
        loss = torch.stack(losses).mean()
        return loss, {}


class TaskAwareDistillation(TeacherObjective):
    """Stage 2: prediction KL plus MSE between the student's and the teacher's filtered hidden states."""

    def __init__(self, teacher: nn.Module, student_filters: Filters, teacher_filters: Filters,
                 kd_weight: float = 1.0, filter_weight: float = 1.0, temperature: float = 1.0):
        if not temperature > 0:
            raise SlimlmError(f"ted: temperature must be > 0 (got {temperature})")
        super().__init__(teacher)
        for param in teacher_filters.parameters():
            param.requires_grad_(False)
        self.student_filters, self.teacher_filters = student_filters, teacher_filters
        self.kd_weight, self.filter_weight, self.temperature = kd_weight, filter_weight, temperature
        self.name = "ted"

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.student_filters.named_parameters())

    def fingerprint(self) -> str:
        return (f"ted:{self.student_filters.layers}:{self.teacher_filters.layers}:{self.kd_weight}:"
                f"{self.filter_weight}:{self.temperature}")

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        output = predictions(student, batch, output_hidden_states=True)
        with torch.no_grad():
            reference = predictions(self.teacher, batch, output_hidden_states=True)
            targets = self.teacher_filters(reference.hidden_states)
        mask = batch.attention_mask.bool()
        matched = 0.0
        for filtered, target in zip(self.student_filters(output.hidden_states), targets):
            matched = matched + relative_mse(filtered, target, mask)
        matched = matched / len(targets)
        kl = masked_mean(forward_kl(output.logits[:, :-1], reference.logits[:, :-1], self.temperature), batch.targets)
        loss = self.kd_weight * self.temperature**2 * kl + self.filter_weight * matched
        return loss, {"filters": float(matched.detach()), "kl": float(kl.detach())}


def filter_layers(student_layers: int, interval: int, layer_map: list[int]) -> tuple[list[int], list[int]]:
    """The student layers that get a filter (every `interval`-th, 1-based, the last always) and their teacher layers."""
    chosen = sorted({*range(interval, student_layers + 1, interval), student_layers})
    return chosen, [layer_map[i - 1] for i in chosen]


def learn_filters(model: nn.Module, filters: Filters, data: TrainingData, config: TrainingConfig,
                  description: str) -> None:
    """Stage 1 on `model` (frozen): only the filters train."""
    train(model, FilterLearning(model, filters), data, config.model_copy(update={"trainable": "none",
                                                                              "checkpoint_every": 0}),
          description=description)


@register
class TEDStage(DistillStage):
    """TED: task-aware filters learnt on each model (stage 1), then distillation through them (stage 2)."""

    method: Literal["ted"] = "ted"
    filter_interval: int = Field(5, ge=1, description="a filter on every k-th student layer (and the last)")
    filter_steps: int = Field(50, ge=1, description="stage 1: optimizer steps for each model's filters")
    filter_lr: float = Field(1e-3, gt=0)
    layer_map: Literal["auto", "uniform"] | list[int] = "auto"
    kd_weight: float = Field(1.0, ge=0)
    filter_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)

    def objective(self, teacher, student, report) -> Objective:
        raise SlimlmError("ted needs its training data to learn its filters first: call build_objective")

    def build_objective(self, teacher: nn.Module, student: nn.Module, report,
                        data: TrainingData) -> TaskAwareDistillation:
        """Stage 1 (both models' filters), then the stage-2 objective."""
        t_layers = teacher.config.get_text_config().num_hidden_layers
        s_layers = student.config.get_text_config().num_hidden_layers
        mapping = resolve_layer_map(self.layer_map, teacher, student, report)
        if len(mapping) != s_layers or mapping[-1] != t_layers:
            raise SlimlmError(f"ted: the layer map needs one teacher layer per student layer ({s_layers}), the last "
                              f"being the teacher's last ({t_layers}); got {mapping}")
        student_at, teacher_at = filter_layers(s_layers, self.filter_interval, mapping)
        device = next(student.parameters()).device
        width_s = student.get_input_embeddings().weight.shape[1]
        width_t = teacher.get_input_embeddings().weight.shape[1]
        if width_s != width_t:
            raise SlimlmError(f"ted: the student's width ({width_s}) differs from the teacher's ({width_t}); its "
                              "filters map the width to itself (the model's own LM head is the task head)")
        stage_one = self.training.model_copy(update={"steps": self.filter_steps, "lr": self.filter_lr,
                                                     "warmup_steps": 0})
        teacher_filters, student_filters = Filters(teacher_at, width_t, device), Filters(student_at, width_s, device)
        learn_filters(teacher, teacher_filters, data, stage_one, "ted: teacher filters")
        learn_filters(student, student_filters, data, stage_one, "ted: student filters")
        return TaskAwareDistillation(teacher, student_filters, teacher_filters, self.kd_weight, self.filter_weight,
                                     self.temperature)
