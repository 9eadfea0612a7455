"""Function-preserving rewrites of weights: scale a channel out of one operation and into the next.

Used by AWQ (and by every method that migrates scales between layers: SmoothQuant, OmniQuant's
LET, SliceGPT's norm fusion). Linears may be nn.Linear, (out, in) weights, or GPT-2's Conv1D,
(in, out) weights; norms may scale by `weight` or, in the Gemma families, by `1 + weight`.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def divide_norm_(norm: nn.Module, scales: torch.Tensor, weight_offset: float = 0.0) -> None:
    """Make the norm's output x / scales per channel: (offset + w') = (offset + w) / scales, bias / scales."""
    scales = scales.to(norm.weight.device, torch.float32)
    effective = (norm.weight.float() + weight_offset) / scales
    norm.weight.copy_((effective - weight_offset).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / scales).to(norm.bias.dtype))


@torch.no_grad()
def divide_output_channels_(linear: nn.Module, scales: torch.Tensor) -> None:
    """Make the linear's outputs y / scales: divide its weight rows (and bias) by the scales."""
    scales = scales.to(linear.weight.device, torch.float32)
    if isinstance(linear, nn.Linear):
        # When a fused projection feeds the scaled layer, only its last rows are that layer's input.
        rows = linear.weight[-scales.numel() :]
        rows.copy_((rows.float() / scales[:, None]).to(rows.dtype))
    else:  # Conv1D: (in, out)
        cols = linear.weight[:, -scales.numel() :]
        cols.copy_((cols.float() / scales[None, :]).to(cols.dtype))
    if linear.bias is not None:
        part = linear.bias[-scales.numel() :]
        part.copy_((part.float() / scales).to(part.dtype))


@torch.no_grad()
def multiply_input_channels_(linear: nn.Module, scales: torch.Tensor) -> None:
    """Make the linear accept x / scales unchanged: multiply its weight's input columns by the scales."""
    scales = scales.to(linear.weight.device, torch.float32)
    if isinstance(linear, nn.Linear):
        linear.weight.copy_((linear.weight.float() * scales[None, :]).to(linear.weight.dtype))
    else:  # Conv1D: (in, out)
        linear.weight.copy_((linear.weight.float() * scales[:, None]).to(linear.weight.dtype))
