"""ZeroQuant: group-wise weights, token-wise activations, and layer-by-layer knowledge distillation (LKD).

Yao, Yazdani Aminabadi, Zhang, Wu, Li, He, "ZeroQuant: Efficient and Affordable Post-Training
Quantization for Large-Scale Transformers", NeurIPS 2022 (arXiv:2206.01861).

- Sec. 4.1, fine-grained hardware-friendly quantization: the weight matrix is split into groups of
  `group_size` input columns per output row, each with its own symmetric scale (group-wise
  quantization), and the activations get one scale per token, computed on the fly (token-wise
  dynamic quantization). Both on the shared grids (`slimlm.quant.grid`,
  `slimlm.quant.activation`).
- The paper's W4/8-A8 setting quantizes the MLP weights to 4 bits and the attention weights to 8
  (`bits` for the MLP linears, `attention_bits` for q/k/v/o), with 8-bit activations.
- Sec. 4.2, LKD (optional, `lkd`): block k is quantized, then trained so that its output matches the
  float block's on the same input, L_k = MSE(L_k(X_k), L^_k(X_k)), where X_k is the output of the
  *float* blocks 1..k-1 (the teacher's activations: the next block's inputs are the float block's
  outputs, not the quantized one's). The block's weights (and biases) are trained with Adam through
  fake quantization of the weights and of the linears' inputs, rounding with a straight-through
  gradient; the group scales follow the weights (recomputed from their min / max every step).
  The trained weights are then quantized once more.

With 8-bit symmetric per-channel weights the layers use the int8 GEMM (`Int8Linear`); group-wise or
lower-bit weights are simulated (`QuantizedLinear` with an input quantizer: exact values, float
arithmetic; the paper's CUTLASS kernels are GPU-only).

Deviations: the paper distils on its calibration (or synthetic) data with mini-batches of its
choosing for a number of iterations; here one Adam step per cached calibration batch per epoch
(`lkd.epochs`, `lkd.lr`). The scales' gradient is not used (they are detached: STE on the codes only).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slimlm.core.blocks import BlockContext, CompressionReport, block_output, linear_weight
from slimlm.core.stage import Stage, StrictModel, register
from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar
from slimlm.quant.activation import fake_quantize_tokens
from slimlm.quant.fields import ActivationQuantConfig, GroupSize, WeightQuantFields
from slimlm.quant.grid import column_groups, fake_quantize_ste, group_minmax, range_params
from slimlm.quant.rtn import replace_quantizing_inputs

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")


def zeroquant_block(context: BlockContext, stage: ZeroQuantStage, report: CompressionReport) -> None:
    """Quantize the block's targets (MLP at `bits`, attention at `attention_bits`); LKD first if asked."""
    start, first = time.perf_counter(), len(report.layers)
    if stage.lkd is not None:
        _distil(context, stage)
    distil_seconds = time.perf_counter() - start
    for bits, names in _targets_by_bits(context, stage).items():
        weights = stage.model_copy(update={"bits": bits})
        targets = context.targets
        context.targets = {name: targets[name] for name in names}
        try:
            replace_quantizing_inputs(context, weights, stage.activations, "minmax", report, f"zeroquant(w{bits})")
        finally:
            context.targets = targets
    for entry in report.layers[first:]:  # share the distillation time among the block's layers
        entry.seconds += distil_seconds / max(1, len(report.layers) - first)


def _targets_by_bits(context: BlockContext, stage: ZeroQuantStage) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, role in context.targets.items():
        bits = stage.attention_bits if role in ATTENTION_ROLES and stage.attention_bits is not None else stage.bits
        groups.setdefault(bits, []).append(name)
    return groups


