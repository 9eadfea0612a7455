"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization
for On-Device LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978). Implemented as in
the authors' code (mit-han-lab/llm-awq, `auto_scale.py`, `auto_clip.py`), block by block:

1. One float forward pass of the block gathers, for each linear's input: the mean |x| of every channel
   over all tokens (s_X), every stride-th token for the clipping search, and, for the groups searched on a
   linear's own output, the Gram matrix X^T X of the search segments; it keeps the attention and MLP calls
   of the search segments, and the block's outputs.
2. Scaling search (Sec. 3.2, Eq. 4-5) for each group of linears that share an input:
   s = s_X^alpha with s_X the mean |x| of each input channel, normalised by sqrt(max(s) min(s)),
   for alpha on a grid of `grid` points in [0, 1); the loss is the mean squared error of the
   inspected module's output with the group's weights replaced by Q(W diag(s)) diag(s)^-1.
   Groups: [q, k, v] after the attention norm (inspecting the attention module); [o] after [v]
   when their shapes match (multi-head attention only, as the reference skips it for GQA);
   [gate, up] (or [up]) after the MLP norm (inspecting the MLP); [down] after [up] when a gate
   or a ReLU makes the scaling exact. Where the inspected module is one linear ([o], [down]), its
   squared output error is tr(D X^T X D^T) with D the weight change, computed from the Gram matrix instead
   of the tokens (the same number up to rounding, at a fraction of the cost).
4. Clipping search (Sec. 3.3 of the code's `auto_clip`): for every linear except q and k, per
   output channel and group, the clipping range max|w| * (1 - i / clip_grid), i < max_shrink *
   clip_grid, that minimises the output error on `clip_tokens` sampled inputs.
5. Group-wise round-to-nearest quantization with the shared grid.

The error is measured on the first `search_samples` calibration segments (default 2, 1024 tokens at the
default seqlen): the reference code measures it on every segment, which costs about 20 forward passes of the
calibration set per run; `search_samples: null` does that (`benchmarks/compression_speed.py` has a row for
each; the every-segment row has not been run yet). s_X and the clipping samples always come from every
segment. `objective="layer"` measures every group on its linears' own outputs (the paper's Eq. 4, summed over
the group) from Gram matrices instead of on the attention or MLP output (the reference code's choice for
groups that feed one module): no module re-runs at all; a slimlm option.

As in the reference code, the next block is calibrated on the outputs of this block in float
(AWQ does not propagate quantization error), and the scale search's forward passes run in float16
(`search_dtype`; the reference runs the whole model in float16 on a GPU): on a copy of the inspected
module, with the candidate weights computed in float32 from the float32 weights and then rounded.
Where a reference output overflows that precision, the group is searched in float32. The default `auto`
takes float16 only where the device multiplies it natively (a GPU; CPUs with AVX512-FP16 or AMX-FP16, where
these passes run about 8 times faster than in float32) and float32 elsewhere, where float16 matmuls are
emulated 30-40 times slower; the report's `notes` say which ran. Deviations: the quantization grid is slimlm's
shared grid, whose asymmetric range always includes zero (the GPTQ convention; the reference
uses the plain min-max range, which differs only for groups whose weights all have one sign);
with a GELU MLP (GPT-2), the [down] group is not scaled (the reference wraps the activation in a
scaling module for some families).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, block_output, linear_weight
from slimlm.core.hessian import HessianAccumulator, SharedInputs
from slimlm.core.stage import Stage, register
from slimlm.core.transforms import divide_norm_, divide_output_channels_, multiply_input_channels_
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, require_norm_per_half
from slimlm.quant.fields import GroupSize, WeightQuantFields
from slimlm.quant.grid import fake_quantize_groups, fake_quantize_rows, group_bounds, quantize_weight
from slimlm.quant.qlinear import QuantizedLinear

NO_CLIP_ROLES = ("q", "k", "qkv")  # q and k meet in a bilinear product: clipping them is unreliable


@dataclass
class ScalingGroup:
    prev: nn.Module  # the operation whose output feeds the group
    prev_is_norm: bool
    layers: list[str]  # full names of the linears that read that output
    inspect: str  # "attention", "mlp" or the name of a single linear


