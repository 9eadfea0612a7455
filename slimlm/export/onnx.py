"""ONNX Runtime export: slimlm's quantized weights carried into MatMulNBits, runnable with onnxruntime-genai.

`export_onnx(model, tokenizer, directory)` writes one directory that `onnxruntime_genai.Model(directory)`
loads (and that a plain `onnxruntime.InferenceSession` runs with a KV cache):

- `model.onnx` and `model.onnx.data` (the initialisers, as external data): a decoder-only graph for the
  CPU execution provider in the form onnxruntime-genai's model builder (0.18) writes for Llama: token
  `Gather`, `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (the residual sum carried
  by the skip norms), `GroupQueryAttention` with rotary embedding (`do_rotary`, cos/sin caches computed
  by the model's own rotary module, so linear / llama3 / yarn scaling come out as transformers computes
  them) and the KV cache as `past_key_values.N.key|value` -> `present.N.key|value` (batch, kv heads,
  tokens, head size), SiLU MLP, logits for every position;
- `genai_config.json` (as the builder writes it: model type, head counts, token ids, greedy search
  defaults, `past_present_share_buffer`), the tokenizer files (`save_pretrained`), and
  `slimlm_export.json` (what was written, tensor by tensor: `ONNXExport.to_dict()`).

Why slimlm builds the graph itself instead of running the model builder on a dequantized checkpoint and
patching its initialisers: the builder quantizes by itself (round to nearest, which cost 15 ppl points
on SmolLM2-135M), fuses q/k/v before quantizing, quantizes the head to its own grid, cannot express an
act-order permutation, needs a float copy of the model on disk, and its asymmetric int4 output for a tied
embedding did not load. Written directly from slimlm's buffers, nothing is re-quantized and every
linear keeps its own grid; writing needs only the `onnx` package (`pip install 'slimlm[onnx]'`).

MatMulNBits (com.microsoft, ORT 1.31/1.32 spec), for a weight of N output rows and K input columns:
`B` uint8 (N, k_blocks, block_size * bits / 8), k_blocks = ceil(K / block_size), codes packed along K
low bits first (4-bit: element 2i in the low nibble, 2i+1 in the high one); `scales` float32 (N, k_blocks);
`zero_points` uint8 (N, ceil(k_blocks * bits / 8)) packed the same way, or absent, meaning 2^(bits-1);
`bias` float32 (N,); value = (code - zero_point) * scale. block_size is a power of two >= 16; bits 2, 4
or 8 (the CPU kernels refuse others).

How slimlm's grid (value = scale * (code - zero), per group) maps onto it, exactly:

- every block must lie inside one slimlm group: the block size is the largest power of two (16..256, at
  most 128 for a per-channel grid: one scale per row, repeated) for which that holds, so group 64 ->
  blocks of 64 with one scale each, group 48 -> blocks of 16 with the group's scale repeated three times,
  group 128 on 576 columns -> blocks of 128 (the last, partial block is the shorter last group);
  padding columns of a partial last block hold the zero point (value 0);
- symmetric grids: code - zero + 2^(bits-1) with no zero-point input (MatMulNBits' default equals
  slimlm's 2^(bits-1), so the stored codes are slimlm's codes); asymmetric grids: the codes as they are
  and slimlm's integer zero points, packed;
- scales: slimlm's float16 (or float32) scales widened to float32, exactly;
- act-order (`g_idx`): the input columns are sorted by group (a stable argsort of `g_idx`), the codes'
  columns moved with them and a `Gather` on the layer's input applies the same permutation at run time
  (a few hundred floats per token). This folds any act-order whose groups, sorted, fill whole blocks
  (GPTQ's act-order does: every group has `group_size` columns); a `g_idx` that does not is refused.
  MatMulNBits' own `g_idx` input is deprecated and not used;
- q, k and v with the same bits, block size and permutation become one MatMulNBits (rows concatenated,
  each row keeping its own scales), whose packed output feeds GroupQueryAttention, as the builder does;
- the LM head: a quantized head (`quantize_head`: 8-bit per channel) is carried the same way; a float
  head stays float32, a tied one as `FusedMatMul(transB=1)` on the embedding matrix itself (one copy);
- float linears (not quantized by slimlm) stay float32 `MatMul`; norms, embedding and rotary caches
  are float32.

What is exact: the weights. `export_onnx` reads every carried initialiser back, dequantizes it and
compares it with slimlm's dequantized weight (`max_abs_error` per tensor, 0.0 when carried exactly).
What is not: the arithmetic. `accuracy_level=4` (the default, as the builder uses for CPU) lets
MatMulNBits quantize its input activations to int8 per block and use integer dot products: that is
where ONNX Runtime's speed comes from (one ad-hoc single-layer timing on the AVX-512 VNNI machine:
2.7x faster than accuracy_level 0 for a 4-bit 1536 x 576 layer, over 100x for the 8-bit 49152 x 576
head, whose float32 path has no fast kernel), and it moves the logits by a few
parts per thousand (`benchmarks/onnx_export.py` reports the perplexity against slimlm's reference
path). `accuracy_level=0` computes in float32 (logits agree to ~1e-5), slowly.

Refused before anything is written, with the fix: families other than Llama, Mistral and Qwen2 (and
sliding windows, dynamic RoPE, activations other than SiLU), non-integer grids (FP8, FP4, codebooks),
bit widths MatMulNBits has no kernel for (3, 5, 6, 7 bits; `widen_bits=True` stores them exactly in
4- or 8-bit blocks, at the wider size), groups no power-of-two block fits (group size not a multiple
of 16), act-order that no permutation folds, layers that shift or quantize their inputs (OmniQuant LET,
W8A8, simulated W+A; `drop_activation_quantization=True` writes the weights of W8A8 / W+A layers),
layer kinds the exporter does not know. The directory is written beside the target under a temporary
name and renamed into place after everything has been written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.core.registry import layer_kind
from slimlm.errors import SlimlmError
from slimlm.export.layers import WeightGrid, check_block_modules, float_weight, head_is_tied, umask, weight_grid

try:  # optional dependency: only this exporter needs it
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - reported when an export is requested
    onnx = None

# transformers model_type -> onnxruntime-genai model type
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
NATIVE_BITS = (2, 4, 8)  # MatMulNBits CPU kernels
BLOCK_SIZES = (256, 128, 64, 32, 16)
CHANNEL_BLOCK = 128  # per-channel grids: blocks of 128 (measured fastest for SmolLM2's 8-bit head at accuracy 4)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
OPSET, IR_VERSION = 21, 10
DATA_FILE = "model.onnx.data"
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LINEARS = (*_ATTENTION, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class TensorRecord:
    """One weight as written: its ONNX op, its grid and how close the initialisers are to slimlm's weight."""

    name: str
    sources: list[str]
    op: str  # MatMulNBits, MatMul, FusedMatMul (tied float head), Gather (embedding)
    shape: list[int]  # [N, K]: output rows, input columns
    how: str  # "carried" (slimlm's codes and scales) or "float"
    bits: int | None = None  # slimlm's bits
    stored_bits: int | None = None  # MatMulNBits bits (wider than slimlm's with widen_bits)
    block_size: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    zero_points: bool = False
    permuted: bool = False  # act-order folded into a Gather of the input columns
    bytes: int = 0
    max_abs_error: float = 0.0  # initialisers read back and dequantized vs slimlm's dequantized weight
    note: str = ""


