"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization
for On-Device LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978). Implemented as in
the authors' code (mit-han-lab/llm-awq, `auto_scale.py`, `auto_clip.py`), block by block:

1. One float forward pass of the block caches the inputs of its linears, of its attention module
   (with the keyword arguments the block passes it) and of its MLP.
2. Scaling search (Sec. 3.2, Eq. 4-5) for each group of linears that share an input:
   s = s_X^alpha with s_X the mean |x| of each input channel, normalised by sqrt(max(s) min(s)),
   for alpha on a grid of `grid` points in [0, 1); the loss is the mean squared error of the
   inspected module's output with the group's weights replaced by Q(W diag(s)) diag(s)^-1.
   Groups: [q, k, v] after the attention norm (inspecting the attention module); [o] after [v]
   when their shapes match (multi-head attention only, as the reference skips it for GQA);
   [gate, up] (or [up]) after the MLP norm (inspecting the MLP); [down] after [up] when a gate
   or a ReLU makes the scaling exact.
3. The best s is folded into the preceding operation (norm weight and bias, or the previous
   linear's output rows) and multiplied into the group's weights: the float model is unchanged.
4. Clipping search (Sec. 3.3 of the code's `auto_clip`): for every linear except q and k, per
   output channel and group, the clipping range max|w| * (1 - i / clip_grid), i < max_shrink *
   clip_grid, that minimises the output error on `clip_tokens` sampled inputs.
5. Group-wise round-to-nearest quantization with the shared grid.

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
from slimlm.core.stage import Stage, register
from slimlm.core.transforms import divide_norm_, divide_output_channels_, multiply_input_channels_
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, require_norm_per_half
from slimlm.quant.fields import GroupSize, WeightQuantFields
from slimlm.quant.grid import fake_quantize, fake_quantize_groups, find_params, group_bounds, quantize_weight
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
    attention = context.module(_parent(names.get("q", names.get("qkv"))))
    mlp_name = _parent(names[block.up_role])
    mlp = context.module(mlp_name) if mlp_name != prefix.rstrip(".") else None

    linear_inputs, attention_calls, mlp_inputs, outputs = _float_pass(context, names, attention, mlp)
    context.next_inputs = outputs  # AWQ calibrates the next block on float outputs

    def pseudo_quantize(weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_groups(weight, stage.bits, stage.group_columns, stage.symmetric)

    for group in _scaling_groups(context, block, names, mlp is not None):
        inspected_name = {"attention": _parent(names.get("q", names.get("qkv"))), "mlp": mlp_name}.get(group.inspect, group.inspect)
        inputs = [call.x for call in attention_calls] if group.inspect == "attention" else (
            mlp_inputs if group.inspect == "mlp" else linear_inputs[group.inspect])
        layers = {name: context.module(name) for name in group.layers}
        weights = {name: linear_weight(m).detach().float().clone() for name, m in layers.items()}
        quantized = {name for name in layers if name in context.targets}
        scales = None
        search_dtype = resolve_search_dtype(stage.search_dtype, context.device)
        report.notes["awq_search_dtype"] = search_dtype
        if search_dtype != "float32":
            dtype = getattr(torch, search_dtype)
            inspected = copy.deepcopy(context.module(inspected_name)).to(dtype)
            writable = {name: inspected.get_submodule(name[len(inspected_name) + 1:]) for name in layers}
            inspect = _inspector(group.inspect, inspected, _cast_floats(attention_calls, dtype))
            scales = search_scales(inspect, [x.to(dtype) for x in inputs], weights, writable, quantized,
                                   pseudo_quantize, stage.grid, activations=inputs)
            del inspected
        if scales is None:  # float32 asked for, or the low precision overflowed
            inspect = _inspector(group.inspect, context.module(inspected_name), attention_calls)
            scales = search_scales(inspect, inputs, weights, layers, quantized, pseudo_quantize, stage.grid)
            if scales is None:
                raise SlimlmError(f"block {context.index}: the float outputs of {inspected_name} are not finite; "
                                  "check the model in float32 before quantizing it")
            for name, module in layers.items():  # the search left its last candidate in the live modules
                linear_weight(module).copy_(weights[name].to(linear_weight(module).dtype))
        apply_scales(group, layers, scales, context.adapter.norm_weight_offset)
        for name in group.layers:  # the clipping search sees the inputs the scaled layers now get
            linear_inputs[name] = [x / scales.to(x.dtype) for x in linear_inputs[name]]

    for name, role in context.targets.items():
        module = context.module(name)
        weight = linear_weight(module)
        if stage.clip_search and role not in NO_CLIP_ROLES:
            max_val = search_clip(weight.detach().float(), linear_inputs[name], stage)
            weight.copy_(_clamp_groups(weight.float(), max_val, stage.group_columns).to(weight.dtype))
        quantized = quantize_weight(weight.detach().float(), stage.bits, stage.group_columns, stage.symmetric)
        context.replace(name, QuantizedLinear.replacing(module, quantized))
    seconds = (time.perf_counter() - start) / max(1, len(context.targets))
    report.layers += [LayerReport(name, "awq", seconds) for name in context.targets]


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


@torch.no_grad()
def _float_pass(context: BlockContext, names: dict[str, str], attention: nn.Module, mlp: nn.Module | None):
    """Run the float block once, recording every linear's input and the attention and MLP calls."""
    linear_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names.values()}
    attention_calls: list[CachedCall] = []
    mlp_inputs: list[torch.Tensor] = []

    def record_attention(_module, args, kwargs):
        if args:
            attention_calls.append(CachedCall(args[0], args[1:], dict(kwargs)))
        else:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            attention_calls.append(CachedCall(kwargs["hidden_states"], (), rest))

    handles = [attention.register_forward_pre_hook(record_attention, with_kwargs=True)]
    if mlp is not None:
        handles.append(mlp.register_forward_pre_hook(lambda _m, args: mlp_inputs.append(args[0])))
    for name in names.values():
        handles.append(context.module(name).register_forward_pre_hook(
            lambda _m, args, name=name: linear_inputs[name].append(args[0])))
    try:
        outputs = context.run()
    finally:
        for handle in handles:
            handle.remove()
    return linear_inputs, attention_calls, mlp_inputs, outputs


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


@torch.no_grad()
def search_scales(
    inspect: Callable[[int, torch.Tensor], torch.Tensor],
    inputs: list[torch.Tensor],
    weights: dict[str, torch.Tensor],
    layers: dict[str, nn.Module],
    quantized: set[str],
    pseudo_quantize: Callable[[torch.Tensor], torch.Tensor],
    grid: int,
    activations: list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The per-input-channel scales s = s_X^alpha with the lowest output error (Eq. 5).

    `weights` are the float32 weights of `layers`, the modules `inspect` runs (which may be a
    lower-precision copy); each candidate Q(W diag(s)) diag(s)^-1 is computed from `weights` in
    float32 and written into `layers`. `activations` (default `inputs`) give s_X. Returns None when
    the reference outputs are not finite (the precision of `inspect` overflowed).
    """
    activations = inputs if activations is None else activations
    channel_sum = sum(x.abs().reshape(-1, x.shape[-1]).float().sum(0) for x in activations)
    activation_scale = channel_sum / sum(x.numel() // x.shape[-1] for x in activations)
    reference = [inspect(i, x) for i, x in enumerate(inputs)]
    if not all(torch.isfinite(ref).all() for ref in reference):
        return None
    best = (math.inf, None)
    for step in range(grid):
        alpha = step / grid
        scales = activation_scale.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for name, module in layers.items():
            scaled = weights[name] * scales[None, :]
            if name in quantized:
                scaled = pseudo_quantize(scaled)
            linear_weight(module).copy_((scaled / scales[None, :]).to(linear_weight(module).dtype))
        error = sum((ref.float() - inspect(i, x).float()).pow(2).sum().item()
                    for i, (ref, x) in enumerate(zip(reference, inputs)))
        error /= sum(ref.numel() for ref in reference)
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
def search_clip(weight: torch.Tensor, inputs: list[torch.Tensor], stage: AWQStage) -> torch.Tensor:
    """Per (output channel, group) clipping threshold with the lowest output error on sampled tokens."""
    tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).float()
    tokens = tokens[:: max(1, tokens.shape[0] // stage.clip_tokens)]
    bounds = group_bounds(weight.shape[1], stage.group_columns)
    best_max = torch.empty(weight.shape[0], len(bounds))
    for g, (start, end) in enumerate(bounds):
        w, x = weight[:, start:end], tokens[:, start:end]
        reference = x @ w.T  # (tokens, out)
        original_max = w.abs().amax(dim=1)
        best_error = torch.full_like(original_max, math.inf)
        best_max[:, g] = original_max
        for i in range(int(stage.max_shrink * stage.clip_grid)):
            max_val = original_max * (1 - i / stage.clip_grid)
            clipped = torch.maximum(torch.minimum(w, max_val[:, None]), -max_val[:, None])
            scale, zero = find_params(clipped, stage.bits, stage.symmetric)
            error = (x @ fake_quantize(clipped, scale, zero, stage.bits).T - reference).pow(2).mean(dim=0)
            better = error < best_error
            best_error[better] = error[better]
            best_max[better, g] = max_val[better]
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
