"""GGUF export for llama.cpp: slimlm's quantized weights carried into GGUF block formats.

`export_gguf(model, tokenizer, path, ftype="auto")` writes one `.gguf` file that llama.cpp loads:
architecture keys as llama.cpp's `convert_hf_to_gguf.py` writes them (`llama` for Llama and Mistral,
`qwen2` for Qwen2), the BPE vocabulary (tokens, merges, token types, special ids, chat template)
and the tensors under llama.cpp's names, with the rows of `attn_q` / `attn_k` permuted for the
`llama` architecture the way the converter does (a row permutation moves whole rows, so the
per-row quantization blocks stay intact).

How each weight is stored (`GGUFExport.tensors` records it, tensor by tensor):

- A slimlm quantized linear (integer grid, `code` with scale and zero point per group) is
  **carried**: its codes and scales become GGUF blocks, no re-rounding of the weights. A GGUF block
  holds 32 consecutive input columns with one float16 scale (and offset), so this is possible when
  every 32-column block lies inside one slimlm group (group sizes that are multiples of 32,
  per-channel grids, act-order whose group index is constant on each 32-column block) and the grid
  fits the block format's code range:

  | GGUF type | value       | carries                                                          |
  |-----------|-------------|------------------------------------------------------------------|
  | Q8_0      | d * q       | symmetric up to 8 bits (q = code - zero), asymmetric up to 7 bits |
  | Q4_0      | d * (q - 8) | symmetric up to 4 bits (q = code - zero + 8)                      |
  | Q5_0      | d * (q - 16)| symmetric up to 5 bits                                            |
  | Q4_1      | d * q + m   | up to 4 bits (q = code, m = -scale * zero)                        |
  | Q5_1      | d * q + m   | up to 5 bits                                                      |

  d is slimlm's scale in float16: exact when the scale is stored in float16 (slimlm's default);
  a float32 scale is rounded and the relative error of that rounding is reported. In Q4_1/Q5_1 the
  offset m = -scale * zero is rounded to float16 as well (at most half a float16 unit in the last
  place of m, reported as `max_error_steps`: the largest weight error in units of the group's step).
- Anything the block formats cannot carry (other grids, shorter groups, act-order mixing groups
  inside a block, a target type too narrow for the grid) is **re-quantized** from slimlm's
  dequantized weight with gguf-py's reference quantizers (llama.cpp's `quantize_row_*_ref`, no
  importance matrix), and the error is reported, unless `exact=True` (or `ftype="auto"`), which
  refuses such a model before writing and lists the formats that would carry each layer.
- Float weights: linears to the target type (re-quantized, error reported; `float_type` when
  `ftype` is `auto` or `exact`), the token embedding and untied output head to `embedding_type`
  (default Q8_0 for quantized files: llama-quantize's choice for these tensors is Q6_K, which it
  replaces by Q8_0 when the width is not a multiple of 256 — SmolLM2's 576 — and gguf-py cannot
  write Q6_K), norms and biases F32. A tensor whose row width is not a multiple of the block size
  falls back to F16, as llama-quantize does for the 32-wide block types.

gguf-py (0.19) reads K-quants but cannot write them: K-quant types are refused with the way to
make them (export F16, then llama.cpp's `llama-quantize`). Layers that also quantize their inputs
(W8A8, simulated W+A grids) are refused unless `drop_activation_quantization=True`: GGUF stores
weights only and llama.cpp picks its own activation precision. The file is written to a temporary
sibling and renamed into place, after every check has passed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.core.registry import layer_kind
from slimlm.errors import SlimlmError
from slimlm.export.layers import WeightGrid as _Grid
from slimlm.export.layers import check_block_modules, float_weight, head_is_tied, umask, weight_grid

try:  # optional dependency: only this exporter needs it
    import gguf
    from gguf import GGMLQuantizationType as GGML
except ImportError:  # pragma: no cover - reported when an export is requested
    gguf = None
    GGML = None

BLOCK = 32  # columns per block of every type written here
FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
FTYPES = ("auto", *FLOAT_TYPES, *BLOCK_TYPES)
K_QUANTS = ("q2_k", "q3_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s",
            "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
# (code offset for symmetric blocks or None for affine ones, largest symmetric bits, largest asymmetric bits)
_BLOCK_RANGE = {"q8_0": (0, 8, 7), "q4_0": (8, 4, 0), "q5_0": (16, 5, 0), "q4_1": (None, 4, 4),
                "q5_1": (None, 5, 5)}
_SMALLEST_FIRST = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
# transformers model_type -> (GGUF architecture, permute attn_q/attn_k rows for rotary like convert_hf_to_gguf)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# llama.cpp's names for the BPE pre-tokenizers it implements, by convert_hf_to_gguf's check hash
# (sha256 of str(tokenizer.encode(CHECK_TEXT))).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
    "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class TensorRecord:
    """How one GGUF tensor was made and what it cost (errors against slimlm's own weight values)."""

    name: str
    source: str
    shape: list[int]
    ggml_type: str
    how: str  # "carried" (slimlm codes and scales), "requantized", "float", "fallback-f16"
    bytes: int
    max_abs_error: float = 0.0
    rel_rms_error: float = 0.0
    max_error_steps: float | None = None  # carried: largest |error| / the block's step
    scale_rounding_rel_max: float | None = None  # carried: float32 scale -> float16
    scale_rounding_rel_mean: float | None = None
    note: str = ""


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: str
    bytes: int
    ftype: str
    architecture: str
    pre_tokenizer: str
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Counts by storage and type, and the worst errors of carried and re-quantized weights."""
        out: dict = {"path": self.path, "bytes": self.bytes, "ftype": self.ftype, "architecture": self.architecture,
                     "pre_tokenizer": self.pre_tokenizer, "tensors": len(self.tensors),
                     "by_type": dict(Counter(t.ggml_type for t in self.tensors)),
                     "by_storage": dict(Counter(t.how for t in self.tensors))}
        for how in ("carried", "requantized", "float", "fallback-f16"):
            chosen = [t for t in self.tensors if t.how == how and len(t.shape) == 2]
            if chosen:
                out[f"{how}_max_abs_error"] = max(t.max_abs_error for t in chosen)
                out[f"{how}_max_rel_rms_error"] = max(t.rel_rms_error for t in chosen)
        steps = [t.max_error_steps for t in self.tensors if t.max_error_steps is not None]
        if steps:
            out["carried_max_error_steps"] = max(steps)
        rounding = [t for t in self.tensors if t.scale_rounding_rel_max is not None]
        if rounding:
            out["scale_rounding_rel_max"] = max(t.scale_rounding_rel_max for t in rounding)
            out["scale_rounding_rel_mean"] = sum(t.scale_rounding_rel_mean for t in rounding) / len(rounding)
        out["notes"] = self.notes
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "tensor_records": [asdict(t) for t in self.tensors]}


@dataclass
class _Item:
    """One tensor to write: its GGUF name, where it comes from and the type asked for it."""

    name: str
    source: str
    weight: torch.Tensor | None  # float tensors
    grid: _Grid | None  # quantized linears
    target: str
    role: str  # "linear", "embedding", "norm", "bias"
    permute_heads: int | None = None  # llama q/k: number of heads for the row permutation


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike[str],
    ftype: str = "auto",
    float_type: str = "f16",
    embedding_type: str | None = None,
    exact: bool = False,
    pre_tokenizer: str | None = None,
    drop_activation_quantization: bool = False,
    overwrite: bool = False,
) -> GGUFExport:
    """Write `model` (float or quantized by slimlm) and its tokenizer as a GGUF file for llama.cpp.

    ftype: "auto" carries every quantized layer in the smallest block format that holds it exactly
    and stores float weights as `float_type`; a type name ("q4_0", "q8_0", "f16", ...) targets that
    type: quantized layers that fit it are carried, others re-quantized (error reported) unless
    `exact`. Everything is checked before the file is written; see the module docstring.
    """
    check_options(ftype, float_type, embedding_type, exact)
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise SlimlmError(f"{target} exists: choose another output file or pass overwrite=True (--overwrite)")
    if tokenizer is None:
        raise SlimlmError("a GGUF file needs the tokenizer (llama.cpp reads the vocabulary from it): "
                          "load the model with its tokenizer")
    architecture, permute = _architecture(model)
    items = _plan(model, architecture, permute, ftype, float_type, embedding_type, exact,
                  drop_activation_quantization)
    vocab = _vocabulary(model, tokenizer, pre_tokenizer)
    encoded = [_encode(item) for item in items]  # all conversions done before the file exists
    result = GGUFExport(str(target), 0, ftype, architecture, vocab["pre"], [record for _, _, record in encoded])
    result.notes.extend(_notes(items, drop_activation_quantization))
    _write(target, model, architecture, items, encoded, vocab, _file_type(ftype, result.tensors))
    result.bytes = target.stat().st_size
    return result


def exact_formats(grid: _Grid) -> list[str]:
    """The GGUF block types that hold this grid exactly (smallest first); empty if none."""
    if not _aligned(grid):
        return []
    fits = []
    for name in _SMALLEST_FIRST:
        _, symmetric_bits, asymmetric_bits = _BLOCK_RANGE[name]
        if grid.bits <= (symmetric_bits if grid.symmetric else asymmetric_bits):
            fits.append(name)
    return fits


def _aligned(grid: _Grid) -> bool:
    """An integer grid whose every 32-column block lies inside one group (one scale per block)."""
    if grid.fmt != "int" or grid.in_features % BLOCK:
        return False
    blocks = grid.column_groups().reshape(-1, BLOCK)
    return bool((blocks == blocks[:, :1]).all())


# --------------------------------------------------------------------------------------------------
# Checks and the plan
# --------------------------------------------------------------------------------------------------

def check_options(ftype: str, float_type: str, embedding_type: str | None, exact: bool) -> None:
    if gguf is None:
        raise SlimlmError("GGUF export needs the gguf package: pip install gguf")
    if exact and ftype in FLOAT_TYPES:
        raise SlimlmError(f"exact applies to the block types ({', '.join(BLOCK_TYPES)}) and auto, not {ftype}")
    for option, value, allowed in (("ftype", ftype, FTYPES), ("float_type", float_type, FLOAT_TYPES),
                                   ("embedding_type", embedding_type, (*FLOAT_TYPES, *BLOCK_TYPES))):
        if value is None and option == "embedding_type":
            continue
        if value in K_QUANTS:
            raise SlimlmError(f"{option} {value}: gguf-py can read K-quants but not write them; export "
                              f"--type f16 (or f32) and run llama.cpp's llama-quantize FILE OUT {value.upper()}, "
                              f"or choose one of {', '.join(allowed)}")
        if value not in allowed:
            raise SlimlmError(f"unknown {option} {value!r}: choose one of {', '.join(allowed)}")


def _architecture(model: nn.Module) -> tuple[str, bool]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SlimlmError(f"GGUF export supports the {', '.join(ARCHITECTURES)} families (got {model_type!r}); "
                          "export another family with the native or compressed-tensors format")
    return ARCHITECTURES[model_type]


def _plan(model, architecture: str, permute: bool, ftype: str, float_type: str, embedding_type: str | None,
          exact: bool, drop_activation_quantization: bool) -> list[_Item]:
    """Every tensor to write with its target type; refuses (before any file exists) what cannot be written."""
    config = model.config
    strict = exact or ftype == "auto"
    linear_float = float_type if strict else ftype
    embed_type = embedding_type or (ftype if ftype in FLOAT_TYPES else "q8_0")
    inner = model.model
    problems: list[str] = []
    if weight_grid("model.embed_tokens", inner.embed_tokens) is not None:
        # a quantized embedding: its codes carried into the format that fits them, unless one is asked for
        items = [_linear_item("token_embd.weight", "model.embed_tokens", inner.embed_tokens,
                              embedding_type or "auto", embed_type, exact, drop_activation_quantization, None,
                              problems)]
    else:
        items = [_Item("token_embd.weight", "model.embed_tokens.weight",
                       inner.embed_tokens.weight.detach().float(), None, embed_type, "embedding")]
    layers = list(inner.layers)
    if len(layers) != config.num_hidden_layers:
        raise SlimlmError(f"the model has {len(layers)} blocks but its config says {config.num_hidden_layers}; "
                          "GGUF needs them to agree")
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    for index, block in enumerate(layers):
        prefix = f"model.layers.{index}"
        check_block_modules(block, prefix, _BLOCK_NAMES, "the GGUF llama/qwen2 architecture")
        for local, short in _BLOCK_NAMES.items():
            module = block.get_submodule(local)
            name, source = f"blk.{index}.{short}", f"{prefix}.{local}"
            if short.endswith("norm"):
                items.append(_Item(f"{name}.weight", f"{source}.weight", module.weight.detach().float(), None,
                                   "f32", "norm"))
                continue
            rotary = heads.get(local) if permute else None
            items.append(_linear_item(f"{name}.weight", source, module, ftype, linear_float, strict,
                                      drop_activation_quantization, rotary, problems))
            bias = getattr(module, "bias", None)
            if bias is not None:
                items.append(_Item(f"{name}.bias", f"{source}.bias", bias.detach().float(), None, "f32", "bias",
                                   rotary))
    items.append(_Item("output_norm.weight", "model.norm.weight", inner.norm.weight.detach().float(), None,
                       "f32", "norm"))
    head = model.get_output_embeddings()
    if not head_is_tied(model):
        grid = weight_grid("lm_head", head)
        if grid is not None:
            items.append(_linear_item("output.weight", "lm_head", head, ftype, embed_type, strict,
                                      drop_activation_quantization, None, problems))
        else:
            items.append(_Item("output.weight", "lm_head.weight", float_weight("lm_head", head), None, embed_type,
                               "embedding"))
    if problems:
        raise SlimlmError("cannot write this model to GGUF " + ("exactly" if strict else "") + ":\n  "
                          + "\n  ".join(problems))
    return items


def _linear_item(name: str, source: str, module: nn.Module, ftype: str, float_target: str, strict: bool,
                 drop_activation_quantization: bool, rotary: int | None, problems: list[str]) -> _Item:
    grid = weight_grid(source, module)
    if layer_kind(module) == "llm_int8" and not drop_activation_quantization:
        raise SlimlmError(f"{source}: LLM.int8() picks int8 or float16 per input column at run time, which GGUF "
                          "does not describe; pass drop_activation_quantization=True (--drop-activation-quant) to "
                          "export its float16 weight re-quantized to the target type")
    if grid is None:
        return _Item(name, f"{source}.weight", float_weight(source, module), None, float_target, "linear", rotary)
    if grid.transforms_inputs:
        raise SlimlmError(f"{source}: this layer shifts or rescales its inputs before the matmul (OmniQuant LET, "
                          "LLM-FP4), which a GGUF weight cannot express; export a weight-only model")
    if grid.quantizes_inputs and not drop_activation_quantization:
        raise SlimlmError(f"{source}: this layer also quantizes its activations ({grid.kind}), which GGUF does not "
                          "describe (llama.cpp chooses its own activation precision); pass "
                          "drop_activation_quantization=True (--drop-activation-quant) to export its weights, "
                          "or export a weight-only model")
    fits = exact_formats(grid)
    target = (fits[0] if fits else None) if ftype == "auto" else ftype
    if ftype in FLOAT_TYPES and not strict:
        return _Item(name, source, grid.dequantized(), None, ftype, "linear", rotary)
    if target is None or target not in fits:
        if strict:
            problems.append(_refusal(grid, ftype, fits))
        return _Item(name, source, grid.dequantized(), None, target or float_target, "linear", rotary)
    return _Item(name, source, None, grid, target, "linear", rotary)


def _refusal(grid: _Grid, ftype: str, fits: list[str]) -> str:
    grouping = "per channel" if grid.group_size is None else f"group {grid.group_size}"
    what = f"{grid.module}: {grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} {grid.fmt}, {grouping}"
    if grid.fmt != "int":
        why = "GGUF block formats hold integer grids only"
    elif not _aligned(grid):
        why = ("its groups do not line up with GGUF's 32-column blocks (group size not a multiple of 32, or "
               "act-order mixing groups inside a block: quantize with static_groups: true)")
    else:
        why = f"its codes do not fit {ftype.upper()}"
    exact = f"formats that carry it exactly: {', '.join(fits)}" if fits else "no GGUF block format carries it exactly"
    return (f"{what}: {why}; {exact}; or choose --type {'/'.join(BLOCK_TYPES)} without --exact to re-quantize "
            "it (error reported)")


# --------------------------------------------------------------------------------------------------
# Encoding tensors
# --------------------------------------------------------------------------------------------------

def _row_order(rows: int, heads: int | None) -> torch.Tensor | None:
    """convert_hf_to_gguf's `permute` for llama q/k rows as an index: new row r is old row order[r]."""
    if heads is None:
        return None
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _encode(item: _Item) -> tuple[np.ndarray, GGML, TensorRecord]:
    """(data, GGUF type, record) of one tensor."""
    if item.grid is not None:
        return _carry(item)
    weight = item.weight
    order = _row_order(weight.shape[0], item.permute_heads)
    if order is not None:
        weight = weight[order]
    target, how = item.target, ("float" if item.target in FLOAT_TYPES else "requantized")
    note = ""
    if weight.dim() == 1:
        target, how = "f32", "float"
    elif target in BLOCK_TYPES and weight.shape[1] % BLOCK:
        target, how = "f16", "fallback-f16"
        note = f"row width {weight.shape[1]} is not a multiple of {BLOCK}: F16, as llama-quantize falls back"
    qtype = GGML[target.upper()]
    source = weight.numpy().astype(np.float32)
    data = gguf.quants.quantize(source, qtype)
    back = gguf.quants.dequantize(data, qtype).reshape(source.shape)
    record = TensorRecord(item.name, item.source, list(source.shape), qtype.name, how, int(data.nbytes),
                          *_errors(back, source), note=note)
    return data, qtype, record


def _errors(back: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    difference = back.astype(np.float64) - source.astype(np.float64)
    norm = float(np.sqrt((source.astype(np.float64) ** 2).sum()))
    rms = float(np.sqrt((difference ** 2).sum()))
    return float(np.abs(difference).max()) if difference.size else 0.0, rms / norm if norm else rms


def _carry(item: _Item) -> tuple[np.ndarray, GGML, TensorRecord]:
    """Pack a quantized layer's codes and scales into GGUF blocks of `item.target` (no re-rounding)."""
    grid, target = item.grid, item.target
    offset = _BLOCK_RANGE[target][0]
    block_group = grid.column_groups().reshape(-1, BLOCK)[:, 0]  # (n_blocks,) one group per block
    scale = grid.scale().float()[:, block_group]  # (out, n_blocks)
    zero = grid.zero()[:, block_group]
    codes = grid.codes().to(torch.int32).reshape(grid.out_features, -1, BLOCK)  # (out, n_blocks, 32)
    d16 = scale.to(torch.float16)
    if not bool(torch.isfinite(d16).all()):
        raise SlimlmError(f"{grid.module}: a scale overflows float16 (GGUF block scales are float16); "
                          "this layer cannot be written to GGUF")
    if offset is None:  # affine block: d * q + m, q = code, m = -scale * zero in float16
        q, m16 = codes, (-(scale.double() * zero.double())).to(torch.float16)
    else:
        q, m16 = codes - zero[..., None] + offset, None
    rounding = _scale_rounding(scale, d16)
    order = _row_order(grid.out_features, item.permute_heads)
    if order is not None:
        q, d16, m16 = q[order], d16[order], None if m16 is None else m16[order]
    data = _pack_blocks(target, q, d16, m16)
    qtype = GGML[target.upper()]
    reference = grid.dequantized()
    if order is not None:
        reference = reference[order]
    back = gguf.quants.dequantize(data, qtype).reshape(reference.shape)
    max_abs, rel_rms = _errors(back, reference.numpy())
    step = d16.float().abs().repeat_interleave(BLOCK, dim=1).numpy()  # llama.cpp's Q4_0 rule makes d < 0
    error = np.abs(back.astype(np.float64) - reference.numpy().astype(np.float64))
    steps = float(np.where(step > 0, error / np.where(step > 0, step, 1), 0).max())
    record = TensorRecord(item.name, item.source, [grid.out_features, grid.in_features], qtype.name, "carried",
                          int(data.nbytes), max_abs, rel_rms, steps, *rounding,
                          note=f"slimlm {grid.bits}-bit {'sym' if grid.symmetric else 'asym'} "
                               f"{'channel' if grid.group_size is None else 'g' + str(grid.group_size)} ({grid.kind})")
    return data, qtype, record


def _scale_rounding(scale: torch.Tensor, d16: torch.Tensor) -> tuple[float | None, float | None]:
    """Relative error of float32 scales rounded to GGUF's float16 block scales (None when exact)."""
    nonzero = scale != 0
    relative = ((d16.float().double() - scale.double()).abs()[nonzero] / scale.double().abs()[nonzero])
    if not bool((relative > 0).any()):
        return None, None
    return float(relative.max()), float(relative.mean())


def _pack_blocks(target: str, q: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor | None) -> np.ndarray:
    """GGUF block bytes (rows, n_blocks * type_size) from codes q (rows, n_blocks, 32) and float16 d (and m)."""
    rows, n_blocks, _ = q.shape
    parts = [d16.contiguous().view(torch.uint8).reshape(rows, n_blocks, 2)]
    if m16 is not None:
        parts.append(m16.contiguous().view(torch.uint8).reshape(rows, n_blocks, 2))
    if target == "q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        if target in ("q5_0", "q5_1"):  # bit j of a little-endian uint32 = bit 4 of code j
            high = (((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)).sum(-1).numpy().astype("<u4")
            parts.append(torch.from_numpy(high.view(np.uint8).reshape(rows, n_blocks, 4).copy()))
        low = (q & 0xF).to(torch.uint8)
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


# --------------------------------------------------------------------------------------------------
# Tokenizer and metadata
# --------------------------------------------------------------------------------------------------

def _vocabulary(model: nn.Module, tokenizer, pre_tokenizer: str | None) -> dict:
    """Tokens, token types, pre-tokenizer name and the special vocabulary, as convert_hf_to_gguf builds them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str())["model"]["type"] != "BPE":
        raise SlimlmError("GGUF export writes byte-level BPE vocabularies (GPT-2 style, as SmolLM2, Llama 3 and "
                          "Qwen2 use); this tokenizer is not one: convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab_size = model.get_input_embeddings().num_embeddings
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise SlimlmError(f"the tokenizer has ids up to {max(reverse)} but the embedding only {vocab_size} rows")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[index].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        model.config.to_json_file(str(Path(directory) / "config.json"))
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around a text, for llama.cpp to do the same
    adds = {"bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]}
    return {"tokens": tokens, "types": types, "pre": pre_tokenizer or _pre_tokenizer(tokenizer), "special": special,
            "adds": adds}


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name of the tokenizer's BPE pre-tokenizer, found the way convert_hf_to_gguf finds it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise SlimlmError(f"unknown BPE pre-tokenizer (check hash {digest}); pass pre_tokenizer= (--pre-tokenizer) "
                          f"with llama.cpp's name for it, e.g. one of {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    return PRE_TOKENIZERS[digest]


def _rope(config) -> tuple[float, dict]:
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ("default", "linear"):
        raise SlimlmError(f"rope scaling {kind!r} is not written by slimlm's GGUF export yet (default and linear "
                          "are); convert this model with llama.cpp's convert_hf_to_gguf.py")
    return float(theta), parameters if kind == "linear" else {}


def _metadata(writer, model, architecture: str, file_type: int) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, linear = _rope(config)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "slimlm export").rsplit("/", 1)[-1] or "slimlm export")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(model.get_input_embeddings().num_embeddings)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if linear:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(ftype: str, records: list[TensorRecord]) -> int:
    """general.file_type: the requested type, or for auto the type holding most linear weights."""
    if ftype != "auto":
        return _FILE_TYPE[ftype]
    sizes = Counter()
    for record in records:
        if record.name.startswith("blk.") and len(record.shape) == 2:
            sizes[record.ggml_type.lower()] += record.shape[0] * record.shape[1]
    return _FILE_TYPE.get(sizes.most_common(1)[0][0], 1) if sizes else 1


def _notes(items: list[_Item], dropped: bool) -> list[str]:
    notes = []
    if dropped:
        notes.append("drop_activation_quantization: layers that quantized their activations were written as "
                     "weights only; llama.cpp uses its own activation precision")
    return notes


def _write(target: Path, model, architecture: str, items: list[_Item], encoded, vocab: dict, file_type: int) -> None:
    """Write the file to a temporary sibling, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temporary, architecture)
        _metadata(writer, model, architecture, file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        special = vocab["special"]
        for kind, added in vocab["adds"].items():  # SpecialVocab sets these only when the config says so
            special.add_special_token.setdefault(kind, added)
        special.add_to_gguf(writer, quiet=True)
        for item, (data, qtype, _) in zip(items, encoded):
            writer.add_tensor(item.name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def describe(result: GGUFExport) -> str:
    """A short human-readable account of an export (the CLI prints it)."""
    s = result.summary()
    lines = [f"wrote {s['path']} ({s['bytes']:,} bytes, {s['architecture']}, pre-tokenizer {s['pre_tokenizer']})",
             "types: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_type"].items())),
             "storage: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_storage"].items()))]
    for key in ("carried_max_error_steps", "scale_rounding_rel_max", "requantized_max_rel_rms_error"):
        if key in s:
            lines.append(f"{key}: {s[key]:.3g}")
    lines.extend(s["notes"])
    return "\n".join(lines) + "\n"


__all__ = ["FTYPES", "GGUFExport", "TensorRecord", "check_options", "describe", "exact_formats", "export_gguf"]