@dataclass
class CachedCall:
    """One recorded call of a module: its input and the rest of its arguments."""

    x: torch.Tensor
    args: tuple
    kwargs: dict


@torch.no_grad()
def awq_block(context: BlockContext, stage: AWQStage, report: CompressionReport) -> None:
    start = time.perf_counter()
    block = context.adapter[context.index]
    prefix = f"{context.adapter.blocks_name}.{context.index}."
    names = {role: prefix + path for role, path in block.linear_names.items()}
    attention_name = _parent(names.get("q", names.get("qkv")))
    mlp_name = _parent(names[block.up_role])
    mlp_name = mlp_name if mlp_name != prefix.rstrip(".") else None
    groups = _scaling_groups(context, block, names, mlp_name is not None)
    # Groups that inspect one linear (o after v, down after up) are searched exactly over every token from
    # the Gram matrix of their input; so are all groups with the per-layer objective.
    gram = {name for g in groups if g.inspect not in ("attention", "mlp") or stage.objective == "layer"
            for name in g.layers}
    calls, statistics = _float_pass(context, names, attention_name, mlp_name, gram,
                                    _search_segments(context, stage), stage.clip_tokens)
    context.next_inputs = calls.outputs  # AWQ calibrates the next block on float outputs
    search_dtype = resolve_search_dtype(stage.search_dtype, context.device)

    def pseudo_quantize(weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_groups(weight, stage.bits, stage.group_columns, stage.symmetric)

    for group in groups:
        layers = {name: context.module(name) for name in group.layers}
        weights = {name: linear_weight(m).detach().float().clone() for name, m in layers.items()}
        quantized = {name for name in layers if name in context.targets}
        inputs = statistics[group.layers[0]]
        if group.layers[0] in gram:
            scales = search_scales_gram(inputs.mean_abs(), inputs.gram(), weights, quantized, pseudo_quantize,
                                        stage.grid)
        else:
            report.notes["awq_search_dtype"] = search_dtype
            inspected_name = attention_name if group.inspect == "attention" else mlp_name
            scales = _search_module(context, group, inspected_name, calls, inputs.mean_abs(), layers, weights,
                                    quantized, pseudo_quantize, stage, search_dtype)
        apply_scales(group, layers, scales, context.adapter.norm_weight_offset)
        inputs.scale_samples_(scales)  # the clipping search sees the inputs the scaled layers now get

    for name, role in context.targets.items():
        module = context.module(name)
        weight = linear_weight(module)
        if stage.clip_search and role not in NO_CLIP_ROLES:
            max_val = search_clip(weight.detach().float(), statistics[name].samples(), stage)
            weight.copy_(_clamp_groups(weight.float(), max_val, stage.group_columns).to(weight.dtype))
        quantized = quantize_weight(weight.detach().float(), stage.bits, stage.group_columns, stage.symmetric)
        context.replace(name, QuantizedLinear.replacing(module, quantized))
    seconds = (time.perf_counter() - start) / max(1, len(context.targets))
    report.layers += [LayerReport(name, "awq", seconds) for name in context.targets]


def _search_segments(context: BlockContext, stage: AWQStage) -> int:
    """How many calibration segments (the first ones) the scale search measures its error on."""
    total = sum(batch.shape[0] for batch in context.inputs.hidden)
    return total if stage.search_samples is None else min(stage.search_samples, total)


def _search_module(context: BlockContext, group: ScalingGroup, inspected_name: str, calls: _FloatCalls,
                   mean_abs: torch.Tensor, layers: dict[str, nn.Module], weights: dict[str, torch.Tensor],
                   quantized: set[str], pseudo_quantize: Callable[[torch.Tensor], torch.Tensor], stage: AWQStage,
                   search_dtype: str) -> torch.Tensor:
    """The reference code's search: the inspected module's (attention's, MLP's) output error, on the
    search segments, in `search_dtype` where it does not overflow."""
    inputs = [call.x for call in calls.attention] if group.inspect == "attention" else calls.mlp
    scales = None
    if search_dtype != "float32":
        dtype = getattr(torch, search_dtype)
        inspected = copy.deepcopy(context.module(inspected_name)).to(dtype)
        writable = {name: inspected.get_submodule(name[len(inspected_name) + 1:]) for name in layers}
        inspect = _inspector(group.inspect, inspected, _cast_floats(calls.attention, dtype))
        scales = search_scales(inspect, [x.to(dtype) for x in inputs], weights, writable, quantized,
                               pseudo_quantize, stage.grid, mean_abs)
        del inspected
    if scales is None:  # float32 asked for, or the low precision overflowed
        inspect = _inspector(group.inspect, context.module(inspected_name), calls.attention)
        scales = search_scales(inspect, inputs, weights, layers, quantized, pseudo_quantize, stage.grid, mean_abs)
        if scales is None:
            raise SlimlmError(f"block {context.index}: the float outputs of {inspected_name} are not finite; "
                              "check the model in float32 before quantizing it")
        for name, module in layers.items():  # the search left its last candidate in the live modules
            linear_weight(module).copy_(weights[name].to(linear_weight(module).dtype))
    return scales


def resolve_search_dtype(setting: str, device: torch.device) -> str:
    """`auto`: float16 (the reference code's precision) on a GPU or a CPU with float16 matrix instructions
    (AVX512-FP16, AMX-FP16); float32 elsewhere, where PyTorch emulates float16 matmuls 30-40x slower than
    float32 (measured on an AVX-512 EPYC without them: 4.7 s against 0.13 s for a 4096 x 576 x 1536 product)."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "float16"
    from slimlm.quant.cpu_kernels import cpu_flags_line

    flags = set(cpu_flags_line().split())
    return "float16" if device.type == "cpu" and flags & {"avx512_fp16", "amx_fp16"} else "float32"


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


class _InputStatistics:
    """What AWQ keeps of one input tensor (shared by the linears that read it) over the float pass: the mean
    |x| of each channel over every token (s_X), the Gram matrix X^T X / n of the search segments for the groups
    searched on it, and every `stride`-th token (of all the batches in order) for the clipping search."""

    def __init__(self, columns: int, device: torch.device, gram: bool, stride: int, batch: list[int]):
        self.batch = batch  # [search segments in the batch being run, its segments], kept up to date by the pass
        self.abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0
        self._gram = HessianAccumulator(columns, device) if gram else None
        self.stride = stride
        self._parts: list[torch.Tensor] = []  # the sampled rows of each batch
        self._samples: torch.Tensor | None = None  # joined at the first read, scaled with the layers after

    def add_batch(self, x: torch.Tensor) -> None:
        """One batch (segments, tokens, columns); its search segments (the first ones) enter the Gram matrix."""
        rows = x.reshape(-1, x.shape[-1])
        self.abs_sum += rows.abs().sum(0)  # float32 within a batch, float64 across batches
        if self._gram is not None and self.batch[0]:
            per_segment = rows.shape[0] // self.batch[1]
            self._gram.add_batch(rows[: self.batch[0] * per_segment])
        first = (-self.tokens) % self.stride  # the global positions 0, stride, 2 stride, ...
        self._parts.append(rows[first :: self.stride].float().clone())
        self.tokens += rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.tokens).float()

    def gram(self) -> torch.Tensor:
        return self._gram.result()  # 2 X^T X / n: the factor 2 does not move the minimum

    def samples(self) -> torch.Tensor:
        """The sampled tokens for the clipping search, (about clip_tokens, columns)."""
        if self._samples is None:
            self._samples = torch.cat(self._parts)
        return self._samples

    def scale_samples_(self, scales: torch.Tensor) -> None:
        self._samples = self.samples() / scales


@dataclass
class _FloatCalls:
    """What the float pass keeps whole: the attention and MLP calls of the search segments, every output."""

    attention: list[CachedCall]
    mlp: list[torch.Tensor]
    outputs: list[torch.Tensor]


def _first_segments(value, count: int, segments: int):
    """`value` (a call's arguments) cut to its first `count` segments: every tensor of two or more dimensions
    whose first dimension is the batch's `segments` (hidden states, a per-segment mask); others are shared."""
    if count == segments:
        return value
    if isinstance(value, torch.Tensor):
        return value[:count] if value.dim() >= 2 and value.shape[0] == segments else value
    if isinstance(value, CachedCall):
        return CachedCall(*(_first_segments(v, count, segments) for v in (value.x, value.args, value.kwargs)))
    if isinstance(value, (tuple, list)):
        return type(value)(_first_segments(v, count, segments) for v in value)
    if isinstance(value, dict):
        return {k: _first_segments(v, count, segments) for k, v in value.items()}
    return value


@torch.no_grad()
def _float_pass(context: BlockContext, names: dict[str, str], attention_name: str, mlp_name: str | None,
                gram: set[str], search_segments: int, clip_tokens: int
                ) -> tuple[_FloatCalls, dict[str, _InputStatistics]]:
    """Run the float block once: accumulate each linear input's statistics, keep the attention and MLP calls
    of the first `search_segments` segments, and return the block's outputs."""
    calls = _FloatCalls([], [], [])
    stride = max(1, context.inputs.tokens // clip_tokens)  # as the reference: every stride-th token
    shared = SharedInputs(lambda columns: None)
    left = [0, 0]  # search segments in this batch, segments in this batch

    def record_attention(_module, args, kwargs):
        if not left[0]:
            return
        if args:
            call = CachedCall(args[0], args[1:], dict(kwargs))
        else:
            call = CachedCall(kwargs["hidden_states"], (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        calls.attention.append(_first_segments(call, *left))

    def record_mlp(_module, args):
        if left[0]:
            calls.mlp.append(args[0][: left[0]])

    def record_linear(name: str):
        def hook(_module, args):
            shared.factory = lambda columns: _InputStatistics(columns, context.device, name in gram, stride, left)
            shared.add(name, args[0])
        return hook

    handles = [context.module(attention_name).register_forward_pre_hook(record_attention, with_kwargs=True)]
    if mlp_name is not None:
        handles.append(context.module(mlp_name).register_forward_pre_hook(record_mlp))
    for name in names.values():
        handles.append(context.module(name).register_forward_pre_hook(record_linear(name)))
    done = 0
    try:
        for hidden, args, kwargs in zip(context.inputs.hidden, context.inputs.args, context.inputs.kwargs):
            left[:] = [min(max(0, search_segments - done), hidden.shape[0]), hidden.shape[0]]
            calls.outputs.append(block_output(context.block(hidden, *args, **kwargs)))
            done += hidden.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return calls, {name: shared.pop(name) for name in names.values()}


def _scaling_groups(context: BlockContext, block, names: dict[str, str], has_mlp_module: bool) -> list[ScalingGroup]:
    readers = block.norm_readers()
    groups = [ScalingGroup(block.norms["attn_norm"], True, [names[r] for r in readers["attn_norm"]], "attention")]
    if "v" in names:
        v, o = context.module(names["v"]), context.module(names["o"])  # the live modules, not the adapter's snapshot
        if linear_weight(v).shape[0] == linear_weight(o).shape[1]:  # multi-head attention: o reads v one to one
            groups.append(ScalingGroup(v, False, [names["o"]], names["o"]))
    up = names[block.up_role]  # a fused gate_up's last rows are the up projection (Phi-3)
    groups.append(ScalingGroup(block.norms["mlp_norm"], True, [names[r] for r in readers["mlp_norm"]],
                               "mlp" if has_mlp_module else up))
    if "gate" in names or "gate_up" in names or _activation_is_relu(context, block):
        groups.append(ScalingGroup(context.module(up), False, [names["down"]], names["down"]))
    return groups


def _activation_is_relu(context: BlockContext, block) -> bool:
    return any(isinstance(m, nn.ReLU) for m in block.module.modules()) or getattr(
        context.model.config, "activation_function", None) == "relu"


def _inspector(kind: str, module: nn.Module, attention_calls: list[CachedCall]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A function (chunk index, input) -> the inspected module's output."""
    if kind == "attention":
        def run_attention(i: int, x: torch.Tensor) -> torch.Tensor:
            call = attention_calls[i]
            if call.args or "hidden_states" not in call.kwargs:
                return block_output(module(x, *call.args, **call.kwargs))
            return block_output(module(hidden_states=x, **call.kwargs))
        return run_attention
    return lambda _i, x: block_output(module(x))


def _cast_floats(value, dtype: torch.dtype):
    """`value` with every floating-point tensor inside it (tuples, lists, dicts, CachedCall) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, CachedCall):
        return CachedCall(_cast_floats(value.x, dtype), _cast_floats(value.args, dtype), _cast_floats(value.kwargs, dtype))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def candidate_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^alpha, normalised by sqrt(max(s) min(s)) (the reference code's `auto_scale`)."""
    scales = mean_abs.pow(alpha).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def _candidate_weight(weight: torch.Tensor, scales: torch.Tensor, quantize: bool,
                      pseudo_quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 (W diag(s) diag(s)^-1 for a linear the stage does not quantize)."""
    scaled = weight * scales[None, :]
    return (pseudo_quantize(scaled) if quantize else scaled) / scales[None, :]


@torch.no_grad()
def search_scales(
    inspect: Callable[[int, torch.Tensor], torch.Tensor],
    inputs: list[torch.Tensor],
    weights: dict[str, torch.Tensor],
    layers: dict[str, nn.Module],
    quantized: set[str],
    pseudo_quantize: Callable[[torch.Tensor], torch.Tensor],
    grid: int,
    mean_abs: torch.Tensor,
) -> torch.Tensor | None:
    """The per-input-channel scales s = s_X^alpha with the lowest output error of the inspected module (Eq. 5).

    `weights` are the float32 weights of `layers`, the modules `inspect` runs (which may be a
    lower-precision copy); each candidate Q(W diag(s)) diag(s)^-1 is computed from `weights` in
    float32 and written into `layers`. `mean_abs` is s_X. Returns None when the reference outputs are
    not finite (the precision of `inspect` overflowed).
    """
    reference = [inspect(i, x) for i, x in enumerate(inputs)]
    if not all(torch.isfinite(ref).all() for ref in reference):
        return None
    best = (math.inf, None)
    for step in range(grid):
        scales = candidate_scales(mean_abs, step / grid)
        for name, module in layers.items():
            candidate = _candidate_weight(weights[name], scales, name in quantized, pseudo_quantize)
            linear_weight(module).copy_(candidate.to(linear_weight(module).dtype))
        error = sum((ref.float() - inspect(i, x).float()).pow(2).sum().item()
                    for i, (ref, x) in enumerate(zip(reference, inputs)))
        error /= sum(ref.numel() for ref in reference)
        if error < best[0]:
            best = (error, scales.clone())
    return best[1]


@torch.no_grad()
def search_scales_gram(mean_abs: torch.Tensor, gram: torch.Tensor, weights: dict[str, torch.Tensor],
                       quantized: set[str], pseudo_quantize: Callable[[torch.Tensor], torch.Tensor],
                       grid: int) -> torch.Tensor:
    """`search_scales` for the outputs of the group's linears themselves, over every calibration token at once:
    with D = Q(W diag(s)) diag(s)^-1 - W, the squared output error on inputs X is tr(D X^T X D^T), so the Gram
    matrix G = X^T X replaces the tokens (a single-linear group's error is the reference's up to rounding)."""
    best = (math.inf, None)
    for step in range(grid):
        scales = candidate_scales(mean_abs, step / grid)
        error = 0.0
        for name, weight in weights.items():
            delta = _candidate_weight(weight, scales, name in quantized, pseudo_quantize) - weight
            error += float(((delta @ gram) * delta).sum())
        if error < best[0]:
            best = (error, scales.clone())
    return best[1]


def apply_scales(group: ScalingGroup, layers: dict[str, nn.Module], scales: torch.Tensor, norm_offset: float) -> None:
    """Fold per-input-channel scales into a group: the preceding op's output / s, the linears' columns * s
    (the float model is unchanged). Shared with SmoothQuant."""
    if group.prev_is_norm:
        divide_norm_(group.prev, scales, norm_offset)
    else:
        divide_output_channels_(group.prev, scales)
    for module in layers.values():
        multiply_input_channels_(module, scales)


@torch.no_grad()
def search_clip(weight: torch.Tensor, tokens: torch.Tensor, stage: AWQStage) -> torch.Tensor:
    """Per (output channel, group) clipping threshold with the lowest output error on the sampled tokens
    (every stride-th calibration token, about `clip_tokens` of them). The groups of one width are searched
    together (one batched product per shrink step), the shorter last group on its own."""
    bounds = group_bounds(weight.shape[1], stage.group_columns)
    best_max = torch.empty(weight.shape[0], len(bounds))
    first = 0
    while first < len(bounds):
        width = bounds[first][1] - bounds[first][0]
        last = first
        while last + 1 < len(bounds) and bounds[last + 1][1] - bounds[last + 1][0] == width:
            last += 1
        start, end = bounds[first][0], bounds[last][1]
        best_max[:, first : last + 1] = _search_clip_groups(weight[:, start:end], tokens[:, start:end].float(),
                                                            width, stage).T
        first = last + 1
    return best_max


def _search_clip_groups(weight: torch.Tensor, tokens: torch.Tensor, width: int, stage: AWQStage) -> torch.Tensor:
    """`search_clip` for consecutive groups of one `width`: the best thresholds, (groups, out)."""
    groups = weight.shape[1] // width
    w = weight.reshape(weight.shape[0], groups, width).transpose(0, 1)  # (groups, out, width)
    x = tokens.reshape(tokens.shape[0], groups, width).transpose(0, 1)  # (groups, tokens, width)
    reference = torch.bmm(x, w.transpose(1, 2))  # (groups, tokens, out)
    original_max = w.abs().amax(dim=2)
    best_error = torch.full_like(original_max, math.inf)
    best_max = original_max.clone()
    for i in range(int(stage.max_shrink * stage.clip_grid)):
        max_val = (original_max * (1 - i / stage.clip_grid))[..., None]
        clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
        candidate = fake_quantize_rows(clipped.reshape(-1, width), stage.bits, stage.symmetric).reshape(w.shape)
        error = (torch.bmm(x, candidate.transpose(1, 2)) - reference).pow_(2).mean(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_max = torch.where(better, max_val[..., 0], best_max)
    return best_max


def _clamp_groups(weight: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> torch.Tensor:
    clamped = weight.clone()
    for g, (start, end) in enumerate(group_bounds(weight.shape[1], group_size)):
        limit = max_val[:, g : g + 1]
        clamped[:, start:end] = torch.maximum(torch.minimum(weight[:, start:end], limit), -limit)
    return clamped


@register
class AWQStage(WeightQuantFields, Stage):
    """AWQ (Lin et al., 2024)."""

    method: Literal["awq"] = "awq"
    grid: int = Field(20, ge=2, description="alpha grid points in [0, 1]")
    clip_search: bool = True
    clip_grid: int = Field(20, ge=2)
    max_shrink: float = Field(0.5, gt=0, lt=1)
    clip_tokens: int = Field(512, ge=16, description="input tokens sampled for the clipping search")
    objective: Literal["module", "layer"] = Field(
        "module", description="the scale search's error: module = the output of the attention or MLP the group "
                              "feeds (the reference code), layer = the outputs of the group's linears (the paper's "
                              "Eq. 4, summed over the group), exact over every token from their input's Gram matrix")
    search_samples: int | None = Field(
        2, ge=1, description="calibration segments (the first ones) the scale search measures its error on; None = "
                             "all of them (the reference code; about 20 forward passes of the calibration set)")
    search_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="precision of the scale search's forward passes: auto = float16 (the reference "
                            "code's) where the device multiplies float16 natively, else float32")

    @field_validator("group_size")
    @classmethod
    def _not_per_tensor(cls, group_size: GroupSize) -> GroupSize:
        if group_size == "tensor":
            raise ValueError('AWQ scales per group or per channel: use an integer group_size or "channel"')
        return group_size

    def check(self, adapter: ModelAdapter, layers: dict[str, int]) -> None:
        super().check(adapter, layers)
        require_norm_per_half(adapter, "AWQ")

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        awq_block(context, self, report)
