"""KIVI: keys quantized per channel, values per token, a full-precision window of recent tokens.

Liu et al., ICML 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Sec. 3-4
and Algorithm 1. Keys have a few outlier *channels*, so a key channel's statistics (min, max) are
taken over a group of G consecutive tokens (one float16 scale and zero per channel per G tokens);
values have no fixed outlier channels and are quantized per token (one scale and zero per G
consecutive channels of a token). The most recent R tokens stay in full precision.

Per layer and sequence this cache holds:
- quantized keys: chunks of G tokens, codes packed along the token axis
  [chunks, heads * head_dim, G * b / 8] uint8, scale/zero [chunks, heads, head_dim] float16;
- full-precision keys: the tokens after the last chunk, [heads, r, head_dim] (model dtype);
- quantized values: `PerTokenStore` (codes [heads, tokens, D * b / 8], scale/zero [heads, tokens, D / G]);
- full-precision values: the newest min(length, R) tokens.

Schedule (R a multiple of G, as in the paper's implementation): after every write, while the
full-precision keys number at least R + G, the oldest G of them are quantized as one chunk, so
a sequence of length n >= R keeps between R and R + G - 1 keys in full precision (n < R + G: all
of them); values are quantized token by token as they leave the window of R newest tokens.
With R >= the sequence length nothing is quantized and the cache equals a float cache exactly.

Deviations: the paper quantizes the prefill's keys at once (all but the last n mod R tokens) and
then groups decode keys R at a time; here prefill and decode follow the one rule above, which
keeps at least R recent keys in full precision (the paper keeps between 0 and R - 1 after a
flush). The grid is slimlm's shared asymmetric grid (range widened to contain 0, integer zero
point) rather than the raw min/max of KIVI's kernels. Dequantization is done in PyTorch on every
read (no fused low-bit attention kernel), so the memory saving is in what is held between steps.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape
from slimlm.infer.quantized_cache import (
    KVQuantSpec,
    LayerStoreCache,
    PerTokenStore,
    dequantize_groups_last,
    quantize_groups_last,
    tensor_bytes,
)


class _KiviLayer:
    """One sequence's keys and values of one layer."""

    def __init__(self, heads: int, spec: KVQuantSpec, head_dim: int, dtype: torch.dtype, device):
        self.heads, self.dim, self.spec = heads, head_dim, spec
        bits, group = spec.bits, spec.group_size
        self.key_codes = torch.empty(0, heads * head_dim, group * bits // 8, dtype=torch.uint8, device=device)
        self.key_scale = torch.empty(0, heads, head_dim, dtype=torch.float16, device=device)
        self.key_zero = torch.empty_like(self.key_scale)
        self.key_full = torch.empty(heads, 0, head_dim, dtype=dtype, device=device)
        self.values = PerTokenStore(heads, head_dim, bits, group, device)
        self.value_full = torch.empty(heads, 0, head_dim, dtype=dtype, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        spec = self.spec
        group, residual = spec.group_size, spec.residual
        self.key_full = torch.cat([self.key_full, k], dim=1)
        while self.key_full.shape[1] >= residual + group:
            oldest, self.key_full = self.key_full[:, :group], self.key_full[:, group:].clone()
            # per channel over G tokens: put the token axis last, one group = the whole chunk
            codes, scale, zero = quantize_groups_last(oldest.transpose(1, 2), spec.bits, group)
            self.key_codes = torch.cat([self.key_codes, codes.reshape(1, self.heads * self.dim, -1)])
            self.key_scale = torch.cat([self.key_scale, scale.reshape(1, self.heads, self.dim)])
            self.key_zero = torch.cat([self.key_zero, zero.reshape(1, self.heads, self.dim)])
        self.value_full = torch.cat([self.value_full, v], dim=1)
        leaving = self.value_full.shape[1] - residual
        if leaving > 0:
            self.values.append(self.value_full[:, :leaving])
            self.value_full = self.value_full[:, leaving:].clone()

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        spec, chunks = self.spec, self.key_codes.shape[0]
        if chunks:
            keys = dequantize_groups_last(self.key_codes.reshape(chunks, self.heads, self.dim, -1),
                                          self.key_scale[..., None], self.key_zero[..., None], spec.bits,
                                          spec.group_size, dtype)  # [chunks, heads, dim, G]
            keys = keys.permute(1, 0, 3, 2).reshape(self.heads, chunks * spec.group_size, self.dim)
            keys = torch.cat([keys, self.key_full.to(dtype)], dim=1)
        else:
            keys = self.key_full.to(dtype)
        if self.values.tokens:
            values = torch.cat([self.values.read(dtype), self.value_full.to(dtype)], dim=1)
        else:
            values = self.value_full.to(dtype)
        return keys, values

    def nbytes(self) -> int:
        return (sum(tensor_bytes(t) for t in (self.key_codes, self.key_scale, self.key_zero, self.key_full,
                                              self.value_full)) + self.values.nbytes())


class KiviCache(LayerStoreCache):
    """KIVI quantized KV cache (keys per channel, values per token, full-precision residual window)."""

    def __init__(self, shape: CacheShape, batch: int, spec: KVQuantSpec):
        if spec.method != "kivi":
            raise SlimlmError(f"KiviCache needs a kivi spec, got {spec.name}")
        super().__init__(shape, batch, spec)
        self._init_stores()

    def _new(self, layer: int) -> _KiviLayer:
        return _KiviLayer(self.shape.kv_heads[layer], self.spec, self.shape.head_dim, self.shape.dtype,
                          self.shape.device)

    def full_precision_tokens(self, layer: int = 0, sequence: int = 0) -> tuple[int, int]:
        """(keys, values) held in full precision for one sequence of one layer."""
        state = self.layers[layer][sequence]
        return state.key_full.shape[1], state.value_full.shape[1]