class _DistilledLinear(nn.Module):
    """A float linear trained through fake quantization of its weight and input (straight-through rounding)."""

    def __init__(self, module: nn.Module, bits: int, stage: ZeroQuantStage) -> None:
        super().__init__()
        weight = linear_weight(module).detach().float()
        self.weight = nn.Parameter(weight.clone())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float().clone())
        self.bits, self.stage = bits, stage
        self.columns = column_groups(weight.shape[1], stage.group_columns) if stage.granularity == "group" else None

    def quantized_weight(self) -> torch.Tensor:
        """The min-max grid of `quantize_weight` (scales only: no codes are encoded in the training loop)."""
        stage, weight = self.stage, self.weight.detach()
        if stage.granularity == "tensor":
            xmin, xmax = weight.amin().reshape(1, 1), weight.amax().reshape(1, 1)
        else:
            xmin, xmax = group_minmax(weight, stage.group_columns)
        scale, zero = range_params(xmin, xmax, self.bits, stage.symmetric)
        if self.columns is not None:  # (out, n_groups) -> (out, in)
            scale, zero = scale[:, self.columns], zero[:, self.columns]
        return fake_quantize_ste(self.weight, scale, zero, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = self.stage.activations
        quantized = fake_quantize_tokens(x.float(), activations.bits, activations.symmetric)
        return F.linear(quantized, self.quantized_weight(), self.bias).to(x.dtype)

    def write_back(self, module: nn.Module) -> None:
        """Copy the trained float weight (and bias) into the original linear."""
        with torch.no_grad():
            weight = self.weight if isinstance(module, nn.Linear) else self.weight.T  # GPT-2's Conv1D: (in, out)
            module.weight.copy_(weight.to(module.weight.dtype))
            if self.bias is not None:
                module.bias.copy_(self.bias.to(module.bias.dtype))


def _distil(context: BlockContext, stage: ZeroQuantStage) -> None:
    """LKD on this block: teacher = the float block on the teacher's inputs; the next block gets the teacher's outputs."""
    if context.inputs is None:
        raise SlimlmError("ZeroQuant's LKD needs calibration data")
    teacher = [t.detach() for t in context.run()]
    bits_of = {name: bits for bits, names in _targets_by_bits(context, stage).items() for name in names}
    originals = {name: context.module(name) for name in bits_of}
    students = {name: _DistilledLinear(module, bits_of[name], stage).to(context.device)
                for name, module in originals.items()}
    for name, student in students.items():
        context.replace(name, student)
    parameters = [p for student in students.values() for p in student.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=stage.lkd.lr)
    inputs = context.inputs
    batches = list(zip(inputs.hidden, inputs.args, inputs.kwargs, teacher))
    try:
        with torch.enable_grad():
            steps = progress_bar(range(stage.lkd.epochs * len(batches)), desc=f"LKD block {context.index}")
            for step in steps:
                hidden, args, kwargs, target = batches[step % len(batches)]
                loss = F.mse_loss(block_output(context.block(hidden, *args, **kwargs)).float(), target.float())
                if not torch.isfinite(loss):
                    raise SlimlmError(f"LKD loss became {float(loss)} in block {context.index}; lower lkd.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps.set_postfix(loss=f"{loss.item():.3g}")
    finally:
        for name, student in students.items():
            student.write_back(originals[name])
            context.replace(name, originals[name])
    context.next_inputs = teacher  # LKD's next block learns from the teacher's activations


class LKDConfig(StrictModel):
    """ZeroQuant's layer-by-layer knowledge distillation: each quantized block is trained to match the float block."""

    epochs: int = Field(2, ge=1, description="passes over the calibration batches per block")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the block's weights")


@register
class ZeroQuantStage(WeightQuantFields, Stage):
    """ZeroQuant (Yao et al., NeurIPS 2022): group-wise weights, token-wise dynamic activations, optional LKD."""

    method: Literal["zeroquant"] = "zeroquant"
    bits: int = Field(8, description="weight bits of the MLP linears (2 to 8)")
    attention_bits: int | None = Field(
        None, ge=2, le=8, description="weight bits of the attention linears (default: `bits`; the paper's W4/8-A8: 8)")
    group_size: GroupSize = Field(64, description='input columns per weight scale, or "channel" / "tensor"')
    symmetric: bool = True
    activations: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig,
                                               description="the activation grid (default: 8-bit per-token dynamic)")
    lkd: LKDConfig | None = Field(None, description="layer-by-layer knowledge distillation (needs calibration data)")

    @model_validator(mode="after")
    def _token_wise(self):
        if self.activations.granularity != "per_token" or self.activations.outlier_threshold is not None \
                or self.activations.fmt != "int":
            raise ValueError("ZeroQuant quantizes activations token-wise on a dynamic integer grid: use "
                             "activations: {granularity: per_token} without outlier_threshold or fmt")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.lkd is not None

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        zeroquant_block(context, self, report)