@dataclass
class ONNXExport:
    """What `export_onnx` wrote."""

    path: str
    bytes: int
    architecture: str
    accuracy_level: int
    files: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Counts (`weights`: graph nodes holding weights, q/k/v stacked count once; `carried` / `float`: slimlm
        linears), the MatMulNBits grids, the largest read-back error of carried weights, and the notes."""
        linears = [t for t in self.tensors if t.op != "Gather"]
        carried = [t for t in linears if t.how == "carried"]
        out = {"path": self.path, "bytes": self.bytes, "architecture": self.architecture,
               "accuracy_level": self.accuracy_level, "files": self.files,
               "weights": len(linears), "carried": sum(len(t.sources) for t in carried),
               "float": sum(len(t.sources) for t in linears if t.how == "float"),
               "by_grid": dict(Counter(f"{t.stored_bits}-bit block {t.block_size}"
                                       f"{' zp' if t.zero_points else ''}{' perm' if t.permuted else ''}"
                                       for t in carried)),
               "carried_max_abs_error": max((t.max_abs_error for t in carried), default=0.0),
               "notes": self.notes}
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "tensor_records": [asdict(t) for t in self.tensors]}


@dataclass
class _Carry:
    """A linear carried into MatMulNBits."""

    source: str
    grid: WeightGrid
    stored_bits: int
    block: int
    perm: torch.Tensor | None  # input column order (act-order), None when the groups are in order
    block_group: torch.Tensor  # (k_blocks,) the slimlm group of each block
    bias: torch.Tensor | None


@dataclass
class _Float:
    """A linear written as a float32 MatMul."""

    source: str
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------

def export_onnx(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike[str],
    accuracy_level: int = 4,
    widen_bits: bool = False,
    drop_activation_quantization: bool = False,
    overwrite: bool = False,
) -> ONNXExport:
    """Write `model` (float or quantized by slimlm) and its tokenizer as an onnxruntime-genai model directory.

    Every check runs before anything is written; see the module docstring for the layout and what is exact.
    """
    check_options(accuracy_level)
    target = Path(path).expanduser()
    _check_target(target, overwrite)
    if tokenizer is None or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SlimlmError("an onnxruntime-genai model directory needs the model's fast tokenizer (tokenizer.json): "
                          "load the model with its tokenizer")
    architecture = _check_architecture(model)
    plan = _plan(model, widen_bits, drop_activation_quantization)
    graph = _Graph(accuracy_level)
    records = _build(graph, model, plan)
    proto = graph.model()
    result = ONNXExport(str(target), 0, architecture, accuracy_level, tensors=records, notes=_notes(
        plan, accuracy_level, drop_activation_quantization))
    _write(target, proto, _genai_config(model, tokenizer, architecture), tokenizer, result, overwrite)
    return result


def check_options(accuracy_level: int) -> None:
    if onnx is None:
        raise SlimlmError("ONNX export needs the onnx package: pip install 'slimlm[onnx]' (onnx, onnxruntime, "
                          "onnxruntime-genai)")
    if accuracy_level not in ACCURACY_LEVELS:
        raise SlimlmError(f"accuracy_level {accuracy_level!r}: MatMulNBits takes 0 (unset), 1 (fp32), 2 (fp16), "
                          "3 (bf16) or 4 (int8 activations, the fast CPU path)")


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not overwrite:
        raise SlimlmError(f"{target} exists: choose another output directory or pass overwrite=True (--overwrite)")
    if not target.is_dir() or (any(target.iterdir()) and not (target / "genai_config.json").exists()):
        raise SlimlmError(f"{target} is not an ONNX export directory (no genai_config.json): slimlm will not "
                          "replace it; choose another output directory")


def _check_architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SlimlmError(f"ONNX export supports the {', '.join(ARCHITECTURES)} families (got {model_type!r}); "
                          "export another family with the native or compressed-tensors format")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise SlimlmError(f"hidden_act {config.hidden_act!r}: the ONNX export writes SiLU MLPs only")
    window = getattr(config, "sliding_window", None)
    active = window is not None and window < config.max_position_embeddings and (
        model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    if active:
        raise SlimlmError(f"sliding-window attention ({window} tokens) is not written by slimlm's ONNX export "
                          "(GroupQueryAttention's local window is not verified against transformers' mask); "
                          "export natively or set sliding_window to null for contexts within the window")
    if len(model.model.layers) != config.num_hidden_layers:
        raise SlimlmError(f"the model has {len(model.model.layers)} blocks but its config says "
                          f"{config.num_hidden_layers}; onnxruntime-genai needs them to agree")
    return ARCHITECTURES[model_type]


# --------------------------------------------------------------------------------------------------
# The plan: every weight checked and placed before anything is built
# --------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    embedding: torch.Tensor
    layers: list[dict]  # per block: {module name: _Carry | _Float, norm name: weight}
    final_norm: torch.Tensor
    head: _Carry | _Float | None  # None: tied to the (float) embedding
    dropped: list[str] = field(default_factory=list)


def _plan(model: nn.Module, widen_bits: bool, drop: bool) -> _Plan:
    inner = model.model
    problems: list[tuple[str, str]] = []
    table = model.get_input_embeddings()
    embedding = None
    if layer_kind(table) is not None or not isinstance(table, nn.Embedding):
        problems.append(("model.embed_tokens", (f"{layer_kind(table) or type(table).__name__} is not a float "
                         "embedding; the ONNX export writes the embedding as float32 (keep quantize_head's "
                         "embedding option off)")))
    else:
        embedding = table.weight.detach().float()
    layers, dropped = [], []
    for index, block in enumerate(inner.layers):
        prefix = f"model.layers.{index}"
        check_block_modules(block, prefix, (*_LINEARS, *_NORMS), "the ONNX Runtime decoder graph")
        entry = {norm: block.get_submodule(norm).weight.detach().float() for norm in _NORMS}
        for local in _LINEARS:
            source = f"{prefix}.{local}"
            entry[local] = _plan_linear(source, block.get_submodule(local), widen_bits, drop, problems, dropped)
        layers.append(entry)
    head = None
    if not head_is_tied(model):
        head = _plan_linear("lm_head", model.get_output_embeddings(), widen_bits, drop, problems, dropped)
    if problems:
        raise SlimlmError("cannot write this model to ONNX (nothing was written):\n  " + _grouped(problems))
    return _Plan(embedding, layers, inner.norm.weight.detach().float(), head, dropped)


def _grouped(problems: list[tuple[str, str]]) -> str:
    """One line per distinct problem, naming the layers that have it (three, then how many more)."""
    layers: dict[str, list[str]] = {}
    for source, problem in problems:
        layers.setdefault(problem, []).append(source)
    lines = []
    for problem, sources in layers.items():
        named = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        lines.append(f"{named}: {problem}")
    return "\n  ".join(lines)


def _plan_linear(source: str, module: nn.Module, widen_bits: bool, drop: bool, problems: list[tuple[str, str]],
                 dropped: list[str]) -> _Carry | _Float | None:
    kind = layer_kind(module)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if kind == "llm_int8" and not drop:
        problems.append((source, ("LLM.int8() picks int8 or float16 per input column at run time, which "
                         "MatMulNBits does not describe; pass drop_activation_quantization=True "
                         "(--drop-activation-quant) to write its float16 weight as float32")))
        return None
    grid = weight_grid(source, module)
    if grid is None:
        try:
            weight = float_weight(source, module, "ONNX")
        except SlimlmError as error:
            problems.append((source, str(error).removeprefix(f"{source}: ")))
            return None
        if kind == "llm_int8":
            dropped.append(source)
        return _Float(source, weight, bias)
    what = (f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} {grid.fmt}, "
            f"{'per channel' if grid.group_size is None else f'group {grid.group_size}'}"
            f"{', act-order' if grid.act_order() else ''}")
    if grid.transforms_inputs:
        problems.append((source, (f"{what}: this layer shifts or rescales its inputs before the matmul "
                         "(OmniQuant LET, LLM-FP4), which MatMulNBits cannot express; export a weight-only model")))
        return None
    if grid.quantizes_inputs:
        if not drop:
            problems.append((source, (f"{what}: this layer also quantizes its activations ({grid.kind}), which "
                             "the ONNX export does not write; pass drop_activation_quantization=True "
                             "(--drop-activation-quant) to export its weights only, or export a weight-only model")))
            return None
        dropped.append(source)
    if grid.fmt != "int":
        problems.append((source, (f"{what}: MatMulNBits holds integer grids only (value = scale * (code - zero)); "
                         "quantize with an integer grid (fmt: int)")))
        return None
    stored = grid.bits if grid.bits in NATIVE_BITS else (4 if grid.bits < 4 else 8)
    if stored != grid.bits and not widen_bits:
        problems.append((source, (f"{what}: MatMulNBits has CPU kernels for 2, 4 and 8 bits only; re-quantize at "
                         f"4 (or 8) bits, or pass widen_bits=True (--widen-bits) to store the {grid.bits}-bit codes "
                         f"exactly in {stored}-bit blocks (the file is then as large as {stored}-bit)")))
        return None
    groups = grid.column_groups()
    perm = None
    if grid.act_order():
        perm = torch.argsort(groups, stable=True)
        if torch.equal(perm, torch.arange(len(perm))):
            perm = None
        else:
            groups = groups[perm]
    block = _block_size(groups, grid.group_size is None and perm is None)
    if block is None:
        if grid.act_order():
            why = ("its act-order groups, sorted, do not fill whole blocks of 16 or more columns, so no column "
                   "permutation folds it into MatMulNBits; quantize with static_groups: true, or without act_order")
        else:
            why = ("MatMulNBits blocks are powers of two of at least 16 columns and every block must lie inside "
                   "one group; use a group size that is a multiple of 16 (32, 64, 128)")
        problems.append((source, f"{what}: {why}"))
        return None
    padded = _pad(groups, block, groups[-1])
    return _Carry(source, grid, stored, block, perm, padded[::block].clone(), bias)


def _block_size(groups: torch.Tensor, per_channel: bool) -> int | None:
    """The largest power-of-two block (16..256) whose every block of columns lies inside one group."""
    for block in BLOCK_SIZES:
        if per_channel and block > CHANNEL_BLOCK:
            continue
        blocks = _pad(groups, block, groups[-1]).reshape(-1, block)
        if bool((blocks == blocks[:, :1]).all()):
            return block
    return None


def _pad(values: torch.Tensor, block: int, fill) -> torch.Tensor:
    """`values` along its last axis padded with `fill` to a multiple of `block`."""
    extra = -values.shape[-1] % block
    if not extra:
        return values
    if isinstance(fill, torch.Tensor) and fill.dim() > 0:
        tail = fill.unsqueeze(-1).expand(*values.shape[:-1], extra)
    else:
        tail = torch.full((*values.shape[:-1], extra), int(fill), dtype=values.dtype)
    return torch.cat([values, tail.to(values.dtype)], dim=-1)


def _notes(plan: _Plan, accuracy_level: int, drop: bool) -> list[str]:
    notes = []
    carried = any(isinstance(item, _Carry) for layer in plan.layers for item in layer.values()) or isinstance(
        plan.head, _Carry)
    if accuracy_level == 4 and carried:
        notes.append("accuracy_level 4: MatMulNBits quantizes its input activations to int8 per block (ONNX "
                     "Runtime's fast CPU path); the weights are slimlm's, the arithmetic is not float32")
    if plan.head is None:
        notes.append("the LM head is tied to the float32 embedding (FusedMatMul on the same initialiser); "
                     "quantize it (presets *-head8) for a faster head")
    elif isinstance(plan.head, _Float):
        notes.append("the LM head is float32 (not quantized by slimlm); presets *-head8 quantize it to 8 bits")
    if plan.dropped:
        notes.append(f"drop_activation_quantization: {len(plan.dropped)} layers that quantized their activations "
                     "were written as weights only")
    return notes


# --------------------------------------------------------------------------------------------------
# Encoding MatMulNBits initialisers
# --------------------------------------------------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (..., n) in [0, 2^bits) -> uint8 (..., n * bits / 8), low bits first (MatMulNBits' layout)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    per = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= grouped[..., i] << np.uint8(bits * i)
    return out


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 (..., m) -> codes (..., m * 8 / bits)."""
    if bits == 8:
        return packed.astype(np.uint8)
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> np.uint8(bits * i)) & np.uint8(mask) for i in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def _encode(carries: list[_Carry]) -> dict:
    """B, scales, zero_points (or None), bias (or None) of the carried linears stacked along N."""
    first = carries[0]
    bits, block = first.stored_bits, first.block
    with_zero = any(not c.grid.symmetric for c in carries)
    parts = {"B": [], "scales": [], "zero_points": [], "bias": []}
    for carry in carries:
        grid = carry.grid
        codes = grid.codes().to(torch.int32)
        zero = grid.zero()[:, carry.block_group]  # (N, k_blocks)
        if carry.perm is not None:
            codes = codes[:, carry.perm]
        if grid.symmetric:  # value = scale * (q - 2^(stored-1)) with q = code - zero + 2^(stored-1)
            codes = codes - grid.zero()[:, :1] + 2 ** (bits - 1)
            zero = torch.full_like(zero, 2 ** (bits - 1))
        codes = _pad(codes, block, zero[:, -1])  # padding columns hold the zero point: value 0
        n = grid.out_features
        parts["B"].append(pack_codes(codes.reshape(n, -1, block).numpy(), bits))
        parts["scales"].append(grid.scale().float()[:, carry.block_group].numpy())
        parts["zero_points"].append(zero.numpy())
        parts["bias"].append(np.zeros(n, np.float32) if carry.bias is None else carry.bias.numpy())
    zero_points = np.concatenate(parts["zero_points"])
    if with_zero:
        zero_points = pack_codes(_pad(torch.from_numpy(zero_points), 8 // bits if bits < 8 else 1, 0).numpy(), bits)
    return {"B": np.concatenate(parts["B"]), "scales": np.ascontiguousarray(np.concatenate(parts["scales"])),
            "zero_points": zero_points if with_zero else None,
            "bias": np.concatenate(parts["bias"]) if any(c.bias is not None for c in carries) else None}


def dequantize_initialisers(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                            block: int, K: int) -> np.ndarray:
    """(N, K) float32 weight from MatMulNBits initialisers (an independent reading of the layout)."""
    n, k_blocks, _ = B.shape
    codes = unpack_codes(B, bits).reshape(n, k_blocks, block).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, k_blocks), 2 ** (bits - 1), np.float32)
    else:
        zero = unpack_codes(zero_points, bits)[:, :k_blocks].astype(np.float32)
    return ((codes - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :K]


def _readback_error(carries: list[_Carry], arrays: dict) -> float:
    """Largest |initialiser value - slimlm's dequantized weight| over the stacked rows (0.0: exact)."""
    first = carries[0]
    back = dequantize_initialisers(arrays["B"], arrays["scales"], arrays["zero_points"], first.stored_bits,
                                   first.block, first.grid.in_features)
    worst, row = 0.0, 0
    for carry in carries:
        reference = carry.grid.dequantized()
        if carry.perm is not None:
            reference = reference[:, carry.perm]
        rows = back[row: row + carry.grid.out_features]
        worst = max(worst, float(np.abs(rows.astype(np.float64) - reference.numpy().astype(np.float64)).max()))
        row += carry.grid.out_features
    return worst


# --------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------

class _Graph:
    """Nodes and initialisers under unique names."""

    def __init__(self, accuracy_level: int) -> None:
        self.accuracy_level = accuracy_level
        self.nodes: list = []
        self.initialisers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._count = Counter()

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initialisers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attributes) -> list[str]:
        self._count[name] += 1
        if self._count[name] > 1:
            name = f"{name}_{self._count[name]}"
        names = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attributes))
        return names

    def model(self):
        graph = helper.make_graph(self.nodes, "slimlm", self.inputs, self.outputs, self.initialisers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="slimlm")


