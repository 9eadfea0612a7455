"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transformation (LET).

Shao, Chen, Zhang, Xu, Zhao, Li, Zhang, Gao, Qiao, Luo, "OmniQuant: Omnidirectionally Calibrated
Quantization for Large Language Models", ICLR 2024 (arXiv:2308.13137). Each decoder block is
trained, one after the other, to make its quantized output match the float one:

- LWC (Eq. 2): every output channel (or group) of every target linear gets two learnable numbers,
  gamma = sigmoid(gamma_raw) and beta = sigmoid(beta_raw) (raw values initialised to 4.0 as in the
  reference code, so gamma = beta = 0.982 at the start), that shrink its range:
  xmax = gamma max(W), xmin = beta min(W), then the shared integer grid of `slimlm.quant.grid`
  (`range_params`: h = (xmax - xmin) / (2^N - 1), z = round(-xmin / h)) and
  W^ = h (clamp(round(W / h) + z, 0, 2^N - 1) - z), rounding with a straight-through gradient
  (`grid.fake_quantize_ste`); as in the reference, z takes no gradient.
- LET (Eq. 3-4): for the linears reading a norm's output ([q, k, v] or a fused qkv after the
  attention norm, [gate, up] or [up] after the MLP norm), a channel scale s and shift delta:
  Y = ((X - delta) / s)(s * W)^T + (B + delta W^T). The activation quantizer sees (X - delta) / s,
  the weight quantizer s * W. Initialisation as in the reference code: s from SmoothQuant's
  rule (max |X_j|^alpha / max |W_j|^(1 - alpha), `smoothquant.smoothing_scales`, alpha = 0.5) and
  delta = (max X_j + min X_j) / 2; each |s_j| is kept >= 1e-2 (the reference's truncation).
  After training, s is folded into the norm (weight and bias divided by s, `transforms.divide_norm_`,
  as SmoothQuant and AWQ fold), s * W is quantized with the learned clipping range
  (`grid.quantize_weight_range`, so the codes are those of the shared grid for that range), delta W^T
  goes into the bias, and delta / s into the quantized layer's `input_shift`: the final layer is
  `QuantizedLinear(...).quantize_inputs(activations, input_shift=delta / s)`, computing
  fake_quant(x / s - delta / s) (s W^)^T + B + delta W^T.
- Training (the reference's `omniquant.py`): for each block, the float block's outputs are computed
  once; then for `epochs` passes over the calibration segments, `batch_size` segments per step, AdamW
  (weight decay 0; lwc_lr 1e-2 and let_lr 5e-3 by default) minimises MSE(quantized block output,
  target) in float32. The target is the output of the float *model* (a float copy of the hidden
  states is carried from block to block next to the engine's quantized ones, as the reference keeps
  `fp_inps`); `aug_loss` adds the error against the float block on the quantized inputs. The block is
  fed the quantized model's inputs (the engine's cache).

Settings: weight-only (`activations: None`, the paper's W4A16 / W3A16 with LWC; LET optional, then
scales only: a shift needs an activation quantizer to matter) and weight-activation (W4A4, W6A6:
per-channel asymmetric weights, per-token dynamic asymmetric activations of every target linear).

Which transformations are used, and deviations from the reference code:
- LET is applied to the norm -> linears pairs only. The reference's v -> o scaling and its q/k
  scaling (Eq. 5) are not used: q/k scaling only serves the quantized Q K^T product, and here the
  attention matmuls (Q K^T and softmax V) stay in float (only linears are quantized: their weights
  and their inputs), where a per-row scaling of q and k changes nothing on a per-channel grid; v -> o
  scaling is left out (o's input quantizer sees its raw input, like down's).
- The reference zero-initialises the shifts of Llama models (learning them from zero) and takes the
  scale initialisation's max |W_j| from one linear; here delta always starts at the midrange and
  max |W_j| is over the whole group (SmoothQuant's rule). The activation statistics are measured
  on the inputs of the already-quantized earlier blocks, not once on the float model.
- The shared grid's asymmetric range always includes 0 (xmin <= 0 <= xmax) and the scale is not
  clamped to [1e-5, 1e4]; per-token activation grids are the same rule (`ActivationQuantizer`).
- A LET group is transformed only when all its linears are targets of the stage.
- No mixed precision: the reference trains under float16 autocast on a GPU; this trains in float32.
- The final `QuantizedLinear` stores its scales as every method's layer does (float16 where they fit),
  so its weights differ from the trained fake-quantized ones by that rounding of the scale (the
  codes are the same).

Cost: one forward and backward pass of the block per step, plus the fake quantization of its
weights; memory beyond the engine's: the float chain (N x L x d float values, twice with aug_loss)
and one step's activations. The report gives each layer the block's last-epoch mean loss as `error`.
The presets without `-paper` train 2 epochs on 64 x 256 tokens (about 15 minutes for SmolLM2-135M on
2 CPU cores); the paper trains 20 epochs on 128 x 2048 WikiText2 tokens with batch size 1.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, block_output, linear_weight
from slimlm.core.stage import Stage, register
from slimlm.core.transforms import divide_norm_
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, require_norm_per_half
from slimlm.progress import progress_bar
from slimlm.quant.activation import fake_quantize_tokens
from slimlm.quant.fields import ActivationQuantConfig, GroupSize, WeightQuantFields
from slimlm.quant.grid import fake_quantize_ste, group_bounds, group_minmax, quantize_weight_range, range_params
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.smoothquant import smoothing_groups, smoothing_scales

LWC_INIT = 4.0  # raw value of gamma and beta at the start (sigmoid(4) = 0.982), as in the reference
SCALE_FLOOR = 1e-2  # |s_j| is kept at least this (the reference's truncate_number)

# The float model's hidden states entering the next block, per model being compressed: block index -> states.
_FLOAT_CHAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class EquivalentTransform(nn.Module):
    """LET of one norm -> linears group: channel scales s and (optionally) shifts delta of the shared input."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None, activations) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().float().clone())
        self.shift = None if shift is None else nn.Parameter(shift.detach().float().clone())
        self.activations = activations
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, transformed input) of this step

    @torch.no_grad()
    def truncate_(self) -> None:
        """Keep every |s_j| >= SCALE_FLOOR, with its sign (0 counts as positive)."""
        sign = torch.where(self.scale < 0, -1.0, 1.0)
        self.scale.copy_(sign * self.scale.abs().clamp(min=SCALE_FLOOR))

    def clear(self) -> None:
        self._cached = None

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(x - delta) / s, fake-quantized when activations are: computed once for the linears sharing x."""
        if self._cached is not None and self._cached[0] is x:
            return self._cached[1]
        y = x.float() if self.shift is None else x.float() - self.shift
        y = y / self.scale
        if self.activations is not None:
            y = fake_quantize_tokens(y, self.activations.bits, self.activations.symmetric)
        self._cached = (x, y)
        return y

    def input_shift(self) -> torch.Tensor | None:
        """delta / s: what the folded layer subtracts from its (already divided by s) input."""
        return None if self.shift is None else (self.shift / self.scale).detach()


class TrainableLinear(nn.Module):
    """A target linear during training: LWC on (s *) W, the LET group's input transform, float32 autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stage: OmniQuantStage,
                 let: EquivalentTransform | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.bits, self.symmetric, self.activations, self.let = stage.bits, stage.symmetric, stage.activations, let
        self.bounds = group_bounds(weight.shape[1], stage.group_columns)
        self.group_size = stage.group_columns
        self.equal_groups = len({end - start for start, end in self.bounds}) == 1
        shape = (weight.shape[0], len(self.bounds))
        self.gamma_raw = nn.Parameter(torch.full(shape, LWC_INIT)) if stage.lwc else None
        self.beta_raw = nn.Parameter(torch.full(shape, LWC_INIT)) if stage.lwc else None
        self.is_compressed_linear = True  # the adapter treats it as the linear it stands in for

    def transformed_weight(self) -> torch.Tensor:
        return self.weight if self.let is None else self.weight * self.let.scale[None, :]

    def transformed_bias(self) -> torch.Tensor | None:
        if self.let is None or self.let.shift is None:
            return self.bias
        compensation = self.weight @ self.let.shift
        return compensation if self.bias is None else self.bias + compensation

    def clipping_range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, n_groups) xmin and xmax: the groups' min / max, times beta / gamma with LWC."""
        xmin, xmax = group_minmax(w, self.group_size)
        if self.gamma_raw is not None:
            xmax = torch.sigmoid(self.gamma_raw) * xmax
            xmin = torch.sigmoid(self.beta_raw) * xmin
        return xmin, xmax

    def quantized_weight(self) -> torch.Tensor:
        w = self.transformed_weight()
        scale, zero = range_params(*self.clipping_range(w), self.bits, self.symmetric)
        if self.equal_groups:
            grouped = w.reshape(w.shape[0], len(self.bounds), -1)
            return fake_quantize_ste(grouped, scale[..., None], zero[..., None], self.bits).reshape(w.shape)
        sizes = torch.tensor([b - a for a, b in self.bounds], device=w.device)
        return fake_quantize_ste(w, scale.repeat_interleave(sizes, dim=1), zero.repeat_interleave(sizes, dim=1),
                                 self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.let is not None:
            x = self.let.transform(x)
        elif self.activations is not None:
            x = fake_quantize_tokens(x.float(), self.activations.bits, self.activations.symmetric)
        return F.linear(x.float(), self.quantized_weight(), self.transformed_bias())

    @torch.no_grad()
    def to_quantized_linear(self, dtype: torch.dtype, scale_dtype: torch.dtype | None = None) -> QuantizedLinear:
        """The final layer: the learned range's codes of s * W, bias + delta W^T, input quantizer and shift
        (scales stored as `QuantizedLinear.from_quantized` stores them: float16 by default)."""
        w = self.transformed_weight()
        xmin, xmax = self.clipping_range(w)
        quantized = quantize_weight_range(w, xmin, xmax, self.bits, self.group_size, self.symmetric)
        bias = self.transformed_bias()
        bias = None if bias is None else bias.detach()
        layer = QuantizedLinear.from_quantized(quantized, bias, scale_dtype).to(dtype)
        shift = None if self.let is None else self.let.input_shift()
        if self.activations is not None:
            layer.quantize_inputs(self.activations, input_shift=shift)
        elif shift is not None:  # a shift without an activation grid (not produced by the stage; kept exact)
            layer.input_shift = shift.float().clone()
        return layer


def _slice_batch(value, start: int, end: int, batch: int):
    """Segments [start, end) of a cached block argument: tensors of 2+ dimensions whose first one is the
    batch are sliced (1-D tensors such as cache_position are not), containers recursively."""
    if isinstance(value, torch.Tensor):
        return value[start:end] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_batch(v, start, end, batch) for v in value)
    if isinstance(value, dict):
        return {k: _slice_batch(v, start, end, batch) for k, v in value.items()}
    return value


def _float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


class _ChannelRange:
    """Running per-channel min, max and max |x| of a group's shared input."""

    def __init__(self) -> None:
        self.low = self.high = None

    def update(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise SlimlmError("calibration activations hold NaN or infinite values; check the model in float first")
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        low, high = rows.amin(dim=0), rows.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.low.abs(), self.high.abs())


def _let_groups(context: BlockContext, stage: OmniQuantStage) -> list[tuple[str, list[str]]]:
    """(norm path, linear paths) inside the block for each LET group whose linears are all targets."""
    if not stage.let:
        return []
    prefix = f"{context.adapter.blocks_name}.{context.index}."
    targets = {name[len(prefix):] for name in context.targets}
    return [(g.norm, g.linears) for g in smoothing_groups(context.adapter[context.index])
            if set(g.linears) <= targets]


def omniquant_block(context: BlockContext, stage: OmniQuantStage, report: CompressionReport) -> None:
    start = time.perf_counter()
    block = context.block
    prefix = f"{context.adapter.blocks_name}.{context.index}."
    names = {name: name[len(prefix):] for name in context.targets}
    originals = {name: context.module(name) for name in names}
    weights = {name: linear_weight(module) for name, module in originals.items()}  # fails on compressed layers
    dtype = next(iter(weights.values())).dtype
    groups = _let_groups(context, stage)

    # Calibration statistics of each LET group's input, on the block as it is.
    ranges = [_ChannelRange() for _ in groups]
    if groups:
        firsts = {str(i): block.get_submodule(linears[0]) for i, (_norm, linears) in enumerate(groups)}
        context.collect(firsts, lambda key, x: ranges[int(key)].update(x))

    # Targets: the float model's outputs (float chain) and, with aug_loss, the float block on quantized inputs.
    quantized_inputs = context.inputs
    chain_index, chain = _FLOAT_CHAIN.get(context.model, (None, None))
    float_inputs = chain if chain_index == context.index else quantized_inputs.hidden
    if context.index == 0:
        _FLOAT_CHAIN.pop(context.model, None)
    homes = {name: t.dtype for name, t in [*block.named_parameters(), *block.named_buffers()]}
    trainable_flags = {name: p.requires_grad for name, p in block.named_parameters()}
    block.float()  # training runs in float32 whatever the model's dtype
    block.requires_grad_(False)
    try:
        with torch.no_grad():
            float_outputs = [block_output(block(h.float(), *_float32(a), **_float32(k)))
                             for h, a, k in zip(float_inputs, quantized_inputs.args, quantized_inputs.kwargs)]
            augmented = [block_output(block(h.float(), *_float32(a), **_float32(k)))
                         for h, a, k in zip(quantized_inputs.hidden, quantized_inputs.args, quantized_inputs.kwargs)
                         ] if stage.aug_loss else None
        if context.index + 1 < len(context.adapter):
            chain = [out.to(h.dtype) for out, h in zip(float_outputs, float_inputs)]
            _FLOAT_CHAIN[context.model] = (context.index + 1, chain)
        else:
            _FLOAT_CHAIN.pop(context.model, None)

        # Trainable stand-ins for the target linears, sharing each LET group's transform.
        transforms: dict[str, EquivalentTransform] = {}
        lets = []
        for (norm, linears), stats in zip(groups, ranges):
            group_weights = [weights[prefix + path].float() for path in linears]
            scale = smoothing_scales(stats.absmax, group_weights, stage.alpha)
            shift = (stats.high + stats.low) / 2 if stage.activations is not None else None
            let = EquivalentTransform(scale, shift, stage.activations)
            lets.append((norm, let))
            transforms.update({prefix + path: let for path in linears})
        trainables = {name: TrainableLinear(weights[name], originals[name].bias, stage, transforms.get(name))
                      for name in names}
        for name, module in trainables.items():
            context.replace(name, module)
        losses = train_block(block, trainables, [let for _n, let in lets], stage, quantized_inputs, float_outputs,
                             augmented, context.index)
        # Fold: norms take 1 / s; the linears become quantized layers with the learned grids.
        fold_(block, lets, {names[name]: module for name, module in trainables.items()},
              context.adapter.norm_weight_offset, dtype)
        _restore(block, homes, trainable_flags)
    except BaseException:
        for name, module in originals.items():  # leave the block as it was
            context.replace(name, module)
        _restore(block, homes, trainable_flags)
        raise
    seconds = (time.perf_counter() - start) / max(1, len(names))
    final = losses[-1] if losses else None  # the block's last-epoch mean loss, reported for each of its layers
    report.layers += [LayerReport(name, "omniquant", seconds, final) for name in names]


@torch.no_grad()
def fold_(block: nn.Module, lets: list[tuple[str, EquivalentTransform]], trainables: dict[str, TrainableLinear],
          norm_offset: float, dtype: torch.dtype, scale_dtype: torch.dtype | None = None) -> None:
    """Make the training-time block a plain quantized one computing the same function: each norm's output
    divided by its group's s (`transforms.divide_norm_`), each trainable linear (by its path in the block)
    replaced by its `QuantizedLinear` (s * W on the learned grid, input shift delta / s, bias B + delta W^T)."""
    layers = {path: module.to_quantized_linear(dtype, scale_dtype) for path, module in trainables.items()}
    for norm, let in lets:
        divide_norm_(block.get_submodule(norm), let.scale.detach(), norm_offset)
    for path, layer in layers.items():
        parent, _, child = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, layer)


def _restore(block: nn.Module, homes: dict[str, torch.dtype], flags: dict[str, bool]) -> None:
    """Give the block's own parameters and buffers back their dtypes and requires_grad flags."""
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if name in homes and tensor.dtype != homes[name]:
            tensor.data = tensor.data.to(homes[name])
    for name, param in block.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


def train_block(block: nn.Module, trainables: dict[str, TrainableLinear], lets: list[EquivalentTransform],
           stage: OmniQuantStage, inputs, targets: list[torch.Tensor], augmented: list[torch.Tensor] | None,
           index: int) -> list[float]:
    """AdamW on the LWC and LET parameters; returns the mean loss of each epoch."""
    lwc_params = [p for m in trainables.values() for p in (m.gamma_raw, m.beta_raw) if p is not None]
    let_params = [p for let in lets for p in (let.scale, let.shift) if p is not None]
    param_groups = [g for g in ({"params": lwc_params, "lr": stage.lwc_lr}, {"params": let_params, "lr": stage.let_lr})
                    if g["params"]]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    steps = []  # (hidden, args, kwargs, target, augmented target) per optimisation step
    for i, (hidden, args, kwargs) in enumerate(zip(inputs.hidden, inputs.args, inputs.kwargs)):
        batch = hidden.shape[0]
        for first in range(0, batch, stage.batch_size):
            last = min(first + stage.batch_size, batch)
            steps.append((hidden[first:last].float(), _float32(_slice_batch(args, first, last, batch)),
                          _float32(_slice_batch(kwargs, first, last, batch)), targets[i][first:last],
                          None if augmented is None else augmented[i][first:last]))
    losses: list[float] = []
    bar = progress_bar(range(stage.epochs), desc=f"omniquant block {index}")
    with torch.enable_grad():
        for _epoch in bar:
            total = 0.0
            for hidden, args, kwargs, target, aug_target in steps:
                for let in lets:
                    let.truncate_()
                    let.clear()
                output = block_output(block(hidden, *args, **kwargs))
                loss = F.mse_loss(output, target)
                if aug_target is not None:
                    loss = loss + F.mse_loss(output, aug_target)
                if not math.isfinite(loss.item()):
                    raise SlimlmError(f"block {index}: the OmniQuant loss is not finite; lower lwc_lr / let_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / len(steps))
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    for let in lets:
        let.truncate_()
        let.clear()
    return losses


@register
class OmniQuantStage(WeightQuantFields, Stage):
    """OmniQuant (Shao et al., ICLR 2024): learnable weight clipping (LWC) and learnable equivalent
    transformation (LET), trained block by block (`slimlm.quant.omniquant`)."""

    method: Literal["omniquant"] = "omniquant"
    group_size: GroupSize = Field("channel", description='input columns per scale, or "channel" (the paper\'s default)')
    activations: ActivationQuantConfig | None = Field(
        None, description="also quantize the linears' inputs (the paper: per-token dynamic asymmetric, W4A4 / W6A6); "
        "None: weight-only")
    lwc: bool = Field(True, description="learn each weight group's clipping range (Eq. 2)")
    let: bool = Field(True, description="learn channel scales (and, with activations, shifts) of the linears after "
                      "each norm (Eq. 3-4); the paper uses it for weight-activation quantization")
    epochs: int = Field(20, description="passes over the calibration segments per block (the paper: 20 for W4A4/W6A6)")
    lwc_lr: float = Field(1e-2, description="AdamW learning rate of the clipping parameters")
    let_lr: float = Field(5e-3, description="AdamW learning rate of the scales and shifts")
    batch_size: int = Field(1, ge=1, description="calibration segments per optimisation step (the paper: 1)")
    alpha: float = Field(0.5, description="migration strength of the SmoothQuant-style initial scales")
    aug_loss: bool = Field(False, description="add the error against the float block on the same (quantized) inputs "
                           "(the reference's --aug_loss)")

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, epochs: int) -> int:
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1 (got {epochs}); OmniQuant trains each block (the paper: 20)")
        return epochs

    @field_validator("lwc_lr", "let_lr")
    @classmethod
    def _learning_rate(cls, lr: float) -> float:
        if not lr > 0:  # NaN fails too
            raise ValueError(f"learning rates must be positive (got {lr}); the paper uses lwc_lr 1e-2, let_lr 5e-3")
        return lr

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, alpha: float) -> float:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha}); the reference initialises with 0.5")
        return alpha

    @field_validator("group_size")
    @classmethod
    def _not_per_tensor(cls, group_size: GroupSize) -> GroupSize:
        if group_size == "tensor":
            raise ValueError('LWC learns a range per output channel or group: use an integer group_size or "channel"')
        return group_size

    @model_validator(mode="after")
    def _settings(self):
        if not (self.lwc or self.let):
            raise ValueError("lwc and let are both off: there is nothing to learn (use the rtn method)")
        acts = self.activations
        if acts is not None:
            if acts.outlier_threshold is not None:
                raise ValueError("outlier_threshold (LLM.int8()) is a setting of the rtn stage; OmniQuant's LET "
                                 "handles the outliers instead")
            if acts.granularity != "per_token" or getattr(acts, "fmt", "int") != "int":
                raise ValueError("OmniQuant quantizes activations per token on a dynamic integer grid, as the paper "
                                 "does: set activations.granularity: per_token (and fmt: int)")
        return self

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        super().check(adapter, layers)
        if self.let:  # LET's scales fold into the norm in front of each half, as SmoothQuant's
            require_norm_per_half(adapter, "OmniQuant's LET (let: true)")

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        omniquant_block(context, self, report)
