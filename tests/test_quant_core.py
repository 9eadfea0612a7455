"""The quantization core: grids (slimlm.quant.grid), bit packing and QuantizedLinear."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from slimlm.core.packing import pack, packed_bytes, unpack
from slimlm.errors import SlimlmError
from slimlm.quant import qlinear as qlinear_module
from slimlm.quant.grid import (
    FP4_E2M1_MAGNITUDES,
    MSE_NORM,
    QuantizedWeight,
    dequantize,
    fake_quantize,
    find_params,
    fit_codebook,
    fp_max,
    group_bounds,
    quantize,
    quantize_weight,
)
from slimlm.quant.qlinear import QuantizedLinear

EPS = 1e-6


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random inputs on every run."""
    torch.manual_seed(0)


def weights(rows: int, cols: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    """Gaussian weights with a few outliers, like an LLM's linear layers."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * spread
    outliers = torch.rand(rows, cols, generator=generator) < 0.01
    return torch.where(outliers, w * 8, w)


def row_error(w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (approx - w).abs().pow(MSE_NORM).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------------


def test_group_bounds_per_channel_and_shorter_last_group():
    assert group_bounds(576, None) == [(0, 576)]
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(512, 128)[-1] == (384, 512)
    assert group_bounds(100, 256) == [(0, 100)]
    for bad in (0, -4, 2.5):
        with pytest.raises(SlimlmError, match="group_size"):
            group_bounds(576, bad)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_and_half_step_error_inside_the_range(bits, symmetric):
    for seed in range(3):
        w = weights(16, 96, seed)
        scale, zero = find_params(w, bits, symmetric)
        assert scale.shape == zero.shape == (16,)
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1
        q = quantize(w, scale, zero, bits)
        assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
        assert torch.equal(quantize(dequantize(q, scale, zero), scale, zero, bits), q)
        approx = fake_quantize(w, scale, zero, bits)
        assert torch.equal(approx, dequantize(q, scale, zero))
        # The min-max clipping range is [min(w), max(w)] (widened to 0): every weight is inside it.
        # Rounding the zero point may leave an end of it up to scale/2 beyond the grid, still in bound.
        assert torch.all((w - approx).abs() <= (scale / 2)[:, None] * (1 + 1e-5) + EPS)


def test_zero_is_exactly_representable_in_the_asymmetric_grid():
    w = weights(8, 64, seed=1)
    w[0] = w[0].abs() + 0.1  # all positive: xmin is clamped to 0
    w[1] = -(w[1].abs() + 0.1)  # all negative
    w[2] = 0.0  # all zero: the reference widens the range to [-1, 1]
    w[3, ::5] = 0.0  # exact zeros inside a row
    for bits in (2, 3, 4, 8):
        scale, zero = find_params(w, bits, symmetric=False)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        zeros = torch.zeros_like(w)
        assert torch.equal(fake_quantize(zeros, scale, zero, bits), zeros)
        approx = fake_quantize(w, scale, zero, bits)
        assert torch.equal(approx[w == 0], w[w == 0])
    scale, zero = find_params(w[2:3], 4, symmetric=False)
    assert torch.allclose(scale, torch.tensor([2 / 15])) and zero.item() in (7, 8)  # round(7.5) in float32


def test_symmetric_grid_is_symmetric():
    for bits in (2, 3, 4, 8):
        w = weights(12, 80, seed=bits)
        scale, zero = find_params(w, bits, symmetric=True)
        scale_neg, zero_neg = find_params(-w, bits, symmetric=True)
        assert torch.equal(scale, scale_neg) and torch.equal(zero, zero_neg)
        assert torch.all(zero == 2 ** (bits - 1))
        assert torch.allclose(scale, 2 * w.abs().amax(dim=1) / (2**bits - 1))
        approx, approx_neg = fake_quantize(w, scale, zero, bits), fake_quantize(-w, scale, zero, bits)
        unclipped = (w / scale[:, None]).round().abs() <= 2 ** (bits - 1) - 1
        assert torch.equal(approx_neg[unclipped], -approx[unclipped])
    w = weights(4, 32, seed=9).abs()  # no negative values: still a centred grid (reference deviation)
    scale, _ = find_params(w, 4, symmetric=True)
    assert torch.allclose(scale, 2 * w.amax(dim=1) / 15)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clipping_is_never_worse_than_minmax(symmetric):
    for seed in range(3):
        w = weights(24, 128, seed)
        for bits in (2, 3, 4):
            minmax = fake_quantize(w, *find_params(w, bits, symmetric), bits)
            mse = fake_quantize(w, *find_params(w, bits, symmetric, clip="mse"), bits)
            assert torch.all(row_error(w, mse) <= row_error(w, minmax))
            if bits <= 3:
                assert row_error(w, mse).sum() < row_error(w, minmax).sum()  # outliers get clipped


def test_quantize_weight_groups_with_a_shorter_last_group():
    w = weights(32, 576, seed=4)
    qw = quantize_weight(w, 4, 128, symmetric=False)
    assert qw.codes.shape == (32, 576) and qw.scale.shape == qw.zero.shape == (32, 5)
    for group, (start, end) in enumerate(group_bounds(576, 128)):
        scale, zero = find_params(w[:, start:end], 4, symmetric=False)
        assert torch.equal(qw.scale[:, group], scale) and torch.equal(qw.zero[:, group], zero)
        expected = fake_quantize(w[:, start:end], scale, zero, 4)
        assert torch.equal(qw.dequantize()[:, start:end], expected)
    per_channel = quantize_weight(w, 4, None, symmetric=False)
    assert per_channel.scale.shape == (32, 1)
    grouped_error = (qw.dequantize() - w).pow(2).sum()
    assert grouped_error < (per_channel.dequantize() - w).pow(2).sum()


def test_per_tensor_and_per_channel_granularity():
    w = weights(16, 64, seed=5)
    tensor = quantize_weight(w, 8, None, symmetric=True, granularity="tensor")
    assert tensor.scale.shape == (16, 1) and torch.all(tensor.scale == tensor.scale[0, 0])
    assert torch.allclose(tensor.scale[0, 0], 2 * w.abs().max() / 255)
    channel = quantize_weight(w, 8, None, symmetric=True, granularity="channel")
    assert torch.equal(channel.scale[:, 0], find_params(w, 8, True)[0])
    with pytest.raises(SlimlmError, match="group_size"):
        quantize_weight(w, 4, 32, symmetric=True, granularity="channel")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_matches_torch_float8_cast(fmt):
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[fmt]
    w = weights(16, 256, seed=6)
    for group_size in (None, 64):
        qw = quantize_weight(w, 8, group_size, symmetric=True, fmt=fmt)
        columns = torch.arange(256) // (group_size or 256)
        scale = qw.scale[:, columns]
        assert torch.allclose(qw.scale, _group_absmax(w, group_size) / fp_max(fmt))
        assert torch.equal(qw.codes, (w / scale).to(dtype).view(torch.uint8))
        assert torch.equal(qw.dequantize(), (w / scale).to(dtype).float() * scale)
        assert torch.all(qw.zero == 0)


def _group_absmax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1, group_size or w.shape[1]).amax(dim=2)


def test_fp4_e2m1_rounds_to_the_nearest_value():
    w = weights(8, 128, seed=7)
    qw = quantize_weight(w, 4, 32, symmetric=True, fmt="fp4_e2m1")
    assert int(qw.codes.max()) <= 15
    table = torch.tensor(FP4_E2M1_MAGNITUDES + tuple(-m for m in FP4_E2M1_MAGNITUDES))
    scale = qw.scale[:, torch.arange(128) // 32]
    x = w / scale
    decoded = table[qw.codes.long()]
    nearest = (x[..., None] - table).abs().min(dim=-1).values
    assert torch.allclose((x - decoded).abs(), nearest, atol=1e-6)
    assert torch.allclose(qw.dequantize(), decoded * scale)
    assert torch.allclose(qw.scale, _group_absmax(w, 32) / 6)
    # Ties go to the even mantissa (OCP rounding): 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4.
    ties = torch.tensor([[6.0, 0.25, 0.75, 2.5, 5.0, -0.75, -5.0, 1.25]])
    tie_codes = quantize_weight(ties, 4, None, symmetric=True, fmt="fp4_e2m1").codes
    assert table[tie_codes.long()].tolist() == [[6.0, 0.0, 1.0, 2.0, 4.0, -1.0, -4.0, 1.0]]


@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_error_is_at_most_the_uniform_error_on_gaussian_weights(bits):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(bits)) * 0.02
    for group_size in (None, 128):
        codebook = quantize_weight(w, bits, group_size, symmetric=False, fmt="codebook")
        uniform = quantize_weight(w, bits, group_size, symmetric=False)
        assert codebook.codebook.shape == (64, 512 // (group_size or 512), 2**bits)
        assert torch.all(codebook.scale == 1) and torch.all(codebook.zero == 0)
        codebook_error = (codebook.dequantize() - w).pow(2).sum(dim=1)
        uniform_error = (uniform.dequantize() - w).pow(2).sum(dim=1)
        assert torch.all(codebook_error <= uniform_error * (1 + 1e-5))
        assert codebook_error.sum() < 0.9 * uniform_error.sum()
    table, codes = fit_codebook(w[:4], bits)
    again = fit_codebook(w[:4], bits)
    assert torch.equal(table, again[0]) and torch.equal(codes, again[1])  # deterministic
    assert torch.all(table[:, 1:] >= table[:, :-1])


def test_act_order_g_idx_selects_each_columns_group():
    w = weights(8, 64, seed=8)
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[permutation] = (torch.arange(64) // 16).to(torch.int32)  # groups formed in permuted order
    scales, zeros = [], []
    for group in range(4):
        scale, zero = find_params(w[:, g_idx == group], 4, symmetric=False)
        scales.append(scale)
        zeros.append(zero)
    scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)
    codes = quantize(w, scale[:, g_idx.long()], zero[:, g_idx.long()], 4)
    qw = QuantizedWeight(codes, scale, zero, 4, 16, False, "int", g_idx=g_idx)
    expected = fake_quantize(w, scale[:, g_idx.long()], zero[:, g_idx.long()], 4)
    assert torch.equal(qw.dequantize(), expected)


def test_invalid_settings_name_the_problem():
    w = weights(4, 32, seed=0)
    cases = [
        (dict(bits=1), "2 to 8 bits"),
        (dict(bits=9), "2 to 8 bits"),
        (dict(bits=4, fmt="fp8_e4m3", symmetric=True), "8 bits per weight"),
        (dict(bits=8, fmt="fp4_e2m1", symmetric=True), "4 bits per weight"),
        (dict(bits=8, fmt="fp8_e5m2", symmetric=False), "symmetric"),
        (dict(bits=4, fmt="nf4"), "unknown quantization format"),
        (dict(bits=4, clip="percentile"), "unknown clipping"),
        (dict(bits=4, granularity="row"), "unknown granularity"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, fmt="codebook", clip="mse"), "clipping does not apply"),
    ]
    for overrides, message in cases:
        arguments = dict(bits=4, group_size=None, symmetric=False) | overrides
        with pytest.raises(SlimlmError, match=message):
            quantize_weight(w, **arguments)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match="NaN"):
        quantize_weight(bad, 4, None, False)
    with pytest.raises(SlimlmError, match="matrix"):
        find_params(w[0], 4, False)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip_for_every_width(bits):
    generator = torch.Generator().manual_seed(bits)
    for in_features in (1, 3, 5, 7, 8, 9, 13, 64, 577):
        codes = torch.randint(0, 2**bits, (5, in_features), generator=generator, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, packed_bytes(in_features, bits))
        assert packed.shape[1] == -(-in_features * bits // 8)
        assert torch.equal(unpack(packed, bits, in_features), codes)
    full = torch.full((2, 16), 2**bits - 1, dtype=torch.uint8)
    assert torch.equal(unpack(pack(full, bits), bits, 16), full)


def test_pack_layout_is_a_little_endian_bit_stream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    assert pack(codes[:, :4] % 4, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6]]
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0].tolist()))  # eight codes in three bytes
    assert pack(codes, 3).tolist() == [[stream & 0xFF, stream >> 8 & 0xFF, stream >> 16 & 0xFF]]


def test_pack_rejects_bad_input():
    with pytest.raises(SlimlmError, match="outside the 3-bit range"):
        pack(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(SlimlmError, match="uint8"):
        pack(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(SlimlmError, match="bytes per row"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


# ------------------------------------------------------------------------------------------------
# QuantizedLinear
# ------------------------------------------------------------------------------------------------

FORMAT_CASES = [
    dict(bits=4, group_size=64, symmetric=False, fmt="int"),
    dict(bits=3, group_size=128, symmetric=True, fmt="int"),  # shorter last group (192 = 128 + 64)
    dict(bits=8, group_size=None, symmetric=True, fmt="int"),
    dict(bits=5, group_size=32, symmetric=False, fmt="int"),
    dict(bits=8, group_size=64, symmetric=True, fmt="fp8_e4m3"),
    dict(bits=8, group_size=None, symmetric=True, fmt="fp8_e5m2"),
    dict(bits=4, group_size=32, symmetric=True, fmt="fp4_e2m1"),
    dict(bits=3, group_size=64, symmetric=False, fmt="codebook"),
]


INT4_G64 = dict(bits=4, group_size=64, symmetric=False, fmt="int")


def make_layer(out_features=48, in_features=192, bias=True, seed=0, scale_dtype=None, **case):
    w = weights(out_features, in_features, seed)
    qw = quantize_weight(w, case["bits"], case["group_size"], case["symmetric"], fmt=case["fmt"])
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(seed)) * 0.1 if bias else None
    return qw, b, QuantizedLinear.from_quantized(qw, b, scale_dtype=scale_dtype)


@pytest.mark.parametrize("case", FORMAT_CASES, ids=lambda c: f"{c['fmt']}{c['bits']}g{c['group_size']}")
def test_reference_forward_is_exact(case):
    qw, b, layer = make_layer(scale_dtype=torch.float32, **case)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    assert torch.equal(layer.codes(), qw.codes)
    x = torch.randn(2, 5, 192)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize(), b))
    assert layer.last_path == "reference"
    assert layer.num_logical_params() == 48 * 192 + 48


@pytest.mark.parametrize("case", FORMAT_CASES, ids=lambda c: f"{c['fmt']}{c['bits']}g{c['group_size']}")
def test_state_dict_round_trip_is_bitwise(case):
    _, _, layer = make_layer(**case)
    for source in (layer, make_layer(bias=False, **case)[2].to(torch.float32)):
        state = source.state_dict()
        assert all(isinstance(value, torch.Tensor) for value in state.values())
        meta = json.loads(json.dumps(source.meta()))
        loaded = QuantizedLinear.empty(meta)
        loaded.load_state_dict(state, strict=True)
        assert loaded.meta() == source.meta()
        x = torch.randn(3, 192)
        assert torch.equal(loaded(x), source(x))
        assert torch.equal(loaded(x.bfloat16()), source(x.bfloat16()))


def test_state_dict_round_trip_with_act_order():
    qw, b, _ = make_layer(**FORMAT_CASES[0])
    qw.g_idx = torch.randperm(192, generator=torch.Generator().manual_seed(1)).to(torch.int32) // 64
    layer = QuantizedLinear.from_quantized(qw, b)
    loaded = QuantizedLinear.empty(json.loads(json.dumps(layer.meta())))
    loaded.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 192, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), layer(x)) and layer.last_path == "reference"  # reordered groups: no kernel
    assert loaded.g_idx.dtype == torch.int32


def test_scale_storage_dtype_keeps_precision():
    w = weights(16, 64, seed=3)
    assert QuantizedLinear.from_quantized(quantize_weight(w, 4, 32, False), None).scale.dtype == torch.float16
    tiny = quantize_weight(w, 8, None, True, fmt="fp8_e5m2")  # absmax / 57344: float16 subnormals
    assert QuantizedLinear.from_quantized(tiny, None).scale.dtype == torch.float32
    with pytest.raises(SlimlmError, match="scale_dtype=torch.float32"):
        QuantizedLinear.from_quantized(tiny, None, scale_dtype=torch.float16)
    assert QuantizedLinear.from_quantized(tiny, None, scale_dtype=torch.bfloat16).scale.dtype == torch.bfloat16


def test_empty_rejects_incomplete_metadata():
    _, _, layer = make_layer(**FORMAT_CASES[0])
    meta = layer.meta()
    with pytest.raises(SlimlmError, match="version"):
        QuantizedLinear.empty(meta | {"version": 99})
    del meta["bits"]
    with pytest.raises(SlimlmError, match="lacks"):
        QuantizedLinear.empty(meta)


def test_buffers_of_a_4bit_g64_layer_are_under_0_3x_float32():
    for out_features, in_features in ((1536, 576), (576, 1536)):
        w = weights(out_features, in_features, seed=2)
        layer = QuantizedLinear.from_quantized(quantize_weight(w, 4, 64, symmetric=False), None)
        stored = sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers())
        assert stored < 0.3 * w.numel() * 4
        assert layer.num_logical_params() == w.numel()
        assert set(layer.state_dict()) == {"packed", "scale", "zero"}


def _relative_errors(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    difference = (output.float() - reference).abs()
    return float(difference.max() / reference.abs().max()), float(difference.mean() / reference.abs().mean())


FAST_CASES = [
    # (bits, group_size, symmetric, out, in, kernel)
    (4, 64, False, 1536, 576, "int4"),
    (4, 32, True, 64, 256, "int4"),
    (4, 128, False, 48, 512, "int4"),
    (4, 256, False, 32, 512, "int4"),
    (8, None, True, 96, 576, "int8"),
]


@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features,kernel", FAST_CASES)
def test_fast_path_matches_reference_in_bfloat16(bits, group_size, symmetric, out_features, in_features, kernel):
    w = weights(out_features, in_features, seed=3)
    qw = quantize_weight(w, bits, group_size, symmetric)
    bias = torch.randn(out_features) * 0.05
    layer = QuantizedLinear.from_quantized(qw, bias)
    generator = torch.Generator().manual_seed(0)
    for shape in ((1, in_features), (64, in_features), (2, 7, in_features), (1, 1, in_features)):
        x = torch.randn(shape, generator=generator).bfloat16()
        fast = layer(x)
        assert layer.last_path == kernel and fast.dtype == torch.bfloat16 and fast.shape == (*shape[:-1], out_features)
        exact = F.linear(x.float(), layer.dequantize_weight(), bias)
        worst, mean = _relative_errors(fast, exact)
        # bfloat16 keeps 8 significant bits (its rounding of the output alone is up to 0.4%), and the
        # kernel also rounds each group's scale and zero offset to bfloat16: an error shared by the
        # whole group, so about twice the reference path's in bfloat16 (and far below the
        # quantization error itself). The float32 test below checks the convention tightly.
        assert worst < 4e-2 and mean < 1e-2
        layer.use_fast_path = False
        reference = layer(x)
        assert layer.last_path == "reference"
        assert mean < 3.5 * _relative_errors(reference, exact)[1]
        layer.use_fast_path = True


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, False), (4, 32, True), (8, None, True)])
def test_kernel_convention_is_exact_in_float32(monkeypatch, bits, group_size, symmetric):
    """Run the kernels in float32 (slow scalar code, so small shapes) to pin down their convention."""
    monkeypatch.setattr(qlinear_module, "_FAST_PATH_DTYPES", (torch.bfloat16, torch.float32))
    w = weights(32, 256, seed=11)
    qw = quantize_weight(w, bits, group_size, symmetric)
    layer = QuantizedLinear.from_quantized(qw, None, scale_dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 5):
        x = torch.randn(tokens, 256, generator=generator)
        fast = layer(x)
        assert layer.last_path == ("int4" if bits == 4 else "int8")
        torch.testing.assert_close(fast, F.linear(x, layer.dequantize_weight()), rtol=1e-5, atol=1e-5)


def test_float32_inputs_use_the_kernel_only_when_asked():
    _, _, layer = make_layer(out_features=64, in_features=256, **INT4_G64)
    x = torch.randn(3, 256)
    exact = layer(x)
    assert layer.last_path == "reference"
    layer.fast_path_casts_fp32_to_bf16 = True
    fast = layer(x)
    assert layer.last_path == "int4" and fast.dtype == torch.float32
    worst, mean = _relative_errors(fast, exact)
    assert worst < 4e-2 and mean < 1e-2


def test_fast_path_falls_back_where_it_does_not_apply():
    x = torch.randn(2, 576).bfloat16()
    cases = [
        dict(bits=4, group_size=128, symmetric=False, fmt="int"),  # 576 % 128 != 0
        dict(bits=4, group_size=None, symmetric=False, fmt="int"),  # per-channel int4
        dict(bits=8, group_size=None, symmetric=False, fmt="int"),  # asymmetric int8
        dict(bits=8, group_size=64, symmetric=True, fmt="int"),  # grouped int8
        dict(bits=3, group_size=64, symmetric=False, fmt="int"),
        dict(bits=4, group_size=64, symmetric=True, fmt="fp4_e2m1"),
    ]
    for case in cases:
        _, _, layer = make_layer(out_features=32, in_features=576, **case)
        layer(x)
        assert layer.last_path == "reference", case
    _, _, odd_rows = make_layer(out_features=40, in_features=576, **INT4_G64)
    odd_rows(x)
    assert odd_rows.last_path == "reference"  # the int4 kernel needs out_features % 16 == 0
    _, _, layer = make_layer(out_features=32, in_features=576, **INT4_G64)
    layer(x.requires_grad_())
    assert layer.last_path == "reference"  # the kernels have no backward
    with torch.no_grad():
        layer(x)
    assert layer.last_path == "int4"
    layer(torch.randn(65, 576).bfloat16())
    assert layer.last_path == "reference"  # long inputs: dequantize + GEMM is faster than the kernel
    layer.fast_path_max_tokens = 128
    layer(torch.randn(65, 576).bfloat16())
    assert layer.last_path == "int4"


def test_kernel_cache_follows_loaded_weights():
    _, _, first = make_layer(out_features=32, in_features=256, seed=1, **INT4_G64)
    _, _, second = make_layer(out_features=32, in_features=256, seed=2, **INT4_G64)
    x = torch.randn(2, 256).bfloat16()
    first(x)  # builds the kernel layout of the first weights
    assert "int4" in {key[0] for key in first._kernel_cache}
    assert not any(k.startswith("_") for k in first.state_dict())
    first.load_state_dict(second.state_dict())
    assert torch.equal(first(x), second(x))
    converted = first.to(torch.float32)  # float buffers are replaced: the layout is rebuilt
    assert converted.scale.dtype == torch.float32 and converted.meta()["scale_dtype"] == "float32"
    assert torch.allclose(converted(x).float(), second(x).float(), rtol=1e-2, atol=1e-2)


def test_timing_fast_vs_reference_vs_float_single_thread():
    """Not an assertion: prints the latency of one (1536 x 576) layer (pytest -s shows it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = weights(1536, 576, seed=0)
        dense = torch.nn.Linear(576, 1536, bias=False)
        dense.weight.data.copy_(w)
        w_bf16 = w.bfloat16()
        layer = QuantizedLinear.from_quantized(quantize_weight(w, 4, 64, symmetric=False), None)
        int8 = QuantizedLinear.from_quantized(quantize_weight(w, 8, None, symmetric=True), None)
        lines = []
        with torch.inference_mode():
            for tokens in (1, 64, 256):
                layer.fast_path_max_tokens = int8.fast_path_max_tokens = tokens  # time the kernels at every length
                x = torch.randn(tokens, 576)
                timings = {
                    "float32 nn.Linear": _median_us(lambda: dense(x)),
                    "int4 g64 fast (bf16)": _median_us(lambda: layer(x.bfloat16())),
                    "int4 g64 fast (fp32 in/out via bf16)": _with_fp32_cast(layer, x),
                    "int8 fast (bf16)": _median_us(lambda: int8(x.bfloat16())),
                    "int4 g64 reference (fp32)": _median_us(lambda: layer._forward_reference(x)),
                    "int4 g64 reference (bf16)": _median_us(lambda: layer._forward_reference(x.bfloat16())),
                    "bfloat16 F.linear": _median_us(lambda: F.linear(x.bfloat16(), w_bf16)),
                }
                lines += [
                    f"  ({tokens:>3}, 576) x (1536, 576)  {name:<38} {us:8.0f} us"
                    for name, us in timings.items()
                ]
        print("\nsingle-thread latency:\n" + "\n".join(lines))
    finally:
        torch.set_num_threads(threads)


def _with_fp32_cast(layer: QuantizedLinear, x: torch.Tensor) -> float:
    layer.fast_path_casts_fp32_to_bf16 = True
    try:
        return _median_us(lambda: layer(x))
    finally:
        layer.fast_path_casts_fp32_to_bf16 = False


def _median_us(function, repeats: int = 15) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e6)
    return sorted(samples)[len(samples) // 2]


@pytest.mark.parametrize(("group_size", "symmetric"), [(64, False), (128, True), (None, False), (100, False)])
def test_vectorised_group_fake_quantization_equals_quantize_weight(group_size, symmetric):
    from slimlm.quant.grid import fake_quantize_groups

    w = torch.randn(48, 576, generator=torch.Generator().manual_seed(0))
    expected = quantize_weight(w, 3, group_size, symmetric).dequantize()
    assert torch.allclose(fake_quantize_groups(w, 3, group_size, symmetric), expected, atol=1e-6)


def test_signed_max_rule_maps_the_largest_magnitude_exactly_to_the_lowest_code():
    """llama.cpp's Q4_0 rule: scale = m / -8 for the value m of largest magnitude, so m is code 0 exactly."""
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25], [3.0, -1.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    scale, zero = find_params(w, 4, True, clip="signed_max")
    torch.testing.assert_close(scale, torch.tensor([0.25, -0.375, -0.125]))
    assert torch.equal(zero, torch.full((3,), 8.0))
    q = quantize_weight(w, 4, None, True, clip="signed_max")
    assert q.codes[0, 1] == 0 and q.codes[1, 0] == 0
    assert q.dequantize()[0, 1] == -2.0 and q.dequantize()[1, 0] == 3.0
    balanced = quantize_weight(torch.randn(64, 256), 4, 32, True)
    signed = quantize_weight(torch.randn(64, 256), 4, 32, True, clip="signed_max")
    assert signed.scale.abs().mean() < balanced.scale.abs().mean()  # a finer step: |m| / 8 against |m| / 7.5
    with pytest.raises(SlimlmError, match="symmetric"):
        find_params(w, 4, False, clip="signed_max")
    with pytest.raises(SlimlmError, match="integer grids"):
        quantize_weight(w, 4, None, True, clip="signed_max", fmt="fp4_e2m1")


def _make_qx_quants(x: list[float], nmax: int, qw: list[float]) -> float:
    """llama.cpp's make_qx_quants (ggml-quants.c, rmse_type 1 with weights qw), one block, in plain Python."""
    peak = max(x, key=lambda v: (abs(v), v > 0))  # ties: slimlm takes the positive value

    def fit(iscale):
        levels = [max(-nmax, min(nmax - 1, round(iscale * v))) for v in x]
        return (sum(w * v * lv for w, v, lv in zip(qw, x, levels)), sum(w * lv * lv for w, lv in zip(qw, levels)))

    sumlx, suml2 = fit(-nmax / peak)
    scale = sumlx / suml2
    best = scale * sumlx
    for step in [k for k in range(-9, 10) if k]:
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale, best = sumlx / suml2, sumlx * sumlx / suml2
    return scale


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_lsq_is_llama_cpps_make_qx_quants(weighted):
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(6, 32, generator=generator, dtype=torch.float64).float()
    a = torch.rand(6, 32, generator=generator) + 0.1 if weighted else None
    scale, zero = find_params(w, 4, True, clip="weighted_lsq", weights=a)
    assert torch.equal(zero, torch.full((6,), 8.0))
    for row in range(6):
        qw = (a[row] if weighted else w[row] * w[row]).tolist()
        assert scale[row].item() == pytest.approx(_make_qx_quants(w[row].tolist(), 8, qw), rel=1e-5)
    # the search includes the signed-max grid's codes, at their least-squares scale: never a larger weighted error
    a = w * w if a is None else a
    signed, _ = find_params(w, 4, True, clip="signed_max")
    codes = torch.clamp(torch.round(w / signed[:, None]), -8, 7)
    lsq_at_those = ((a * w * codes).sum(1) / (a * codes * codes).sum(1))
    error = lambda s, c: (a * (w - s[:, None] * c) ** 2).sum(1)  # noqa: E731
    assert (error(lsq_at_those, codes) <= error(signed, codes) + 1e-6).all()
    with pytest.raises(SlimlmError, match="symmetric"):
        find_params(w, 4, False, clip="weighted_lsq")


def test_gptq_weighted_lsq_uses_the_hessian_diagonal():
    from slimlm.quant.gptq import gptq_quantize

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    hessian = 2 * x.t() @ x / 256
    weight = torch.randn(16, 64, generator=generator)
    plain, _ = gptq_quantize(weight, hessian, bits=4, group_size=32, symmetric=True, clip="signed_max",
                             static_groups=True)
    weighted, _ = gptq_quantize(weight, hessian, bits=4, group_size=32, symmetric=True, clip="weighted_lsq",
                                static_groups=True)
    assert not torch.equal(plain.scale, weighted.scale) and torch.equal(weighted.zero, plain.zero)
    output_error = lambda q: ((x @ (q.dequantize() - weight).t()) ** 2).mean()  # noqa: E731
    assert output_error(weighted) < 1.5 * output_error(plain)
    dynamic, _ = gptq_quantize(weight, hessian, bits=4, group_size=32, symmetric=True, clip="weighted_lsq",
                               act_order=True)  # groups found during the sweep, on permuted columns
    assert dynamic.g_idx is not None and output_error(dynamic) < 1.5 * output_error(plain)