def _build(graph: _Graph, model: nn.Module, plan: _Plan) -> list[TensorRecord]:
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    vocab = plan.embedding.shape[0]
    records: list[TensorRecord] = []
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph.inputs += [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                     helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
    graph.outputs.append(helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab]))
    for index in range(len(plan.layers)):
        for kind in ("key", "value"):
            graph.inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{index}.{kind}", f32, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
            graph.outputs.append(helper.make_tensor_value_info(
                f"present.{index}.{kind}", f32, ["batch_size", kv_heads, "total_sequence_length", head_dim]))

    # seqlens_k = sum(attention_mask) - 1 and total_sequence_length, as int32 (GroupQueryAttention's inputs)
    one = graph.constant("/model/constants/INT64/[1]", np.array([1], np.int64))
    index_1 = graph.constant("/model/constants/INT64/1", np.array(1, np.int64))
    base = "/model/attn_mask_reformat"
    summed = graph.node("ReduceSum", ["attention_mask", one], f"{base}/ReduceSum", keepdims=0)[0]
    minus = graph.node("Sub", [summed, one], f"{base}/Sub")[0]
    seqlens_k = graph.node("Cast", [minus], f"{base}/Sub/Cast", to=TensorProto.INT32)[0]
    shape = graph.node("Shape", ["attention_mask"], f"{base}/Shape")[0]
    total = graph.node("Gather", [shape, index_1], f"{base}/Gather", axis=0)[0]
    total_length = graph.node("Cast", [total], f"{base}/Gather/Cast", to=TensorProto.INT32)[0]
    cos, sin = _rotary_caches(model, head_dim)
    graph.constant("cos_cache", cos)
    graph.constant("sin_cache", sin)

    embed = graph.constant("model.embed_tokens.weight", plan.embedding.numpy())
    records.append(TensorRecord("model.embed_tokens.weight", ["model.embed_tokens"], "Gather",
                                list(plan.embedding.shape), "float", bytes=plan.embedding.numel() * 4))
    hidden = graph.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")[0]
    residual, normed = None, None
    for index, layer in enumerate(plan.layers):
        prefix, scope = f"model.layers.{index}", f"/model/layers.{index}"
        if index == 0:
            gamma = graph.constant(f"{prefix}.input_layernorm.weight", layer["input_layernorm"].numpy())
            normed = graph.node("SimplifiedLayerNormalization", [hidden, gamma], f"{scope}/input_layernorm",
                                axis=-1, epsilon=eps, stash_type=1)[0]
            residual = hidden
        # attention
        q, k, v = (layer[name] for name in _ATTENTION)
        if _fusable([q, k, v]):
            qkv = _linear(graph, [q, k, v], normed, f"{prefix}.self_attn.qkv_proj", f"{scope}/attn/qkv_proj",
                          records)
            attention_inputs = [qkv, "", ""]
        else:
            attention_inputs = [_linear(graph, [item], normed, item.source, f"{scope}/attn/{name.split('.')[-1]}",
                                        records) for name, item in zip(_ATTENTION, (q, k, v))]
        attention_inputs += [f"past_key_values.{index}.key", f"past_key_values.{index}.value", seqlens_k,
                             total_length, "cos_cache", "sin_cache"]
        attended = graph.node("GroupQueryAttention", attention_inputs, f"{scope}/attn/GroupQueryAttention",
                              [f"{scope}/attn/GroupQueryAttention/output_0", f"present.{index}.key",
                               f"present.{index}.value"], domain="com.microsoft", num_heads=heads,
                              kv_num_heads=kv_heads, scale=1.0 / math.sqrt(head_dim), local_window_size=-1,
                              softcap=0.0, do_rotary=1, rotary_interleaved=0)[0]
        o = _linear(graph, [layer["self_attn.o_proj"]], attended, f"{prefix}.self_attn.o_proj",
                    f"{scope}/attn/o_proj", records)
        post = graph.constant(f"{prefix}.post_attention_layernorm.weight",
                              layer["post_attention_layernorm"].numpy())
        normed, _, _, residual = graph.node("SkipSimplifiedLayerNormalization", [residual, o, post],
                                            f"{scope}/post_attention_layernorm", 4, domain="com.microsoft",
                                            epsilon=eps)
        # MLP: down(silu(gate(x)) * up(x))
        gate = _linear(graph, [layer["mlp.gate_proj"]], normed, f"{prefix}.mlp.gate_proj", f"{scope}/mlp/gate_proj",
                       records)
        up = _linear(graph, [layer["mlp.up_proj"]], normed, f"{prefix}.mlp.up_proj", f"{scope}/mlp/up_proj", records)
        sigmoid = graph.node("Sigmoid", [gate], f"{scope}/mlp/act_fn/Sigmoid")[0]
        silu = graph.node("Mul", [gate, sigmoid], f"{scope}/mlp/act_fn/Mul")[0]
        product = graph.node("Mul", [silu, up], f"{scope}/mlp/Mul")[0]
        down = _linear(graph, [layer["mlp.down_proj"]], product, f"{prefix}.mlp.down_proj", f"{scope}/mlp/down_proj",
                       records)
        last = index == len(plan.layers) - 1
        next_gamma = (graph.constant("model.norm.weight", plan.final_norm.numpy()) if last else
                      graph.constant(f"model.layers.{index + 1}.input_layernorm.weight",
                                     plan.layers[index + 1]["input_layernorm"].numpy()))
        scope_next = "/model/norm" if last else f"/model/layers.{index + 1}/input_layernorm"
        normed, _, _, residual = graph.node("SkipSimplifiedLayerNormalization", [residual, down, next_gamma],
                                            scope_next, 4, domain="com.microsoft", epsilon=eps)
    if plan.head is None:
        graph.node("FusedMatMul", [normed, embed], "/lm_head/FusedMatMul", ["logits"], domain="com.microsoft",
                   transB=1, alpha=1.0)
        records.append(TensorRecord("model.embed_tokens.weight", ["lm_head"], "FusedMatMul",
                                    list(plan.embedding.shape), "float", note="tied: the embedding initialiser"))
    else:
        _linear(graph, [plan.head], normed, "lm_head", "/lm_head", records, output="logits")
    return records


