"""slimlm's own decoder runner: runs a pre-norm decoder's modules with slimlm's KV caches.

For Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3, Phi, GPT-NeoX, OPT and GPT-2 decoders (pre-norm
blocks: norm, attention with grouped-query heads, norm, MLP, or attention and MLP in parallel; the parts
found by the architecture adapter's roles, `LayerPlan`) the runner calls the Hugging Face model's own
modules (embedding and learned positions where the model has them, each block's norms, q/k/v/o
projections or a fused qkv, the MLP, the rotary-embedding module, final norm, LM head) and does the
attention itself:

    q, k, v = q_proj(x), k_proj(x), v_proj(x)                 (split into heads; Phi-3: one fused qkv)
    q, k = q_norm(q), k_norm(k)                               (Qwen3, Gemma 3)
    q, k = RoPE(q, position), RoPE(k, position)               (Su et al., 2021; Gemma 3: per layer type;
                                                               partial for Phi and GPT-NeoX; none for GPT-2, OPT)
    out = o_proj(softmax(q k^T * scaling + mask) v)           (torch's fused scaled_dot_product_attention)

The mask of a sliding-window layer (Mistral, Qwen2/3 past max_window_layers, Gemma 2/3 local layers)
lets a query see itself and the window - 1 keys before it; Gemma 2's attention logits are soft-capped
(cap * tanh(logits / cap), computed without SDPA), as are Gemma 2/3's final logits; Gemma 2/3's sandwich
norms wrap each branch's output; GPT-NeoX and Phi add attention and MLP to the residual in parallel.
Every family is tested against transformers' logits and greedy `generate` on tiny models whose layers
mix window and full attention.

with keys and values kept in a `slimlm.infer.cache` cache. A batch holds sequences of different
lengths: each step takes a right-padded [batch, new] token tensor with a count of real tokens per
sequence; sequence b's new tokens sit at cache positions lengths[b] .. lengths[b] + count - 1, and
the boolean mask lets query t attend to cache slot j iff j <= start[b] + t and j < length[b].

Projections are called as modules, so slimlm's quantized and sparse linears work unchanged; the
exception is generation's few-token float32 `nn.Linear` (and Llama/Mistral/Qwen2 gated MLPs made of
them), which slimlm's native few-row kernel (where `slimlm.quant.kernels` chose the native path; reading a
bfloat16 copy of a weight whose values are all bfloat16 numbers, as a model kept in bfloat16 `float_storage`
has) or `small_gemm` computes faster on this CPU than `F.linear` (float32 rounding differs;
`small_gemm=False` and evaluation, `fast_kernels=False`, keep the modules' own forward). SliceGPT's
per-block residual shortcuts (`attn_shortcut`, `mlp_shortcut`) are applied when present. Per-block
head counts come from each block's projection widths (structured pruning can change them). The native
one-token path and the lean draft runner are for Llama, Mistral and Qwen2 only. Other architectures
(Falcon, post-norm OPT-350m) raise `SlimlmError`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape, ContiguousCache, KVCache
from slimlm.models.adapter import ModelAdapter, linear_shape, text_config
from slimlm.quant import cpu_kernels
from slimlm.quant.kernels import decode_kernels, fp32_decode_path
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.w8a8 import NATIVE_MAX_ROWS as W8A8_NATIVE_ROWS
from slimlm.quant.w8a8 import Int8Linear

LLAMA_LIKE = ("llama", "mistral", "qwen2")  # the families the native one-token path and the lean runner know
SUPPORTED_FAMILIES = (*LLAMA_LIKE, "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "phi", "gpt_neox", "opt", "gpt2")
QKV_PER_HEAD = ("gpt_neox",)  # fused qkv rows grouped per head: [q_h, k_h, v_h] for each head h in turn
SMALL_GEMM_MAX_ROWS = 8  # generation: float32 linears over at most this many tokens take `small_gemm`
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x)): the runner calls the linears
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / sqrt(mean(x^2) + eps)
_SILU = ("SiLUActivation", "SiLU")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [batch, heads, tokens, dim] with cos/sin [batch or 1, tokens, rotary dim] (HF's half-split layout);
    a rotary dim below the head dim (partial rotary) leaves the remaining dims as they are."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def small_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows of float32 x, as a GEMM with the weight on the left.

    MKL's float32 paths behind F.linear are slow for one to a few rows on this project's CPU: one row
    takes a GEMV that reads a 1536 x 576 weight at about half the memory bandwidth, and two to five
    rows take a GEMM that packs the whole weight on every call (measured: a 2-token forward of
    SmolLM2-135M cost 1.6x a 1-token one). weight @ x.T with the few rows as the narrow side avoids
    the packing, and one row split into a batch of two half-height products (`bmm`) streams the
    weight at nearly full bandwidth. Same products and sums, in another order: the results differ
    from F.linear's by float32 rounding only."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    out_features = weight.shape[0]
    if rows == 1 and out_features >= 2 and weight.is_contiguous():
        even = out_features - out_features % 2  # an odd height (a pruned width) leaves its last row to one dot
        out = torch.bmm(weight[:even].view(2, even // 2, -1), flat.t().unsqueeze(0).expand(2, -1, 1)).view(1, -1)
        if even < out_features:
            out = torch.cat([out, (weight[even:] @ flat.t()).t()], dim=1)
    else:
        out = torch.mm(weight, flat.contiguous().t()).t().contiguous()  # contiguous: SDPA's fast path needs it
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)


def native_operands(module: nn.Module) -> tuple[cpu_kernels.NativeOperands, int] | None:
    """A linear's native-kernel operands and the most rows its forward sends to them, for the layers whose
    forward is exactly that kernel call (no input transforms, no subclass terms); else None."""
    if (type(module) is QuantizedLinear and module.use_fast_path and module.fast_path_casts_fp32_to_bf16 is None
            and module.input_quantizer is None and module.input_shift is None and module.input_scale is None):
        return module._native_operands(), module.fast_path_max_tokens
    if type(module) is Int8Linear and module.use_int8_kernel:
        operands = module.native_operands()
        return None if operands is None else (operands, W8A8_NATIVE_ROWS)
    return None


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, native: bool) -> torch.Tensor:
    """F.linear for a few rows of float32 x: slimlm's native kernel, which reads the weight once for all rows
    (`native`, where the native decode path was chosen; from a bfloat16 copy where every weight is a bfloat16
    number, `bfloat16_twin`), else `small_gemm`."""
    if native and weight.is_contiguous():
        return cpu_kernels.f32_few_rows(x, bfloat16_twin(weight), bias)
    return small_gemm(x, weight, bias)


_TWINS = WeakIdKeyDictionary()  # float32 weight -> (its version, its bfloat16 twin or None)


def bfloat16_twin(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight whose every value is a bfloat16 number (a model kept in `float_storage` bfloat16 holds
    such values in float32 parameters) as a bfloat16 copy, which the native kernel reads at half the bytes and
    widens exactly: the same products and sums. Otherwise the weight itself. Checked once per weight (and
    again after an in-place change); the copy lives as long as the weight."""
    entry = _TWINS.get(weight)
    if entry is None or entry[0] != weight._version:
        narrow = weight.detach().to(torch.bfloat16)
        twin = narrow if torch.equal(narrow.float(), weight.detach()) else None
        entry = _TWINS[weight] = (weight._version, twin)
    return weight if entry[1] is None else entry[1]


