"""Drafts for speculative decoding that are cheap on this hardware, and the lean loop that runs them.

A draft pays only if one of its steps costs a small fraction of a target step (the cost ratio c of
Leviathan et al., Sec. 3.3) while its greedy tokens stay close to the target's (the acceptance
rate alpha). On this project's CPU (one thread, AVX-512 BF16) a SmolLM2-135M float32 step takes
about 35 ms; the packed int4 kernels run its W4 g64 layers in about 8 ms and the int8 kernel its LM
head in about 4 ms, and the rest of a step is per-operation overhead. So a draft here is:

1. weights derived from the target, built in memory (`build_draft(target, spec)`):
   - `self`: the target's own weights (the natural draft of a target that is already quantized to
     the packed kernels: it agrees with the target on almost every token, and is cheaper only by
     what the lean loop saves);
   - `self:<preset>`: a copy compressed with a `slimlm.compress` preset that needs no calibration
     data, e.g. `self:rtn-w4g64-head8` (W4 g64 decoder linears, 8-bit LM head) or
     `self:rtn-w8-head8`; the copy shares the target's token embedding when the preset left it as
     it was;
   - `self:fp16` / `self:bf16`: a copy with 16-bit float weights (PyTorch's float16 GEMV is fast on
     this CPU; the tokens agree with float32 almost always).
   - `lookup`: no model at all (`LookupDraft`): the continuation of an earlier occurrence of the
     last few tokens in the context.
   Any other model with the target's vocabulary can be a draft too (a layer-dropped checkpoint, ...),
   run by `ModelRunner` with a cache of its own.
2. `LeanRunner`, a batch-1 decode loop that computes what `ModelRunner` computes with fewer
   operations:
   - a block's q/k/v projections are fused into one linear and gate/up into another (four matrix
     calls instead of seven); fused quantized layers concatenate the separate layers' codes, scales
     and zeros (nothing is re-quantized) and call slimlm's native kernel directly (float32 in and out)
     where `slimlm.quant.kernels` chose the native path on this CPU, else PyTorch's packed int4/int8
     kernel with bfloat16 activations in and out; float32 linears take the native few-row kernel or
     `slimlm.infer.runner.small_gemm`; float16/bfloat16 ones
     their own dtype for a few rows and float32 for long inputs (16-bit CPU GEMMs are slow);
   - the q and k rows are reordered so that RoPE is one complex multiplication for q and k together,
     whose result is put back in the half-split layout (so keys are stored as the target stores them);
   - rotary factors come from a table computed once; a single-token step builds no mask; RMSNorm is
     PyTorch's fused `rms_norm`; the residual stream, attention and the cache stay float32.
   Rounding therefore differs from the target's runner (bfloat16 activations in the packed kernels,
   fused RMSNorm, complex RoPE), which can only lower the acceptance rate: the speculative output is
   still the target's (greedy) or distributed as the target's (sampling), because the target verifies
   every token.

Heuristic of slimlm's (not in Leviathan et al., whose draft keeps its own cache): a draft built from
the target decodes in the target's own KV cache (`LeanRunner.can_share_cache`, used by
`speculative_decode` with the contiguous cache). For the committed tokens it reads the keys and
values the target computed; it writes its own only for the tokens it proposes, which the target's
verification forward then overwrites (the speculative loop truncates the cache to the committed
prefix first). So the draft needs no prefill of its own, never lags behind, and reads better context
than it would compute. This needs the target's cache shape (same layers, key/value heads, head size,
float32), which every `self*` draft has.

A draft must share the target's vocabulary (checked by `slimlm.infer.speculative.check_compatible`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape, ContiguousCache
from slimlm.infer.runner import LLAMA_LIKE, SMALL_GEMM_MAX_ROWS, ModelRunner, apply_rotary, few_row_linear
from slimlm.quant import cpu_kernels

SELF = "self"
LOOKUP = "lookup"
DTYPE_DRAFTS = {"fp16": torch.float16, "bf16": torch.bfloat16}  # self:fp16, self:bf16: a cast copy


@dataclass(frozen=True)
class DraftSpec:
    """`self` (the target's own weights), `self:<preset>` (a copy compressed with a preset that needs no
    calibration data), `self:fp16` / `self:bf16` (a copy with 16-bit float weights) or `lookup` (no model:
    tokens copied from the context, `LookupDraft`)."""

    preset: str | None = None

    @property
    def label(self) -> str:
        if self.preset == LOOKUP:
            return LOOKUP
        return SELF if self.preset is None else f"{SELF}:{self.preset}"


def parse_draft_spec(text: str) -> DraftSpec | None:
    """`self`, `self:<preset>`, `self:fp16`, `self:bf16`, `lookup` -> a DraftSpec (the preset checked);
    anything else (a model path or name) -> None."""
    if text == LOOKUP:
        return DraftSpec(LOOKUP)
    if text != SELF and not text.startswith(SELF + ":"):
        return None
    preset = text[len(SELF) + 1:] if text != SELF else None
    if preset is not None and preset not in DTYPE_DRAFTS:
        check_draft_preset(preset)
    return DraftSpec(preset)


def check_draft_preset(preset: str) -> None:
    """A draft preset must exist and need no calibration data (the draft is built in memory, in seconds)."""
    from slimlm.compress.presets import PRESETS
    from slimlm.compress.recipe import load_recipe

    if not preset or preset not in PRESETS:
        raise SlimlmError(f"unknown draft preset {preset!r}: use --draft self, self:fp16, self:bf16 or "
                          "self:<preset> with a compression preset that needs no calibration data, e.g. "
                          "self:rtn-w4g64-head8, self:rtn-w8-head8 (or pass a model directory as the draft)")
    needing = [stage.method for stage in load_recipe(preset).stages if stage.needs_calibration]
    if needing:
        raise SlimlmError(f"draft preset {preset!r} needs calibration data ({', '.join(needing)}); a draft built "
                          "in memory takes a preset without calibration (e.g. rtn-w4g64-head8), or compress the "
                          "draft yourself (slimlm compress) and pass its directory as --draft")


def build_draft(target: PreTrainedModel, spec: str | DraftSpec,
                lean: bool = True) -> LeanRunner | ModelRunner | LookupDraft:
    """A draft runner for `target` from `spec` (see `DraftSpec`): where `slimlm.quant.kernels` chose the native
    path, slimlm's runner sharing the target's cache (`CacheSharingRunner`; 16-bit copies excepted), else a
    `LeanRunner`. A copy shares the target's input embedding when the preset left it unchanged (a lookup: no
    decode cost, no second copy)."""
    if isinstance(spec, str):
        parsed = parse_draft_spec(spec)
        if parsed is None:
            raise SlimlmError(f"unknown draft {spec!r}: give a model (path or name), 'self', 'self:<preset>' or "
                              "'lookup'")
        spec = parsed
    if spec.preset == LOOKUP:
        return LookupDraft(target)
    model = target
    if spec.preset in DTYPE_DRAFTS:
        model = copy.deepcopy(target).to(DTYPE_DRAFTS[spec.preset]).eval()
    elif spec.preset is not None:
        from slimlm.compress import compress

        model = copy.deepcopy(target)
        compress(model, spec.preset)
        _share_embedding(target, model)
        model.eval()
    if not lean:
        return ModelRunner(model)
    if _native_chosen() and spec.preset not in DTYPE_DRAFTS:
        # slimlm's runner on the native path is as lean as LeanRunner (fused projections, one call per
        # operation) and computes a step exactly as the target's runner would for these weights
        return CacheSharingRunner(model)
    runner = LeanRunner(model)
    runner.shares_target_cache = True
    return runner


class CacheSharingRunner(ModelRunner):
    """`ModelRunner` as a draft built from the target: it decodes in the target's own KV cache."""

    shares_target_cache = True

    def can_share_cache(self, target) -> bool:
        return target.cache_shape() == self.cache_shape()