def _fusable(items: list) -> bool:
    """q, k, v in one MatMulNBits: all carried with the same bits, block size and input permutation."""
    if not all(isinstance(item, _Carry) for item in items):
        return False
    first = items[0]
    for item in items[1:]:
        if (item.stored_bits, item.block) != (first.stored_bits, first.block):
            return False
        if (item.perm is None) != (first.perm is None) or (item.perm is not None and not torch.equal(item.perm,
                                                                                                   first.perm)):
            return False
    return True


def _linear(graph: _Graph, items: list, x: str, name: str, scope: str, records: list[TensorRecord],
            output: str | None = None) -> str:
    """Emit one linear (or q/k/v stacked along N) reading `x`; returns its output's name."""
    outputs = 1 if output is None else [output]
    first = items[0]
    if isinstance(first, _Float):
        weight = graph.constant(f"{name}.weight_T", first.weight.t().contiguous().numpy())
        record = TensorRecord(f"{name}.weight_T", [first.source], "MatMul", list(first.weight.shape), "float",
                              bytes=first.weight.numel() * 4)
        records.append(record)
        if first.bias is None:
            return graph.node("MatMul", [x, weight], f"{scope}/MatMul", outputs)[0]
        product = graph.node("MatMul", [x, weight], f"{scope}/MatMul")[0]
        bias = graph.constant(f"{name}.bias", first.bias.numpy())
        return graph.node("Add", [product, bias], f"{scope}/Add", outputs)[0]
    if first.perm is not None:
        perm = graph.constant(f"{name}.input_order", first.perm.numpy().astype(np.int64))
        x = graph.node("Gather", [x, perm], f"{scope}/act_order/Gather", axis=-1)[0]
    arrays = _encode(items)
    inputs = [x, graph.constant(f"{name}.MatMulNBits.B", arrays["B"]),
              graph.constant(f"{name}.MatMulNBits.scales", arrays["scales"])]
    inputs.append("" if arrays["zero_points"] is None else
                  graph.constant(f"{name}.MatMulNBits.zero_points", arrays["zero_points"]))
    if arrays["bias"] is not None:
        inputs += ["", graph.constant(f"{name}.MatMulNBits.bias", arrays["bias"])]  # g_idx unused
    while inputs and inputs[-1] == "":
        inputs.pop()
    n, k = arrays["B"].shape[0], first.grid.in_features
    out = graph.node("MatMulNBits", inputs, f"{scope}/MatMulNBits", outputs, domain="com.microsoft", K=k, N=n,
                     bits=first.stored_bits, block_size=first.block, accuracy_level=graph.accuracy_level)[0]
    nbytes = sum(a.nbytes for a in arrays.values() if a is not None)
    grids = {(c.grid.bits, c.grid.group_size, c.grid.symmetric) for c in items}
    bits, group, symmetric = next(iter(grids)) if len(grids) == 1 else (first.grid.bits, None, None)
    records.append(TensorRecord(name, [c.source for c in items], "MatMulNBits", [n, k], "carried", bits,
                                first.stored_bits, first.block, group, symmetric, arrays["zero_points"] is not None,
                                first.perm is not None, nbytes, _readback_error(items, arrays),
                                note=f"{len(grids)} grids" if len(grids) > 1 else ""))
    return out


