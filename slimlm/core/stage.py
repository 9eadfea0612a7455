"""The method interface: a stage is a method's settings (a strict pydantic model) and its behaviour.

Every method is one class in its algorithm's own file:

    @register
    class WandaStage(PruneStage):
        '''Wanda (Sun et al., 2024): ...'''
        method: Literal["wanda"] = "wanda"          # the recipe's `method:` value (the discriminator)

        def apply(self, context: BlockContext, report: CompressionReport) -> None:
            ...                                     # rewrite the linears named in context.targets

What the engine (`slimlm.compress.engine`) asks of a stage, in this order:

1. `check(adapter, layers)`: before any work, for every stage of the recipe. `layers` maps each
   selected linear's name to its input width; raise `SlimlmError` with the fix when the model or a
   layer does not fit (the default calls `check_layer` on each).
2. `needs_calibration`: whether the run needs calibration segments for this stage.
3. `whole_model = True` stages (they change the architecture: layer removal, SliceGPT, ...) run first,
   on the whole model: `apply(ModelContext, report)`.
4. `plan(model, adapter, selected, inputs, device)`: an optional whole-model look before the block
   pass; it returns one entry per block (OWL: each block's sparsity) or None. The engine hands each
   block its entry as `BlockContext.plan`.
5. The other stages run inside the sequential block-by-block pass: `apply(BlockContext, report)`
   once per block that holds one of the stage's targets.
6. `after_blocks = True` stages (distillation and fine-tuning, `slimlm.distill`) run last, on the whole
   compressed model: `apply(ModelContext, report)`, with `ModelContext.teacher` the model as it was before
   the recipe when the stage `uses_teacher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel

from slimlm.core.registry import register_stage
from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.core.blocks import BlockContext, BlockInputs, CompressionReport
    from slimlm.models.adapter import ModelAdapter


class StrictModel(BaseModel):
    """Settings that reject unknown keys (a typo in a recipe fails before any work)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class ModelContext:
    """What a whole-model (`whole_model = True`) stage sees."""

    model: PreTrainedModel
    calibration: torch.Tensor | None  # token ids (samples, seqlen); None when no stage calibrates
    batch_size: int  # calibration segments per forward pass
    device: torch.device
    teacher: nn.Module | None = None  # the model before the recipe (for stages that `uses_teacher`)
    checkpoint_dir: Path | None = None  # where a long stage may keep its own resumable state


class Stage(StrictModel):
    """Base class of every method (see the module docstring)."""

    method: str  # each method narrows it to Literal["its name"] with that default
    whole_model: ClassVar[bool] = False  # True: changes the architecture, runs on the whole model first
    after_blocks: ClassVar[bool] = False  # True: runs last, on the whole compressed model (distillation)
    uses_teacher: ClassVar[bool] = False  # True: needs the model as it was before the recipe (`ModelContext.teacher`)
    # True: needs each block's linear weights as they were before any stage of the recipe touched the block
    # (error compensation fits W - W_compressed); the engine then keeps them in `BlockContext.original_weights`.
    needs_original_weights: ClassVar[bool] = False
    targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        """Fail before any work if the model or a selected layer ({name: in_features}) does not fit."""
        for name, in_features in layers.items():
            self.check_layer(name, in_features)

    def check_layer(self, name: str, in_features: int) -> None:
        """Fail before any work if this layer does not fit the stage's settings."""

    def plan(self, model: PreTrainedModel, adapter: ModelAdapter, selected: set[str], inputs: BlockInputs | None,
             device: torch.device) -> list | None:
        """An entry per block from a look at the whole model (OWL's sparsities), or None."""
        return None

    def apply(self, context: BlockContext | ModelContext, report: CompressionReport) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement apply()")


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage class available to recipes under its `method` name."""
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise SlimlmError(f"@register takes a Stage subclass (got {cls!r})")
    method = cls.model_fields["method"].default
    if not isinstance(method, str) or not method:
        raise SlimlmError(f"{cls.__qualname__} needs `method: Literal[\"name\"] = \"name\"`")
    if cls.apply is Stage.apply:
        raise SlimlmError(f"{cls.__qualname__} does not implement apply(context, report)")
    return register_stage(cls)
