"""slimlm's own decoder runner: runs a Llama-style model's modules with slimlm's KV caches.

For Llama, Mistral and Qwen2 decoders (pre-norm blocks: RMSNorm, attention with rotary position
embeddings and grouped-query heads, RMSNorm, gated MLP) the runner calls the Hugging Face model's
own modules (embedding, each block's norms, q/k/v/o projections and `mlp`, the rotary-embedding
module, final norm, LM head) and does the attention itself:

    q, k, v = q_proj(x), k_proj(x), v_proj(x)                 (split into heads)
    q, k = RoPE(q, position), RoPE(k, position)               (Su et al., 2021)
    out = o_proj(softmax(q k^T / sqrt(head_dim) + mask) v)    (torch's fused scaled_dot_product_attention)

with keys and values kept in a `slimlm.infer.cache` cache. A batch holds sequences of different
lengths: each step takes a right-padded [batch, new] token tensor with a count of real tokens per
sequence; sequence b's new tokens sit at cache positions lengths[b] .. lengths[b] + count - 1, and
the boolean mask lets query t attend to cache slot j iff j <= start[b] + t and j < length[b].

Projections are always called as modules, never read as `.weight`, so slimlm's quantized and
sparse linears work unchanged; SliceGPT's per-block residual shortcuts (`attn_shortcut`,
`mlp_shortcut`) are applied when present. Per-block head counts come from each block's
projection widths (structured pruning can change them). Other architectures raise `SlimlmError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape, KVCache
from slimlm.models.adapter import linear_shape, text_config
from slimlm.quant.kernels import decode_kernels

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [batch, heads, tokens, dim] with cos/sin [batch or 1, tokens, dim] (HF's half-split layout)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


@dataclass(frozen=True)
class BlockShape:
    heads: int
    kv_heads: int


class ModelRunner:
    """Forward passes of a supported decoder with an explicit KV cache."""

    def __init__(self, model: PreTrainedModel, fast_kernels: bool = True):
        config = text_config(model)
        family = getattr(config, "model_type", "unknown")
        if family not in SUPPORTED_FAMILIES:
            raise SlimlmError(
                f"slimlm generation supports {', '.join(SUPPORTED_FAMILIES)} decoders; {type(model).__name__} "
                f"({family}) is not one of them")
        self.model, self.config, self.family = model, config, family
        # Generation lets float32 quantized layers use the packed bf16 kernels where they are faster
        # (`slimlm.quant.kernels`); evaluation through the runner passes False to stay exact.
        self.fast_kernels = fast_kernels
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.blocks = [self._block_shape(layer) for layer in self.layers]
        self.vocab_size = getattr(model.get_output_embeddings(), "out_features", config.vocab_size)
        self.sliding_window = self._sliding_window(config)
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype if parameter.is_floating_point() else torch.float32

    def _block_shape(self, layer: nn.Module) -> BlockShape:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attention, name):
                raise SlimlmError(f"block has no self_attn.{name}: not a {'/'.join(SUPPORTED_FAMILIES)} decoder")
        if hasattr(attention, "q_norm"):
            raise SlimlmError("attention with q/k norms (Qwen3, OLMo2) is not supported by slimlm generation")
        heads = linear_shape(attention.q_proj)[1] // self.head_dim
        kv_heads = linear_shape(attention.k_proj)[1] // self.head_dim
        return BlockShape(heads, kv_heads)

    @staticmethod
    def _sliding_window(config) -> int | None:
        """The model's own attention window where any layer uses one (the runner then refuses longer sequences)."""
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return window

    def cache_shape(self) -> CacheShape:
        return CacheShape(len(self.layers), tuple(b.kv_heads for b in self.blocks), self.head_dim, self.dtype,
                          self.device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, counts: list[int], cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` [batch, new] (right-padded; `counts[b]` real tokens in row b) through the model,
        appending to `cache`. Returns logits [batch, new, vocab] if `all_logits`, else the logits of each
        row's last real token, [batch, vocab] (rows with count 0 give the logits of their padding)."""
        with decode_kernels(self.fast_kernels):
            return self._forward(tokens, counts, cache, all_logits)

    def _forward(self, tokens: torch.Tensor, counts: list[int], cache: KVCache, all_logits: bool) -> torch.Tensor:
        tokens = tokens.to(self.device)
        batch, new = tokens.shape
        starts = torch.tensor(cache.reserve(list(counts)), device=self.device)
        lengths = torch.tensor(cache.lengths, device=self.device)
        self._check_window(int(lengths.max()))
        query_positions = starts[:, None] + torch.arange(new, device=self.device)[None, :]
        hidden = self.decoder.embed_tokens(tokens)
        query_rope = self.decoder.rotary_emb(hidden, query_positions)
        masks: dict[int, torch.Tensor] = {}  # by key span (paged and contiguous spans differ)
        for index, layer in enumerate(self.layers):
            hidden = self._block(index, layer, hidden, query_rope, cache, query_positions, lengths, masks)
        hidden = self.decoder.norm(hidden)
        if not all_logits:
            last = (torch.tensor(counts, device=self.device) - 1).clamp(min=0)
            hidden = hidden[torch.arange(batch, device=self.device), last]
        return self.model.get_output_embeddings()(hidden)

    def _check_window(self, longest: int) -> None:
        if self.sliding_window is not None and longest > self.sliding_window:
            raise SlimlmError(f"the model attends within a sliding window of {self.sliding_window} tokens, which "
                              f"slimlm's runner does not implement; keep sequences within it (got {longest})")

    def _block(self, index, layer, hidden, query_rope, cache, query_positions, lengths, masks) -> torch.Tensor:
        attention_input = layer.input_layernorm(hidden)
        attended = self._attention(index, layer.self_attn, attention_input, query_rope, cache, query_positions,
                                   lengths, masks)
        shortcut = getattr(layer, "attn_shortcut", None)  # SliceGPT per-block rotations
        hidden = (hidden if shortcut is None else hidden @ shortcut) + attended
        mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
        shortcut = getattr(layer, "mlp_shortcut", None)
        return (hidden if shortcut is None else hidden @ shortcut) + mlp_out

    def _attention(self, index, attention, x, query_rope, cache, query_positions, lengths, masks) -> torch.Tensor:
        batch, new, _ = x.shape
        shape = self.blocks[index]
        query = attention.q_proj(x).view(batch, new, shape.heads, self.head_dim).transpose(1, 2)
        key = attention.k_proj(x).view(batch, new, shape.kv_heads, self.head_dim).transpose(1, 2)
        value = attention.v_proj(x).view(batch, new, shape.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = query_rope
        query = apply_rotary(query, cos, sin)
        if not cache.rotate_on_read:
            key = apply_rotary(key, cos, sin)
        cache.write(index, key, value)
        keys, values = cache.read(index)
        span = keys.shape[2]
        if cache.rotate_on_read:  # keys stored before RoPE: rotate each at its position in the cache
            key_positions = torch.arange(span, device=self.device)[None, :]
            keys = apply_rotary(keys, *self.decoder.rotary_emb(keys, key_positions))
        if span not in masks:
            masks[span] = attention_mask(query_positions, lengths, span)
        scale = getattr(attention, "scaling", self.head_dim ** -0.5)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=masks[span], scale=scale,
                                             enable_gqa=shape.heads != shape.kv_heads)
        return attention.o_proj(out.transpose(1, 2).reshape(batch, new, shape.heads * self.head_dim))


def attention_mask(query_positions: torch.Tensor, lengths: torch.Tensor, span: int) -> torch.Tensor:
    """[batch, 1, new, span] boolean: query at cache position p sees slot j iff j <= p and j < length.
    A row that would see nothing (a released sequence's padding) sees slot 0, so the softmax stays finite."""
    slots = torch.arange(span, device=query_positions.device)
    mask = (slots[None, None, :] <= query_positions[:, :, None]) & (slots[None, None, :] < lengths[:, None, None])
    mask[..., 0] |= ~mask.any(dim=-1)
    return mask[:, None]
