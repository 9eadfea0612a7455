"""Export to the compressed-tensors `pack-quantized` checkpoint layout (transformers and vLLM load it).

Layout written, per quantized linear `name` (the format llm-compressor produces):

- `name.weight_packed`: int32 (out, ceil(in * bits / 32)). The codes of each row, zero-padded to a
  multiple of 32 columns, as one little-endian bit stream (code j at bits j*bits..), read as
  int32 words. compressed-tensors stores the signed value q - 2^(bits-1) plus the offset
  2^(bits-1): that is exactly slimlm's unsigned code;
- `name.weight_scale`: (out, groups) in the model's dtype;
- `name.weight_zero_point` (asymmetric only): the zero-point codes packed the same way along the
  output dimension, shape (ceil(out * bits / 32), groups);
- `name.weight_shape`: int64 [out, in];

and `config.json` gains a `quantization_config` with `quant_method: compressed-tensors`, format
`pack-quantized`, one config group per distinct (bits, group size, symmetry) whose `targets` list
the quantized module names, and an `ignore` list of the linears left in float. When any group is
asymmetric it also says `dequantize: true` (transformers' `CompressedTensorsConfig` option), see below.

Verified here (tests/test_export.py, transformers 5.25, compressed-tensors 0.20.1, CPU): a symmetric
export loads with plain `from_pretrained` and computes the same logits as slimlm's model. Asymmetric
exports hold the tensors compressed-tensors' own compressor makes (checked bit for bit), yet plain
loading of any asymmetric pack-quantized checkpoint (llm-compressor's included) fails in these
releases: transformers builds the compressed layout with the zero-point parameter unpacked, shape
(out, groups), and refuses the packed checkpoint tensor (size mismatch); writing it unpacked instead
fails in the decompressor, which always unpacks (llm-compressor #1618 / #1704, compressed-tensors
#458). Their dequantize-at-load path unpacks the zero points correctly, and with `dequantize: true` in
the config plain `from_pretrained` takes it: logits identical to slimlm's. The model is then dense in
memory after loading, which the compressed path also is after its first forward (it decompresses
then). vLLM was not tested (no GPU here); it reads the quantization groups and ignores that key.

The format cannot express a group size that does not divide a layer's width (slimlm's shorter
last group), non-integer grids, or act-order with a permuted group index; those fail with a
message that says which recipe setting to change (`static_groups: true` keeps act-order exportable).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from slimlm.core.packing import pack
from slimlm.core.registry import layer_kind
from slimlm.errors import SlimlmError
from slimlm.export.native import atomic_directory, save_extras

FORMAT = "pack-quantized"


def check_recipe_exportable(recipe, in_features: dict[str, int], selections: list[set[str]]) -> None:
    """Before any work: refuse recipes whose result this format cannot hold."""
    for stage, names in zip(recipe.stages, selections):
        if getattr(stage, "activations", None) is not None:
            raise SlimlmError("--export-ct: W8A8 activation quantization (Int8Linear) is not exported to "
                              "compressed-tensors yet; save the slimlm checkpoint only")
        size = getattr(stage, "group_columns", None)
        for name in names:
            if size is not None and in_features[name] % size:
                raise SlimlmError(
                    f"--export-ct: group_size {size} does not divide {name}'s {in_features[name]} input features, "
                    "which compressed-tensors cannot express; choose a group size that divides every width"
                )
        if getattr(stage, "act_order", False) and not getattr(stage, "static_groups", False):
            raise SlimlmError("--export-ct: act_order needs static_groups: true to be exportable")


def check_exportable(name: str, layer: nn.Module) -> None:
    """Fail with the fix if compressed-tensors cannot express this layer."""
    if layer.fmt != "int":
        raise SlimlmError(f"{name}: compressed-tensors pack-quantized holds integer grids only (this layer is {layer.fmt})")
    if layer.input_quantizer is not None or layer.input_shift is not None or layer.input_scale is not None:
        raise SlimlmError(f"{name}: this layer also quantizes its inputs (simulated W+A quantization), which the "
                          "pack-quantized export does not describe; export weight-only models")
    if layer.group_size is not None and layer.in_features % layer.group_size:
        raise SlimlmError(
            f"{name}: group_size {layer.group_size} does not divide its {layer.in_features} input features, which "
            "compressed-tensors cannot express; quantize with a group size that divides every layer's width"
        )
    if layer.g_idx is not None:
        raise SlimlmError(f"{name}: act-order with dynamic groups permutes the group index, which this export "
                          "does not write; quantize with act_order plus static_groups: true")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) -> int32 (rows, ceil(n * bits / 32)), compressed-tensors' dense packing."""
    columns = codes.shape[1]
    padded = F.pad(codes, (0, (-columns) % 32))  # 32 codes fill exactly `bits` words
    words = pack(padded, bits).contiguous().view(torch.int32)  # little-endian bytes -> words
    return words[:, : math.ceil(columns * bits / 32)].contiguous()