def _rotary_caches(model: nn.Module, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max positions, head_dim / 2) from the model's own rotary module."""
    config = model.config
    rotary = getattr(model.model, "rotary_emb", None)
    kind = getattr(rotary, "rope_type", None)
    if rotary is None or kind in ("dynamic", "longrope"):
        raise SlimlmError(f"RoPE type {kind!r} changes with the sequence length; the ONNX export writes fixed "
                          "rotary caches (default, linear, llama3, yarn)")
    positions = torch.arange(config.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].float(), sin[0].float()
    half = head_dim // 2
    if cos.shape[-1] != head_dim or not torch.equal(cos[:, :half], cos[:, half:]):
        raise SlimlmError("partial or interleaved rotary embeddings are not written by slimlm's ONNX export")
    return cos[:, :half].contiguous().numpy(), sin[:, :half].contiguous().numpy()


# --------------------------------------------------------------------------------------------------
# genai_config.json and writing
# --------------------------------------------------------------------------------------------------

def _token_id(*values):
    for value in values:
        if value is not None:
            return value
    return None


def _genai_config(model: nn.Module, tokenizer, architecture: str) -> dict:
    config = model.config
    generation = getattr(model, "generation_config", None)
    heads = config.num_attention_heads
    eos = _token_id(getattr(generation, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id)
    first_eos = eos[0] if isinstance(eos, list) else eos
    context = int(config.max_position_embeddings)
    return {
        "model": {
            "bos_token_id": _token_id(getattr(generation, "bos_token_id", None), config.bos_token_id,
                                      tokenizer.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _token_id(tokenizer.pad_token_id, config.pad_token_id, first_eos),
            "type": architecture,
            "vocab_size": model.get_input_embeddings().weight.shape[0],
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _write(target: Path, proto, genai_config: dict, tokenizer, result: ONNXExport, overwrite: bool) -> None:
    """Write everything into a temporary sibling directory, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        os.chmod(temporary, 0o777 & ~umask())  # mkdtemp makes the directory private; give it the usual mode
        onnx.save_model(proto, str(temporary / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        (temporary / "genai_config.json").write_text(json.dumps(genai_config, indent=4) + "\n")
        tokenizer.save_pretrained(str(temporary))
        result.files = {p.name: p.stat().st_size for p in sorted(temporary.iterdir()) if p.is_file()}
        result.bytes = sum(result.files.values())
        (temporary / "slimlm_export.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        if target.exists() and overwrite:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe(result: ONNXExport) -> str:
    """A short human-readable account of an export (the CLI prints it)."""
    s = result.summary()
    lines = [(f"wrote {s['path']} ({s['bytes']:,} bytes, {s['architecture']}, MatMulNBits accuracy_level "
              f"{s['accuracy_level']})"),
             f"linears: {s['carried']} carried, {s['float']} float",
             "MatMulNBits: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["by_grid"].items())),
             f"carried_max_abs_error: {s['carried_max_abs_error']:.3g}"]
    lines.extend(s["notes"])
    return "\n".join(lines) + "\n"


__all__ = ["ACCURACY_LEVELS", "ONNXExport", "TensorRecord", "check_options", "dequantize_initialisers", "describe",
           "export_onnx", "pack_codes", "unpack_codes"]
