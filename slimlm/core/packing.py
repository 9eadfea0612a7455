"""Bit-packing of unsigned quantization codes along the input dimension.

Every width uses the same layout: each output row is a little-endian bit stream in which code j
occupies bits [j * bits, (j + 1) * bits), least significant bit first, and the row takes
ceil(in_features * bits / 8) bytes. So 8 bits is the codes as they are, 4 bits puts code 2j in the
low nibble and code 2j + 1 in the high nibble of byte j, 2 bits puts four codes in a byte (code 4j
in the lowest two bits), and 3 bits (like 5, 6 and 7) puts eight codes in `bits` bytes. The unused
high bits of a row's last byte are zero.

This is a storage layout of slimlm (a row-major byte stream, so a row can be unpacked alone), not
the int32 packing of GPTQ/AutoGPTQ checkpoints nor the tiled layout of a matmul kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError


def packed_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row."""
    return (in_features * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SlimlmError(f"packing supports 1 to 8 bits per code (got {bits!r})")


def _check_codes(codes: Tensor, bits: int) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise SlimlmError(f"expected (out, in) uint8 codes, got {codes.dtype} of shape {tuple(codes.shape)}")
    if bits < 8 and codes.numel() and int(codes.max()) >= 2**bits:
        raise SlimlmError(f"a code is {int(codes.max())}, outside the {bits}-bit range 0..{2**bits - 1}")


def _pad_columns(t: Tensor, multiple: int) -> Tensor:
    extra = -t.shape[1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def pack(codes: Tensor, bits: int) -> Tensor:
    """(out, in) uint8 codes in [0, 2^bits - 1] -> (out, ceil(in * bits / 8)) uint8."""
    _check_bits(bits)
    _check_codes(codes, bits)
    out_features, in_features = codes.shape
    if bits == 8:
        return codes.contiguous().clone()
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        lanes = _pad_columns(codes, per_byte).view(out_features, -1, per_byte)
        packed = lanes[..., 0].clone()
        for lane in range(1, per_byte):
            packed |= lanes[..., lane] << (lane * bits)
        return packed
    return _pack_stream(codes, bits)[:, : packed_bytes(in_features, bits)].contiguous()


def _pack_stream(codes: Tensor, bits: int) -> Tensor:
    """Eight codes (8 * bits <= 64 bits) become `bits` bytes through one int64 word."""
    out_features = codes.shape[0]
    units = _pad_columns(codes, 8).view(out_features, -1, 8).long()
    shifts = torch.arange(8, device=codes.device) * bits
    word = (units << shifts).sum(dim=-1, keepdim=True)  # disjoint bit fields: the sum is an OR
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).view(out_features, -1)


def unpack(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """(out, ceil(in * bits / 8)) uint8 -> (out, in) uint8 codes; exact inverse of `pack`."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise SlimlmError(
            f"expected (out, bytes) uint8 packed codes, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_bytes(in_features, bits):
        raise SlimlmError(
            f"{packed.shape[1]} bytes per row do not hold {in_features} codes of {bits} bits "
            f"({packed_bytes(in_features, bits)} expected); check in_features and bits"
        )
    out_features = packed.shape[0]
    if bits == 8:
        return packed.contiguous().clone()
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        mask = 2**bits - 1
        lanes = [(packed >> (lane * bits)) & mask for lane in range(per_byte)]
        return torch.stack(lanes, dim=-1).view(out_features, -1)[:, :in_features].contiguous()
    return _unpack_stream(packed, bits)[:, :in_features].contiguous()


def _unpack_stream(packed: Tensor, bits: int) -> Tensor:
    out_features = packed.shape[0]
    units = _pad_columns(packed, bits).view(out_features, -1, bits).long()
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (units << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    return ((word >> shifts) & (2**bits - 1)).to(torch.uint8).view(out_features, -1)
