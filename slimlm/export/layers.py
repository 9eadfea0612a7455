"""What the runtime exporters (GGUF, ONNX Runtime) read from a slimlm model, whatever the layer kind.

`weight_grid` gives a compressed linear's integer grid (codes, scales, zero points, the group of each
input column) through one interface for every kind that stores one (`quantized`, W8A8's `int8`);
`float_weight` gives the float weight of a linear that holds no grid (or refuses a kind it cannot
turn into one); `head_is_tied` tells whether the output head is the embedding matrix itself;
`check_block_modules` refuses blocks holding tensors a fixed runtime architecture has no place for.
Both `slimlm.export.gguf` and `slimlm.export.onnx` use these, so a layer is read the same way by both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.core.registry import layer_kind
from slimlm.errors import SlimlmError

_STORED_GRIDS = ("quantized", "quantized_embedding")  # QuantizedLinear's buffers: codes, scale, zero, g_idx


@dataclass
class WeightGrid:
    """A quantized layer's weight grid, whatever its layer kind: value = scale * (code - zero)."""

    module: str
    kind: str
    bits: int
    symmetric: bool
    group_size: int | None
    fmt: str
    in_features: int
    out_features: int
    layer: nn.Module
    quantizes_inputs: bool
    transforms_inputs: bool  # an input shift or divisor the weight alone does not express

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        if self.kind in ("int8", "llm_int8"):
            return (self.layer.weight.to(torch.int16) + 128).to(torch.uint8)
        return self.layer.codes()

    def scale(self) -> torch.Tensor:
        """(out, n_groups) scales as stored (float16, or float32 where float16 would lose precision)."""
        if self.kind in ("int8", "llm_int8"):
            return self.layer.weight_scale.reshape(-1, 1)
        return self.layer.scale

    def zero(self) -> torch.Tensor:
        """(out, n_groups) integer zero codes (symmetric grids: 2^(bits-1))."""
        zero = getattr(self.layer, "zero", None) if self.kind in _STORED_GRIDS else None
        if zero is None:
            return torch.full_like(self.scale(), 2 ** (self.bits - 1), dtype=torch.int32)
        return zero.to(torch.int32)

    def column_groups(self) -> torch.Tensor:
        """(in,) group index of each input column."""
        g_idx = getattr(self.layer, "g_idx", None) if self.kind in _STORED_GRIDS else None
        if g_idx is not None:
            return g_idx.long()
        if self.group_size is None:
            return torch.zeros(self.in_features, dtype=torch.long)
        return torch.arange(self.in_features) // self.group_size

    def act_order(self) -> bool:
        return self.kind in _STORED_GRIDS and getattr(self.layer, "g_idx", None) is not None

    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.layer, "bias", None)
        return None if bias is None else bias.detach().float()

    def dequantized(self) -> torch.Tensor:
        return self.layer.dequantize_weight().float()


def weight_grid(name: str, module: nn.Module) -> WeightGrid | None:
    """The integer (or FP / codebook) grid of a compressed linear; None for a layer that stores none."""
    kind = layer_kind(module)
    if kind in _STORED_GRIDS:
        transforms = getattr(module, "input_shift", None) is not None or getattr(module, "input_scale", None) is not None
        return WeightGrid(name, kind, module.bits, module.symmetric, module.group_size, module.fmt, module.in_features,
                          module.out_features, module, getattr(module, "input_quantizer", None) is not None, transforms)
    if kind == "int8":  # W8A8: int8 symmetric per-channel weights, code = weight + 128, zero 128
        return WeightGrid(name, kind, 8, True, None, "int", module.in_features, module.out_features, module, True,
                          False)
    return None


def float_weight(name: str, module: nn.Module, target: str = "GGUF") -> torch.Tensor:
    """(out, in) float32 weight of a linear without a grid (dense, sparse, LLM.int8()'s float16 copy)."""
    kind = layer_kind(module)
    if kind == "sparse":
        return module.dense_weight().detach().float()
    if kind == "llm_int8":  # outlier columns multiply the float16 weight, the rest its int8 rounding
        return module.weight_fp16.detach().float()
    if kind is not None:
        raise SlimlmError(f"{name}: layer kind {kind!r} has no {target} form; export the model before that stage "
                          "or dequantize it to a plain linear")
    if not isinstance(module, nn.Linear):
        raise SlimlmError(f"{name}: {type(module).__name__} is not a linear layer {target} can hold")
    return module.weight.detach().float()


def head_is_tied(model: nn.Module) -> bool:
    """True when the output head is the embedding matrix itself (a runtime then reuses the embedding)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return True
    if layer_kind(embedding) == "quantized_embedding":  # shares the quantized head's codes, or has its own
        return embedding.packed is getattr(head, "packed", None)
    weight = getattr(head, "weight", None) if layer_kind(head) is None else None
    return weight is not None and weight is embedding.weight


def check_block_modules(block: nn.Module, prefix: str, known_modules: Iterable[str], where: str) -> None:
    """Refuse blocks holding parameters or buffers outside `known_modules` (q/k norms, SliceGPT shortcuts...)."""
    modules = tuple(known_modules)

    def known(name: str) -> bool:
        return any(name.startswith(module + ".") for module in modules)

    for name, _ in block.named_parameters(recurse=True):
        if not known(name):
            raise SlimlmError(f"{prefix}.{name}: this block holds a tensor {where} has no place for (a structural "
                              "change such as SliceGPT shortcuts); export it natively")
    for name, buffer in block.named_buffers(recurse=True):
        if not known(name) and "rotary" not in name and buffer is not None and buffer.numel() > 0:
            raise SlimlmError(f"{prefix}.{name}: this block holds a tensor {where} has no place for; "
                              "export it natively")


def umask() -> int:
    """The process's file-creation mask (to give files made by mkstemp/mkdtemp the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