def _share_embedding(target: nn.Module, draft: nn.Module) -> None:
    source, copied = target.get_input_embeddings(), draft.get_input_embeddings()
    if (type(source) is nn.Embedding and type(copied) is nn.Embedding and source.weight.shape == copied.weight.shape
            and torch.equal(source.weight, copied.weight)):
        draft.set_input_embeddings(source)


class LookupDraft:
    """A draft without a model: it copies from the context (prompt lookup decoding, Saxena, 2023; the
    reference-copying draft of Yang et al., 2023, "Inference with Reference: Lossless Acceleration of
    Large Language Models"). To propose up to `count` tokens after the committed tokens S it finds the
    longest suffix of S, of `max_match` down to `min_match` tokens, that also occurs earlier in S (the
    most recent occurrence) and proposes the tokens that followed it there; with no such match it
    proposes nothing, and the iteration is a plain target step. A proposal costs microseconds (c ~ 0),
    so it pays whenever alpha exceeds v(1) - 1; it helps where the output repeats its context (code,
    extraction, lists, the loops greedy decoding of a small model falls into) and does nothing
    elsewhere. As a distribution q it is one-hot at the proposed token, so sampling keeps the target's
    distribution (accept with probability p(x); the residual is p without x)."""

    proposes = True  # `speculative_decode` calls `propose` instead of running a forward pass

    def __init__(self, target: PreTrainedModel, min_match: int = 2, max_match: int = 4):
        if not 1 <= min_match <= max_match:
            raise SlimlmError(f"lookup draft: need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        base = ModelRunner(target)
        self.model, self.vocab_size, self.device = target, base.vocab_size, base.device
        self.min_match, self.max_match = min_match, max_match
        self.fast_kernels = None

    def propose(self, committed: list[int], count: int) -> list[int]:
        length = len(committed)
        for n in range(min(self.max_match, length - 1), self.min_match - 1, -1):
            tail = committed[length - n:]
            first = tail[0]
            for start in range(length - n - 1, -1, -1):  # the most recent earlier occurrence
                if committed[start] == first and committed[start:start + n] == tail:
                    return committed[start + n:start + n + count]
        return []


# ---------------------------------------------------------------------------------------------
# The lean runner
# ---------------------------------------------------------------------------------------------


def _is_quantized(module: nn.Module) -> bool:
    from slimlm.core.registry import layer_kind

    return layer_kind(module) == "quantized"


def _same_bias_presence(linears: list[nn.Module]) -> bool:
    present = [getattr(m, "bias", None) is not None for m in linears]
    return all(present) or not any(present)


def _native_chosen() -> bool:
    from slimlm.quant.kernels import kernel_choice

    return kernel_choice().native


class _NativeKernel(nn.Module):
    """A quantized weight run straight through slimlm's native kernel (`slimlm.quant.cpu_kernels`), float32 in
    and out: the operands `QuantizedLinear`'s native path builds, so the same products."""

    def __init__(self, operands, bias: torch.Tensor | None):
        super().__init__()
        self.operands = operands
        self.bias = None if bias is None else bias.float()

    @classmethod
    def build(cls, quantized, bias: torch.Tensor | None) -> _NativeKernel | None:
        """The native layer where this CPU's decode path is native and the grid fits it, else None."""
        operands = cpu_kernels.quantized_operands(quantized) if _native_chosen() else None
        return None if operands is None else cls(operands, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.lowbit_matmul(x, self.operands)
        return y if self.bias is None else y + self.bias


class _PackedKernel(nn.Module):
    """A quantized weight run straight through PyTorch's packed CPU kernel, bfloat16 in and out: the operands
    `QuantizedLinear`'s fast path builds (same layout, so the same products), without its per-call checks."""

    def __init__(self, quantized, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.group_size = quantized.group_size
        self.int4 = quantized.bits == 4
        codes = quantized.codes
        if self.int4:  # the kernel computes (q - 8) * s + z per group; ours is scale * (q - zero)
            scale, zero = quantized.scale.float(), quantized.zero.float()
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            self.scales = torch.stack([scale.t(), (scale * (8.0 - zero)).t()], dim=-1).to(torch.bfloat16).contiguous()
        else:  # 8-bit symmetric per channel: x @ ((q - 128) * scale).T
            self.weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            self.scales = quantized.scale[:, 0].to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    @staticmethod
    def supports(quantized) -> bool:
        from slimlm.quant.kernels import HAS_INT4_KERNEL, HAS_INT8_KERNEL

        if quantized.fmt != "int" or quantized.g_idx is not None or quantized.codebook is not None:
            return False
        if quantized.bits == 4:
            return (HAS_INT4_KERNEL and quantized.group_size in (32, 64, 128, 256)
                    and quantized.in_features % quantized.group_size == 0 and quantized.out_features % 16 == 0)
        return (HAS_INT8_KERNEL and quantized.bits == 8 and quantized.group_size is None
                and bool((quantized.zero == 128).all()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.int4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _plain_quantized(m: nn.Module) -> bool:
    return (_is_quantized(m) and m.fmt == "int" and m.scale is not None and m.g_idx is None and m.codebook is None
            and m.input_quantizer is None and m.input_shift is None and m.input_scale is None
            and m.packed.device.type == "cpu")


def _fuse(linears: list[nn.Module], rows: torch.Tensor | None = None) -> nn.Module | None:
    """One linear whose output rows are those of `linears` in order (then reordered by `rows`, an index
    into them), or None where they cannot be fused. Quantized layers are fused by concatenating their
    codes, scales and zeros: the fused rows are the separate rows exactly, nothing is re-quantized; with
    a packed kernel for the format they run through it (`_PackedKernel`)."""
    if not _same_bias_presence(linears):
        return None
    if all(type(m) is nn.Linear for m in linears):
        weights = [m.weight.detach() for m in linears]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return None
        weight = torch.cat(weights)
        bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
        if rows is not None:
            weight, bias = weight[rows], (bias[rows] if bias is not None else None)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight)
            if bias is not None:
                fused.bias.copy_(bias)
        return _fast(fused.requires_grad_(False))
    if not all(_plain_quantized(m) for m in linears):
        return None
    from slimlm.quant.grid import QuantizedWeight

    first = linears[0]
    if len({(m.in_features, m.bits, m.group_size, m.symmetric) for m in linears}) != 1:
        return None
    parts = [m.to_quantized() for m in linears]
    codes, scale, zero = (torch.cat([getattr(p, name) for p in parts]) for name in ("codes", "scale", "zero"))
    bias = torch.cat([m.bias for m in linears]) if first.bias is not None else None
    if rows is not None:
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
        bias = bias[rows] if bias is not None else None
    fused = QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=first.bits, group_size=first.group_size,
                            symmetric=first.symmetric)
    native = _NativeKernel.build(fused, bias)
    if native is not None:
        return native
    if _PackedKernel.supports(fused):
        return _PackedKernel(fused, bias)
    from slimlm.quant.qlinear import QuantizedLinear

    return QuantizedLinear.from_quantized(fused, bias, scale_dtype=first.scale.dtype).to(first.packed.device)


def _single(module: nn.Module) -> nn.Module:
    """A lone linear, through slimlm's native kernel or PyTorch's packed kernel where it has one."""
    if _plain_quantized(module):
        quantized = module.to_quantized()
        native = _NativeKernel.build(quantized, module.bias)
        if native is not None:
            return native
        if _PackedKernel.supports(quantized):
            return _PackedKernel(quantized, module.bias)
    return _fast(module)


def _input_dtype(module: nn.Module, model_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 for packed kernels and slimlm's quantized layers (their kernels take it natively), the weight's
    dtype for a float linear, else the model's dtype."""
    if isinstance(module, _NativeKernel):
        return torch.float32
    if isinstance(module, _PackedKernel) or _is_quantized(module):
        return torch.bfloat16
    module = getattr(module, "linear", module)  # _SmallGemm, _HalfLinear
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else model_dtype


class _SmallGemm(nn.Module):
    """A float32 nn.Linear through `slimlm.infer.runner.few_row_linear` for a few rows (the fast paths here)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        if x.numel() <= SMALL_GEMM_MAX_ROWS * x.shape[-1]:
            return few_row_linear(x, self.linear.weight, self.linear.bias, _native_chosen())
        return self.linear(x)


class _HalfLinear(nn.Module):
    """A float16/bfloat16 nn.Linear: its own dtype for a few rows (fast GEMV on CPU), float32 for long inputs
    (PyTorch's 16-bit CPU GEMMs are slow: a 127-token prefill took 4x the float32 one)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        if x.numel() <= SMALL_GEMM_MAX_ROWS * x.shape[-1]:
            return self.linear(x)
        bias = None if self.linear.bias is None else self.linear.bias.float()
        return F.linear(x.float(), self.linear.weight.float(), bias).to(x.dtype)


def _fast(module: nn.Module) -> nn.Module:
    if type(module) is nn.Linear and module.weight.device.type == "cpu":
        if module.weight.dtype == torch.float32:
            return _SmallGemm(module)
        if module.weight.dtype in (torch.float16, torch.bfloat16):
            return _HalfLinear(module)
    return module


class _Concat(nn.Module):
    """Separate linears called one after another (when they cannot be fused)."""

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype):
        super().__init__()
        self.parts = nn.ModuleList([_single(m) for m in modules])
        self.dtypes = [_input_dtype(m, dtype) for m in self.parts]

    def forward(self, x):
        return torch.cat([m(x.to(d)).to(x.dtype) for m, d in zip(self.parts, self.dtypes)], dim=-1)


def _interleave_rows(heads: int, head_dim: int) -> torch.Tensor:
    """Within each head, rows (0, d/2, 1, d/2 + 1, ...): the rotary pairs of the half-split layout become
    adjacent, so RoPE is one complex multiplication. q and k are permuted alike, so q.k is unchanged."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (torch.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)


@dataclass
class _Block:
    attn_norm: torch.Tensor
    attn_eps: float
    qkv: nn.Module
    qkv_dtype: torch.dtype
    interleaved: bool  # q and k rows interleaved for complex RoPE
    o: nn.Module
    o_dtype: torch.dtype
    mlp_norm: torch.Tensor
    mlp_eps: float
    gate_up: nn.Module
    gate_up_dtype: torch.dtype
    down: nn.Module
    down_dtype: torch.dtype
    act: object
    heads: int
    kv_heads: int
    scale: float


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor, float]:
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if weight is None or eps is None or "rmsnorm" not in type(norm).__name__.lower():
        raise SlimlmError(f"the lean draft runner needs RMSNorm blocks, found {type(norm).__name__}")
    return weight.detach().float(), float(eps)


class LeanRunner:
    """Batch-1 forward passes of a Llama/Mistral/Qwen2 decoder with less overhead (see the module docstring).

    Same call as `ModelRunner.forward(tokens [1, new], counts, cache, all_logits)` with a batch-1
    `ContiguousCache` (`new_cache(capacity)`); logits come back float32."""

    def __init__(self, model: PreTrainedModel, fuse: bool = True):
        base = ModelRunner(model)  # the architecture checks and shapes
        if not base.llama_like:
            raise SlimlmError(f"the lean draft runner runs {', '.join(LLAMA_LIKE)} decoders, not {base.family}; "
                              "use the plain runner (ModelRunner) as the draft")
        self.model, self.config, self.family = model, base.config, base.family
        self.fast_kernels = True
        self.decoder, self.head_dim, self.vocab_size = base.decoder, base.head_dim, base.vocab_size
        self.device, self.dtype = base.device, torch.float32  # activations, norms, attention, cache: float32
        self.sliding_window = base.sliding_window
        self.embed = model.get_input_embeddings()
        self.final_norm, self.final_eps = _norm_params(self.decoder.norm)
        self.head = _single(model.get_output_embeddings())
        self.head_dtype = _input_dtype(self.head, self.dtype)
        complex_rope = self._complex_rope_possible()
        self.blocks: list[_Block] = []
        for layer, shape in zip(base.layers, base.blocks):
            self.blocks.append(self._block(layer, shape, fuse, complex_rope))
        self._kv_heads = tuple(b.kv_heads for b in self.blocks)
        self._rope: tuple[torch.Tensor, ...] | None = None
        self.shares_target_cache = False  # set by build_draft: a draft made from the target reads its KV cache

    def _complex_rope_possible(self) -> bool:
        """Whether the model's cos/sin have the half-split layout with repeated halves (default RoPE)."""
        if self.head_dim % 2:
            return False
        cos, sin = self._rotary(8)
        half = self.head_dim // 2
        return (cos.shape[-1] == self.head_dim and torch.equal(cos[:, :half], cos[:, half:])
                and torch.equal(sin[:, :half], sin[:, half:]))

    def _block(self, layer: nn.Module, shape, fuse: bool, complex_rope: bool) -> _Block:
        if getattr(layer, "attn_shortcut", None) is not None or getattr(layer, "mlp_shortcut", None) is not None:
            raise SlimlmError("the lean draft runner does not run SliceGPT's per-block shortcuts: "
                              "use the model itself as the draft")
        attention, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise SlimlmError(f"the lean draft runner needs a gated MLP (gate/up/down), not {type(mlp).__name__}")
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        qkv, interleaved = None, False
        if fuse:
            rows = None
            if complex_rope:
                q_rows = _interleave_rows(shape.heads, self.head_dim)
                k_rows = _interleave_rows(shape.kv_heads, self.head_dim) + q_rows.numel()
                v_rows = torch.arange(shape.kv_heads * self.head_dim) + q_rows.numel() + k_rows.numel()
                rows = torch.cat([q_rows, k_rows, v_rows])
            qkv = _fuse(projections, rows)
            interleaved = qkv is not None and rows is not None
        if qkv is None:
            qkv = _Concat(projections, self.dtype)
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj]) if fuse else None
        if gate_up is None:
            gate_up = _Concat([mlp.gate_proj, mlp.up_proj], self.dtype)
        attn_norm, attn_eps = _norm_params(layer.input_layernorm)
        mlp_norm, mlp_eps = _norm_params(layer.post_attention_layernorm)
        o, down = _single(attention.o_proj), _single(mlp.down_proj)
        return _Block(attn_norm, attn_eps, qkv, _input_dtype(qkv, self.dtype), interleaved,
                      o, _input_dtype(o, self.dtype), mlp_norm, mlp_eps,
                      gate_up, _input_dtype(gate_up, self.dtype), down,
                      _input_dtype(down, self.dtype), mlp.act_fn, shape.heads, shape.kv_heads,
                      float(getattr(attention, "scaling", self.head_dim ** -0.5)))

    def cache_shape(self) -> CacheShape:
        return CacheShape(len(self.blocks), self._kv_heads, self.head_dim, self.dtype, self.device)

    def new_cache(self, capacity: int) -> ContiguousCache:
        return ContiguousCache(self.cache_shape(), 1, capacity)

    def _rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=torch.float32)
        cos, sin = self.decoder.rotary_emb(probe, torch.arange(length, device=self.device)[None])
        return cos[0].float(), sin[0].float()

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, ...]:
        """(cos, sin, complex factors): [positions, head_dim] and [positions, head_dim / 2], grown on demand."""
        if self._rope is None or self._rope[0].shape[0] < length:
            size = max(length, 2 * (self._rope[0].shape[0] if self._rope is not None else 256))
            cos, sin = self._rotary(size)
            half = self.head_dim // 2
            self._rope = (cos, sin, torch.complex(cos[:, :half].float(), sin[:, :half].float()))
        return self._rope

    def can_share_cache(self, target) -> bool:
        """Whether this draft can decode in `target`'s own KV cache (same layers, heads, head size, float32)."""
        return self.shares_target_cache and target.cache_shape() == self.cache_shape()

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, counts: list[int], cache: ContiguousCache,
                all_logits: bool = False, exact_rows: bool = False) -> torch.Tensor:
        new = tokens.shape[1]
        if tokens.shape[0] != 1 or list(counts) != [new] or not isinstance(cache, ContiguousCache) or cache.batch != 1:
            raise SlimlmError("the lean draft runner decodes one sequence at a time (batch 1, no padding, "
                              "a contiguous cache: LeanRunner.new_cache)")
        start = cache.reserve([new])[0]
        end = start + new
        if self.sliding_window is not None and end > self.sliding_window:
            raise SlimlmError(f"the model attends within a sliding window of {self.sliding_window} tokens, which "
                              f"slimlm's runner does not implement; keep sequences within it (got {end})")
        cos_table, sin_table, factor_table = self._rope_tables(end)
        cos, sin = cos_table[start:end][None, None], sin_table[start:end][None, None]
        factors = factor_table[start:end][None, :, None]  # [1, new, 1, head_dim / 2]
        mask = None
        if new > 1:  # query t (at position start + t) sees slots 0 .. start + t
            mask = (torch.arange(end, device=self.device)[None, :]
                    <= torch.arange(start, end, device=self.device)[:, None])
        hidden = self.embed(tokens.to(self.device)).to(self.dtype)
        width, head_dim = hidden.shape[-1], self.head_dim
        for index, block in enumerate(self.blocks):
            x = F.rms_norm(hidden, (width,), block.attn_norm, block.attn_eps)
            qkv = block.qkv(x.to(block.qkv_dtype)).to(self.dtype)
            q_width, kv_width = block.heads * head_dim, block.kv_heads * head_dim
            if block.interleaved:  # RoPE as one complex product over q and k, back in the half-split layout
                qk = qkv[..., :q_width + kv_width].reshape(1, new, block.heads + block.kv_heads, head_dim // 2, 2)
                qk = torch.view_as_real(torch.view_as_complex(qk) * factors).transpose(-1, -2)
                qk = qk.reshape(1, new, block.heads + block.kv_heads, head_dim)
                query = qk[:, :, :block.heads].transpose(1, 2)
                key = qk[:, :, block.heads:].transpose(1, 2)
            else:
                query = apply_rotary(qkv[..., :q_width].view(1, new, block.heads, head_dim).transpose(1, 2),
                                     cos[0], sin[0])
                key = apply_rotary(qkv[..., q_width:q_width + kv_width].view(1, new, block.kv_heads, head_dim)
                                   .transpose(1, 2), cos[0], sin[0])
            value = qkv[..., q_width + kv_width:].view(1, new, block.kv_heads, head_dim).transpose(1, 2)
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, start:end] = key
            values[:, :, start:end] = value
            out = F.scaled_dot_product_attention(query, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                 scale=block.scale, enable_gqa=block.heads != block.kv_heads)
            out = block.o(out.transpose(1, 2).reshape(1, new, q_width).to(block.o_dtype))
            hidden = hidden + out
            x = F.rms_norm(hidden, (width,), block.mlp_norm, block.mlp_eps)
            gate_up = block.gate_up(x.to(block.gate_up_dtype))
            half = gate_up.shape[-1] // 2
            x = block.act(gate_up[..., :half]) * gate_up[..., half:]
            hidden = hidden + block.down(x.to(block.down_dtype))
        if not all_logits:
            hidden = hidden[:, -1]
        x = F.rms_norm(hidden, (width,), self.final_norm, self.final_eps)
        return self.head(x.to(self.head_dtype)).float()