@dataclass(frozen=True)
class BlockShape:
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer computes, found by the architecture adapter's roles (pre-norm blocks):

        h = h + attn_out_norm(attention(attn_norm(h)))       (attn_out_norm: Gemma 2/3's sandwich norm)
        h = h + mlp_out_norm(mlp(mlp_norm(h)))"""

    attention: nn.Module
    projections: tuple[nn.Module, ...]  # q, k, v; or one fused qkv (Phi-3: q rows, then k, then v)
    output: nn.Module  # o
    q_norm: nn.Module | None  # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
    k_norm: nn.Module | None
    attn_norm: nn.Module
    attn_out_norm: nn.Module | None
    mlp: nn.Module
    mlp_norm: nn.Module
    mlp_out_norm: nn.Module | None
    window: int | None  # sliding window: a query sees itself and the window - 1 keys before it
    rope: str | None  # the layer type whose rotary embedding the layer uses (Gemma 3: local and global)
    softcap: float | None  # attention logits soft-capped as cap * tanh(logits / cap) (Gemma 2)
    parallel: bool  # h = h + attention(attn_norm(h)) + mlp(mlp_norm(h)) (GPT-NeoX, Phi: mlp_norm is attn_norm)


class _TwoLayerMlp(nn.Module):
    """fc2(act(fc1(x))) of a block that holds its MLP linears itself (OPT), as one callable MLP."""

    def __init__(self, up: nn.Module, down: nn.Module, act):
        super().__init__()
        self.up, self.down, self.act = up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class ModelRunner:
    """Forward passes of a supported decoder with an explicit KV cache."""

    def __init__(self, model: PreTrainedModel, fast_kernels: bool = True, small_gemm: bool | None = None):
        config = text_config(model)
        family = getattr(config, "model_type", "unknown")
        if family not in SUPPORTED_FAMILIES:
            raise SlimlmError(
                f"slimlm generation supports {', '.join(SUPPORTED_FAMILIES)} decoders; {type(model).__name__} "
                f"({family}) is not one of them")
        self.model, self.config, self.family = model, config, family
        self.llama_like = family in LLAMA_LIKE
        # Generation lets float32 quantized layers use the packed bf16 kernels where they are faster
        # (`slimlm.quant.kernels`); evaluation through the runner passes False to stay exact.
        self.fast_kernels = fast_kernels
        if family == "opt" and not config.do_layer_norm_before:
            raise SlimlmError("OPT-350m-style post-norm blocks (do_layer_norm_before=False) are not supported by "
                              "slimlm generation")
        self.decoder = model.base_model
        self.adapter = ModelAdapter(model)
        self.layers = list(self.adapter.blocks)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = getattr(self.decoder, "rotary_emb", None)  # None: learned absolute positions (GPT-2, OPT)
        # Gemma 3 keeps a rotary embedding per layer type (local and global bases)
        self._rope_takes_type = (self.rotary is not None
                                 and "layer_type" in inspect.signature(self.rotary.forward).parameters)
        self.plans = self._plans(config)
        self.blocks = [self._block_shape(plan) for plan in self.plans]
        self.vocab_size = getattr(model.get_output_embeddings(), "out_features", config.vocab_size)
        windows = [plan.window for plan in self.plans if plan.window is not None]
        self.sliding_window = min(windows) if windows else None  # the smallest window of any layer
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
        # Generation also computes float32 linears over a few tokens with `small_gemm` (float32 rounding
        # differs from F.linear's); `small_gemm=False`, and evaluation (fast_kernels=False), keep F.linear.
        self.small_gemm = fast_kernels if small_gemm is None else small_gemm
        self._native_operands: dict[int, tuple | None] = {}  # per quantized linear: native-kernel operands
        self._fused: dict[tuple[int, ...], bool] = {}  # per group of linears on one input: one kernel call?
        self._float_weights: dict[int, torch.Tensor] = {}  # per norm: its weight in float32, for the native call
        self._ops = None  # the native kernels, while a one-token (or exact-rows) float32 step of one sequence runs
        self._rope_rows: tuple[torch.Tensor, torch.Tensor] = ()  # cos, sin [new, head_dim] of that step

    def _plans(self, config) -> list[LayerPlan]:
        types = getattr(config, "layer_types", None) if self._rope_takes_type else None
        parallel_residual = bool(getattr(config, "use_parallel_residual", False))  # GPT-NeoX
        plans = []
        for block in self.adapter:
            linears, norms = block.linears, block.norms
            attention = block.module.get_submodule(block.linear_names["o"].rpartition(".")[0])
            projections = (linears["qkv"],) if "qkv" in linears else (linears["q"], linears["k"], linears["v"])
            window = getattr(attention, "sliding_window", getattr(config, "sliding_window", None))
            mlp = block.mlp_module()
            if mlp is None:  # OPT: fc1 and fc2 sit in the block
                mlp = _TwoLayerMlp(linears["up"], linears["down"], block.module.activation_fn)
            parallel = parallel_residual or "mlp_norm" not in norms  # Phi: one norm feeds both halves
            plans.append(LayerPlan(
                attention, projections, linears["o"], norms.get("q_norm"), norms.get("k_norm"), norms["attn_norm"],
                norms.get("attn_out_norm"), mlp, norms.get("mlp_norm", norms["attn_norm"]),
                norms.get("mlp_out_norm"), window, types[block.index] if types is not None else None,
                getattr(attention, "attn_logit_softcapping", None), parallel))
        return plans

    def _block_shape(self, plan: LayerPlan) -> BlockShape:
        widths = [linear_shape(p)[1] for p in plan.projections]
        if len(widths) == 1 and self.family in QKV_PER_HEAD:  # no grouped-query attention there
            return BlockShape(widths[0] // (3 * self.head_dim), widths[0] // (3 * self.head_dim))
        if len(widths) == 1:  # fused q, k, v: split by the config's ratio of key-value heads to heads
            config = self.config
            kv_share = getattr(config, "num_key_value_heads", config.num_attention_heads) / config.num_attention_heads
            query = round(widths[0] / (1 + 2 * kv_share))
            widths = [query, (widths[0] - query) // 2]
        return BlockShape(widths[0] // self.head_dim, widths[1] // self.head_dim)

    def _rope(self, key: str | None, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary is None:
            return None
        if self._rope_takes_type:
            return self.rotary(x, positions, key)
        return self.rotary(x, positions)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The embedding (Gemma's module scales by sqrt(hidden) itself), OPT's projection in, and learned
        absolute positions where the model has them (GPT-2; OPT, whose table starts at its offset)."""
        hidden = self.adapter.embedding(tokens)
        project_in = getattr(self.decoder, "project_in", None)
        if project_in is not None:
            hidden = project_in(hidden)
        table = self.adapter.position_embedding
        if table is not None:
            hidden = hidden + F.embedding(positions + getattr(table, "offset", 0), table.weight)
        return hidden

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.adapter.final_norm is not None:
            hidden = self._norm(self.adapter.final_norm, hidden)
        project_out = getattr(self.decoder, "project_out", None)
        return hidden if project_out is None else project_out(hidden)

    def cache_shape(self) -> CacheShape:
        return CacheShape(len(self.layers), tuple(b.kv_heads for b in self.blocks), self.head_dim, self.dtype,
                          self.device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, counts: list[int], cache: KVCache,
                all_logits: bool = False, exact_rows: bool = False) -> torch.Tensor:
        """Run `tokens` [batch, new] (right-padded; `counts[b]` real tokens in row b) through the model,
        appending to `cache`. Returns logits [batch, new, vocab] if `all_logits`, else the logits of each
        row's last real token, [batch, vocab] (rows with count 0 give the logits of their padding).

        `exact_rows` (batch 1, contiguous cache; speculative verification): attention runs one query at a
        time, exactly as single-token steps would run it, so a row's result differs from decoding that
        token alone only where a linear's arithmetic depends on the number of rows (float32 GEMMs; the
        packed int4/int8 kernels compute each row the same way whatever the count)."""
        with decode_kernels(self.fast_kernels):
            return self._forward(tokens, counts, cache, all_logits, exact_rows)

    def _forward(self, tokens: torch.Tensor, counts: list[int], cache: KVCache, all_logits: bool,
                 exact_rows: bool = False) -> torch.Tensor:
        tokens = tokens.to(self.device)
        batch, new = tokens.shape
        # One float32 token on the native path: RMSNorm, RoPE, attention and the gated product as native calls;
        # `exact_rows` (speculative verification) runs each of its rows through the same calls, so a verified
        # row is computed exactly as a one-token step computes it.
        native = (self.small_gemm and self.llama_like and fp32_decode_path() == "native" and self.dtype == torch.float32
                  and batch == 1 and isinstance(cache, ContiguousCache) and not cache.rotate_on_read)
        self._ops = cpu_kernels.load() if native and (new == 1 or exact_rows) else None
        starts = torch.tensor(cache.reserve(list(counts)), device=self.device)
        lengths = torch.tensor(cache.lengths, device=self.device)
        query_positions = starts[:, None] + torch.arange(new, device=self.device)[None, :]
        hidden = self._embed(tokens, query_positions)
        ropes = {key: self._rope(key, hidden, query_positions) for key in {plan.rope for plan in self.plans}}
        if self._ops is not None:
            self._rope_rows = tuple(part.reshape(new, -1).float().contiguous() for part in ropes[None])
        masks: dict = {}  # by key span and window (paged and contiguous spans differ)
        if batch == 1 and isinstance(cache, ContiguousCache):
            # One sequence that sees every slot up to its length: a lone query needs no mask, and with
            # `exact_rows` query t attends to the first start + t + 1 slots without one (as that step would).
            end = int(lengths[0])
            if new == 1:
                masks[end] = None
            elif exact_rows:
                masks["rows"] = [end - new + t + 1 for t in range(new)]
        for index, layer in enumerate(self.layers):
            hidden = self._block(index, layer, hidden, ropes, cache, query_positions, lengths, masks)
        hidden = self._final(hidden)
        if not all_logits:
            last = (torch.tensor(counts, device=self.device) - 1).clamp(min=0)
            hidden = hidden[torch.arange(batch, device=self.device), last]
        logits = self._linear(self.model.get_output_embeddings(), hidden)
        if self.final_softcap is not None:  # Gemma 2/3
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        native = self._native_layer(module, x)
        if native is not None:  # a quantized linear straight into the native kernel: no module-call overhead
            module.__dict__["last_path"] = native.path
            y = cpu_kernels.native_matmul_many(x, (native,))
            return y if module.bias is None else y + module.bias.float()
        if (self.small_gemm and type(module) is nn.Linear and x.numel() <= SMALL_GEMM_MAX_ROWS * x.shape[-1]
                and module.weight.dtype == torch.float32 and x.dtype == torch.float32 and x.device.type == "cpu"):
            return few_row_linear(x, module.weight, module.bias, fp32_decode_path() == "native")
        return module(x)

    def _linears(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Several linears of the same input: one native kernel call (the activations quantized once) when all
        take the native path on one column grid, else one call each."""
        parts = [self._native_layer(module, x) for module in modules]
        if parts[0] is None or not self._fusable(modules, parts):
            return [self._linear(module, x) for module in modules]
        y = cpu_kernels.native_matmul_many(x, parts)
        outputs = list(y.split([part.weight.shape[0] for part in parts], dim=-1))
        for index, module in enumerate(modules):
            module.__dict__["last_path"] = parts[index].path
            if module.bias is not None:
                outputs[index] = outputs[index] + module.bias.float()
        return outputs

    def _fusable(self, modules: tuple[nn.Module, ...], parts: list) -> bool:
        key = tuple(id(module) for module in modules)
        if key not in self._fused:
            self._fused[key] = cpu_kernels.fusable(parts)
        return self._fused[key]

    def _native_layer(self, module: nn.Module, x: torch.Tensor) -> cpu_kernels.NativeOperands | None:
        """The native-kernel operands of a plain `QuantizedLinear` (where the native decode path was chosen) or
        `Int8Linear` when its forward would take them for x."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        if type(module) is QuantizedLinear and fp32_decode_path() != "native":
            return None  # (asked before the operands are built: they cost memory)
        key = id(module)
        if key not in self._native_operands:  # what does not depend on x, once per runner
            self._native_operands[key] = native_operands(module)
        entry = self._native_operands[key]
        if entry is None or x.numel() > entry[1] * x.shape[-1]:
            return None
        return entry[0]

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Llama/Mistral/Qwen2 RMSNorm without the module call (the same float32 operations)."""
        if self.small_gemm and type(norm).__name__ in _RMS_NORMS and x.dtype == torch.float32:
            if self._ops is not None:
                weight = self._float_weights.get(id(norm))
                if weight is None:
                    weight = self._float_weights[id(norm)] = norm.weight.detach().float().contiguous()
                return self._ops.rms_norm(x.contiguous(), weight, norm.variance_epsilon)
            return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        return norm(x)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.small_gemm and type(mlp).__name__ in _GATED_MLPS:
            gate, up = self._linears((mlp.gate_proj, mlp.up_proj), x)
            if self._ops is not None and type(mlp.act_fn).__name__ in _SILU:
                gated = self._ops.silu_mul(gate, up)
            else:
                gated = mlp.act_fn(gate) * up
            return self._linear(mlp.down_proj, gated)
        return mlp(x)

    def _block(self, index, layer, hidden, ropes, cache, query_positions, lengths, masks) -> torch.Tensor:
        plan = self.plans[index]
        normed = self._norm(plan.attn_norm, hidden)
        attended = self._attention(index, plan, normed, ropes[plan.rope], cache, query_positions, lengths, masks)
        if plan.parallel:
            mlp_in = normed if plan.mlp_norm is plan.attn_norm else self._norm(plan.mlp_norm, hidden)
            return hidden + attended + self._mlp(plan.mlp, mlp_in)
        if plan.attn_out_norm is not None:
            attended = self._norm(plan.attn_out_norm, attended)
        shortcut = getattr(layer, "attn_shortcut", None)  # SliceGPT per-block rotations
        hidden = (hidden if shortcut is None else hidden @ shortcut) + attended
        mlp_out = self._mlp(plan.mlp, self._norm(plan.mlp_norm, hidden))
        if plan.mlp_out_norm is not None:
            mlp_out = self._norm(plan.mlp_out_norm, mlp_out)
        shortcut = getattr(layer, "mlp_shortcut", None)
        return (hidden if shortcut is None else hidden @ shortcut) + mlp_out

    def _project(self, index: int, plan: LayerPlan, x: torch.Tensor) -> list[torch.Tensor]:
        """Queries, keys and values [batch, new, heads, head_dim], q/k-normed where the layer has those norms."""
        batch, new, _ = x.shape
        shape, d = self.blocks[index], self.head_dim
        if len(plan.projections) == 1 and self.family in QKV_PER_HEAD:
            parts = self._linear(plan.projections[0], x).view(batch, new, shape.heads, 3 * d).chunk(3, dim=-1)
        elif len(plan.projections) == 1:
            parts = self._linear(plan.projections[0], x).split(
                [shape.heads * d, shape.kv_heads * d, shape.kv_heads * d], dim=-1)
        else:
            parts = self._linears(plan.projections, x)
        query, key, value = (part.reshape(batch, new, -1, d) for part in parts)
        if plan.q_norm is not None:
            query, key = plan.q_norm(query), plan.k_norm(key)
        return [query, key, value]

    def _attention(self, index, plan, x, rope, cache, query_positions, lengths, masks) -> torch.Tensor:
        batch, new, _ = x.shape
        shape, attention, window = self.blocks[index], plan.attention, plan.window
        query, key, value = self._project(index, plan, x)
        if self._ops is not None:
            return self._attention_native(index, attention, query, key, value, cache, window)
        query, key, value = (part.transpose(1, 2) for part in (query, key, value))
        if rope is not None:
            query = apply_rotary(query, *rope)
            if not cache.rotate_on_read:
                key = apply_rotary(key, *rope)
        cache.write(index, key, value)
        keys, values = cache.read(index)
        span = keys.shape[2]
        if cache.rotate_on_read and rope is not None:  # keys stored before RoPE: rotate each at its position
            key_positions = torch.arange(span, device=self.device)[None, :]
            keys = apply_rotary(keys, *self._rope(plan.rope, keys, key_positions))
        scale = getattr(attention, "scaling", self.head_dim ** -0.5)
        gqa = shape.heads != shape.kv_heads
        if plan.softcap is not None:
            mask = _cached_mask(masks, query_positions, lengths, span, window)
            out = capped_attention(query, keys, values, mask, scale, plan.softcap)
        elif "rows" in masks and not cache.rotate_on_read:
            out = torch.cat([F.scaled_dot_product_attention(query[:, :, t:t + 1], keys[:, :, _first(end, window):end],
                                                            values[:, :, _first(end, window):end], scale=scale,
                                                            enable_gqa=gqa)
                             for t, end in enumerate(masks["rows"])], dim=2)
        elif batch == 1 and new == 1 and masks.get(span, False) is None:  # a lone query sees every slot
            first = _first(span, window)
            if self.small_gemm:
                out = single_query_attention(query, keys[:, :, first:], values[:, :, first:], scale)
            else:
                out = F.scaled_dot_product_attention(query, keys[:, :, first:], values[:, :, first:], scale=scale,
                                                     enable_gqa=gqa)
        else:
            mask = _cached_mask(masks, query_positions, lengths, span, window)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return self._linear(plan.output, out.transpose(1, 2).reshape(batch, new, shape.heads * self.head_dim))

    def _attention_native(self, index, attention, query, key, value, cache, window) -> torch.Tensor:
        """The tokens of one sequence (contiguous cache), each as a one-token step: RoPE and attention
        through the native kernels, query t attending to the cache up to its own position."""
        shape, ops = self.blocks[index], self._ops
        new = query.shape[1]
        cos, sin = self._rope_rows
        query = query.reshape(new, shape.heads, self.head_dim)
        key = key.reshape(new, shape.kv_heads, self.head_dim)
        queries = [ops.rope_rows(query[t], cos[t], sin[t]) for t in range(new)]
        keys_new = [ops.rope_rows(key[t], cos[t], sin[t]) for t in range(new)]
        cache.write_tokens(index, torch.stack(keys_new), value.reshape(new, shape.kv_heads, self.head_dim))
        keys, values = cache.read(index)
        end = cache.lengths[0] - new + 1  # the first new token sees the cache up to and including itself
        scale = getattr(attention, "scaling", self.head_dim ** -0.5)
        out = [ops.single_query_attention(queries[t], keys[0, :, _first(end + t, window):end + t],
                                          values[0, :, _first(end + t, window):end + t], scale)
               for t in range(new)]
        return self._linear(attention.o_proj, torch.stack(out).view(1, new, shape.heads * self.head_dim))


def single_query_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query of one sequence to every cached key: three small batched products, which on
    CPU cost a fraction of `scaled_dot_product_attention`'s per-call overhead at decode sizes (the same
    function; float32 rounding differs). query [1, heads, 1, d], keys/values [1, kv_heads, span, d]."""
    heads, kv_heads, head_dim = query.shape[1], keys.shape[1], query.shape[-1]
    grouped = query.reshape(kv_heads, heads // kv_heads, head_dim)  # query heads sharing a key/value head
    scores = torch.bmm(grouped, keys[0].transpose(1, 2)).mul_(scale).softmax(dim=-1)
    return torch.bmm(scores, values[0]).reshape(1, heads, 1, head_dim)


def _cached_mask(masks: dict, query_positions: torch.Tensor, lengths: torch.Tensor, span: int,
                 window: int | None) -> torch.Tensor:
    """`attention_mask` for this key span and window, built once per forward and shared by its layers."""
    if (span, window) not in masks:
        masks[span, window] = attention_mask(query_positions, lengths, span, window)
    return masks[span, window]


def _first(end: int, window: int | None) -> int:
    """The first cache slot a query that sees slots up to `end` (exclusive) attends to within `window`."""
    return 0 if window is None else max(0, end - window)


def attention_mask(query_positions: torch.Tensor, lengths: torch.Tensor, span: int,
                   window: int | None = None) -> torch.Tensor:
    """[batch, 1, new, span] boolean: query at cache position p sees slot j iff j <= p and j < length (and
    j > p - window in a sliding-window layer). A row that would see nothing (a released sequence's padding)
    sees slot 0, so the softmax stays finite."""
    slots = torch.arange(span, device=query_positions.device)
    mask = (slots[None, None, :] <= query_positions[:, :, None]) & (slots[None, None, :] < lengths[:, None, None])
    if window is not None:
        mask &= slots[None, None, :] > query_positions[:, :, None] - window
    mask[..., 0] |= ~mask.any(dim=-1)
    return mask[:, None]


def capped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
                     cap: float) -> torch.Tensor:
    """Attention whose logits are soft-capped, cap * tanh(logits / cap) before the mask (Gemma 2), which
    `scaled_dot_product_attention` cannot do. query [b, heads, new, d], keys/values [b, kv_heads, span, d]."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    logits = torch.tanh(query @ keys.transpose(-1, -2) * scale / cap) * cap
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype) @ values
