"""Distillation and fine-tuning as recipe stages: they run after every other stage, on the compressed model,
with the model as it was before the recipe as the teacher.

    stages:
      - {method: drop_layers, count: 10}
      - {method: kd, temperature: 2.0, training: {steps: 200, lr: 1.0e-4}}

The engine (`slimlm.compress.engine`) keeps a copy of the uncompressed model when a stage `uses_teacher`, runs
the other stages, then each of these in order (`after_blocks = True`). They train on the recipe's
calibration segments (`calibration: {corpus, samples, seqlen}`), cut into `seqlen`-token pieces. With a
checkpoint folder (`slimlm compress` keeps one beside --out), training writes a checkpoint there every
`training.checkpoint_every` steps (default: every tenth of the run) and a killed run continues from the last one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from slimlm.core.stage import ModelContext, Stage
from slimlm.distill.data import TrainingData, token_segments
from slimlm.distill.trainer import Objective, TrainingConfig, train

if TYPE_CHECKING:
    from torch import nn

    from slimlm.core.blocks import CompressionReport


class DistillStage(Stage):
    """Base of the training stages; subclasses set `method` and build their `objective`."""

    whole_model: ClassVar[bool] = False
    after_blocks: ClassVar[bool] = True  # runs after every pruning and quantization stage, on the whole model
    uses_teacher: ClassVar[bool] = True
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seqlen: int = Field(256, ge=2, description="tokens per training sequence (calibration segments are cut to it)")

    def check(self, adapter, layers: dict[str, int]) -> None:
        """Training touches the whole model: no per-layer constraint."""

    def objective(self, teacher: nn.Module | None, student: nn.Module, report: CompressionReport) -> Objective:
        raise NotImplementedError

    def build_objective(self, teacher: nn.Module | None, student: nn.Module, report: CompressionReport,
                        data: TrainingData) -> Objective:
        """The objective to train with; a method that must first learn something from the data (TED's filters)
        overrides this."""
        return self.objective(teacher, student, report)

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        data = token_segments(context.calibration, self.seqlen, "calibration segments", pad_id=0,
                              seed=self.training.seed, prompt_tokens=getattr(self, "prompt_tokens", 0))
        out = context.checkpoint_dir / f"train-{self.method}" if context.checkpoint_dir is not None else None
        every = (self.training.checkpoint_every or max(1, self.training.steps // 10)) if out is not None else 0
        config = self.training.model_copy(update={"checkpoint_every": every})
        objective = self.build_objective(context.teacher, context.model, report, data)
        result = train(context.model, objective, data, config, out_dir=out, description=f"distill {self.method}")
        report.structure.append({"method": self.method, "training": result.to_dict(),
                                 "final_losses": [row["loss"] for row in result.history[-5:]]})