def export_compressed_tensors(
    model: PreTrainedModel, directory: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write `model` (quantized by slimlm) as a compressed-tensors checkpoint directory."""
    others = {name: kind for name, m in model.named_modules() if (kind := layer_kind(m)) not in (None, "quantized")}
    if others:
        listed = ", ".join(f"{name} ({kind})" for name, kind in list(others.items())[:4])
        raise SlimlmError(f"compressed-tensors' pack-quantized format holds quantized linears only; this model also "
                          f"has {listed}{' ...' if len(others) > 4 else ''} (a quantized embedding: quantize the head "
                          "without `embedding`); export it natively or as GGUF instead")
    quantized = {name: m for name, m in model.named_modules() if layer_kind(m) == "quantized"}
    if not quantized:
        raise SlimlmError("the model has no quantized layers to export")
    for name, layer in quantized.items():
        check_exportable(name, layer)
    refuse_transposed_layers(model, quantized)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tensors = _float_tensors(model, quantized)
    for name, layer in quantized.items():
        tensors.update(_layer_tensors(name, layer, dtype))
    config = model.config.to_dict()
    config["quantization_config"] = _quantization_config(model, quantized)
    return _write(directory, tensors, config, model, tokenizer)


def refuse_transposed_layers(model: PreTrainedModel, quantized) -> None:
    """compressed-tensors swaps only `nn.Linear` modules for its compressed ones when transformers loads a
    checkpoint; a quantized layer that the model class builds as GPT-2's transposed `Conv1D` would load as
    mismatched raw weights. Found on a weightless (meta) copy of the model's own class."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    transposed = sorted(name for name in quantized if isinstance(skeleton.get_submodule(name), Conv1D))
    if transposed:
        raise SlimlmError(f"{model.config.model_type} builds {transposed[0]} (and {len(transposed) - 1} more) as "
                          "transposed Conv1D layers, which compressed-tensors cannot load quantized; export this "
                          "model natively (slimlm save) instead")


def _float_tensors(model: PreTrainedModel, quantized: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every other tensor of the state dict; a tied head is left out (the config re-ties it)."""
    prefixes = tuple(f"{name}." for name in quantized)
    tied = {f"{name}.weight" for name, m in model.named_modules() if m is model.get_output_embeddings()}
    tie = getattr(model.config, "tie_word_embeddings", False)
    return {
        key: value.detach().contiguous().clone()
        for key, value in model.state_dict().items()
        if not key.startswith(prefixes) and not (tie and key in tied)
    }


def _layer_tensors(name: str, layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.weight_packed": pack_int32(layer.codes(), layer.bits),
        f"{name}.weight_scale": layer.scale.to(dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(layer.zero.T.contiguous(), layer.bits).T.contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.to(dtype).contiguous()
    return out


def _quantization_config(model: PreTrainedModel, quantized: dict[str, nn.Module]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for name, layer in quantized.items():
        groups.setdefault((layer.bits, layer.group_size, layer.symmetric), []).append(name)
    config_groups = {
        f"group_{i}": {
            "targets": names,
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": symmetric,
                "strategy": "group" if group_size is not None else "channel", "group_size": group_size,
                "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            },
            "input_activations": None, "output_activations": None, "format": FORMAT,
        }
        for i, ((bits, group_size, symmetric), names) in enumerate(groups.items())
    }
    float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": float_linears, "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    }
    if not all(symmetric for (_, _, symmetric) in groups):
        config["dequantize"] = True  # the load path that unpacks zero points (see the module docstring)
    return config


def _write(directory, tensors, config: dict, model: PreTrainedModel, tokenizer) -> Path:
    with atomic_directory(directory) as staging:
        # One metadata key: safetensors writes the map in no fixed order, and outputs must be byte-reproducible.
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_extras(staging, model, tokenizer)
    return Path(directory).expanduser()
