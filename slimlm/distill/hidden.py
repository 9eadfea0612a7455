"""Layer-wise distillation: the student's hidden states match the teacher's at mapped layers (DistilBERT /
TinyBERT style), with the logit distillation of `kd` beside it.

Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", EMNLP 2020, Eq. 8:
L_hidn = MSE(H_S W_h, H_T), summed over a layer map m(i) from student layer i to teacher layer m(i); W_h is
a learned projection when the widths differ (none when they are equal: a truncated, layer-dropped or pruned
student of the teacher's width). Here

    L = hidden_weight * mean_i MSE(H_S^i W_h^i, H_T^{m(i)}) / mean(H_T^{m(i)} ^ 2)
      + kd_weight * tau^2 KL(p_T^tau || q_S^tau)

over the target positions. Deviation: each layer's MSE is divided by the teacher's mean square activation at
that layer. TinyBERT's hidden states leave a LayerNorm (post-LN BERT) and are of one scale; the residual
stream of a pre-norm decoder grows with depth, and plain MSE would be the last layers' alone.

The layer map: "uniform" maps student layer i (1-based, its output) to teacher layer round(i * L_T / L_S);
after layer removal in the same recipe, each kept block maps to the teacher block it was (the removed indices
are in the report); or an explicit list of teacher layers, one per student layer. The last student layer
always maps to the teacher's last: transformers returns the final norm's output as the last hidden state.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch
from slimlm.distill.losses import forward_kl, masked_mean, relative_mse
from slimlm.distill.objective import TeacherObjective, predictions
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective
from slimlm.errors import SlimlmError


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based output index) for each student layer 1..L_S, spread evenly."""
    return [max(1, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def layer_map_after_removal(teacher_layers: int, removed: list[int]) -> list[int]:
    """Each kept block's original (1-based output) index, when `removed` (0-based) blocks were deleted; the
    last maps to the teacher's last (in transformers both are the final norm's output)."""
    gone = set(removed)
    kept = [index + 1 for index in range(teacher_layers) if index not in gone]
    return [*kept[:-1], teacher_layers]


def resolve_layer_map(setting: str | list[int], teacher: nn.Module, student: nn.Module, report) -> list[int]:
    """The teacher layer of each student layer: "auto" (after layer removal in the same recipe, each kept block's
    own; else uniform), "uniform", or the given list."""
    teacher_layers = teacher.config.get_text_config().num_hidden_layers
    student_layers = student.config.get_text_config().num_hidden_layers
    if setting == "auto":
        removed = [i for entry in report.structure if entry.get("method") == "drop_layers"
                   for i in entry.get("removed_blocks", [])]
        if removed and len(removed) == teacher_layers - student_layers:
            return layer_map_after_removal(teacher_layers, removed)
        return uniform_layer_map(student_layers, teacher_layers)
    if setting == "uniform":
        return uniform_layer_map(student_layers, teacher_layers)
    return list(setting)


class HiddenStateDistillation(TeacherObjective):
    def __init__(self, teacher: nn.Module, student: nn.Module, layer_map: list[int], hidden_weight: float = 1.0,
                 kd_weight: float = 1.0, temperature: float = 1.0):
        super().__init__(teacher)
        student_layers = student.config.get_text_config().num_hidden_layers
        teacher_layers = teacher.config.get_text_config().num_hidden_layers
        if len(layer_map) != student_layers or not all(1 <= j <= teacher_layers for j in layer_map):
            raise SlimlmError(f"hidden: the layer map needs one teacher layer in 1..{teacher_layers} for each of the "
                              f"student's {student_layers} layers (got {layer_map})")
        if layer_map[-1] != teacher_layers:  # transformers' last hidden state is the final norm's output
            raise SlimlmError(f"hidden: the student's last layer must map to the teacher's last ({teacher_layers}): "
                              "both models' last hidden states are the final norm's output")
        if not temperature > 0:
            raise SlimlmError(f"hidden: temperature must be > 0 (got {temperature})")
        self.layer_map, self.hidden_weight, self.kd_weight = layer_map, hidden_weight, kd_weight
        self.temperature = temperature
        d_s = student.get_input_embeddings().weight.shape[1]
        d_t = teacher.get_input_embeddings().weight.shape[1]
        device = next(student.parameters()).device
        # TinyBERT's W_h where the widths differ (trained with the student)
        self.projections = nn.ModuleList(nn.Linear(d_s, d_t, bias=False).to(device) for _ in layer_map) \
            if d_s != d_t else None
        self.name = "hidden"

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.projections.named_parameters()) if self.projections is not None else {}

    def fingerprint(self) -> str:
        return f"hidden:{self.layer_map}:{self.hidden_weight}:{self.kd_weight}:{self.temperature}"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        output = predictions(student, batch, output_hidden_states=True)
        with torch.no_grad():
            reference = predictions(self.teacher, batch, output_hidden_states=True)
        mask = batch.attention_mask.bool()
        hidden = 0.0
        for i, j in enumerate(self.layer_map):
            h_s, h_t = output.hidden_states[i + 1].float(), reference.hidden_states[j].float()
            if self.projections is not None:
                h_s = self.projections[i](h_s)
            hidden = hidden + relative_mse(h_s, h_t, mask)
        hidden = hidden / len(self.layer_map)
        kl = masked_mean(forward_kl(output.logits[:, :-1], reference.logits[:, :-1], self.temperature), batch.targets)
        loss = self.hidden_weight * hidden + self.kd_weight * self.temperature**2 * kl
        return loss, {"hidden": float(hidden.detach()), "kl": float(kl.detach())}


@register
class HiddenStage(DistillStage):
    """Layer-wise hidden-state matching (TinyBERT's L_hidn, normalised per layer) plus logit KD."""

    method: Literal["hidden"] = "hidden"
    layer_map: Literal["auto", "uniform"] | list[int] = "auto"
    hidden_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)

    def objective(self, teacher, student, report) -> Objective:
        mapping = resolve_layer_map(self.layer_map, teacher, student, report)
        return HiddenStateDistillation(teacher, student, mapping, self.hidden_weight, self.kd_weight, self.temperature)
