"""slimlm's compiled CPU decode kernels: each held to its PyTorch reference, and their use in decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm.infer import generate_ids
from slimlm.infer.cache import ContiguousCache
from slimlm.infer.runner import ModelRunner
from slimlm.models.tiny import tiny_model
from slimlm.quant import cpu_kernels, kernels
from slimlm.quant.grid import quantize_weight
from slimlm.quant.kernels import decode_kernels
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.w8a8 import Int8Linear

pytestmark = pytest.mark.usefixtures("one_thread")
needs_native = pytest.mark.skipif(cpu_kernels.load() is None,
                                  reason=f"slimlm's CPU kernels did not build here: {cpu_kernels.load_error()}")


@pytest.fixture
def native_mode(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "native")
    kernels.kernel_choice.cache_clear()
    yield kernels.kernel_choice()
    kernels.kernel_choice.cache_clear()


def operands(out_features: int, in_features: int, bits: int, group: int | None, seed: int = 0, act_order=False):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    column_group = (torch.zeros(in_features, dtype=torch.long) if group is None
                    else torch.arange(in_features) // group)
    if act_order:
        column_group = column_group[torch.randperm(in_features, generator=generator)]
    groups = int(column_group.max()) + 1
    scale = torch.rand(out_features, groups, generator=generator) / 10 + 1e-3
    zero = torch.randint(0, 2 ** bits, (out_features, groups), generator=generator).float()
    weight = scale[:, column_group] * (codes.float() - zero[:, column_group])
    return cpu_kernels.lowbit_operands(codes, scale, zero, bits, column_group), weight


@needs_native
@pytest.mark.parametrize(("bits", "group", "in_features"), [
    (4, 64, 576),  # pairs of blocks in one group: the 512-bit kernels where the CPU has them
    (4, 32, 576),  # a group per block: the 256-bit kernels
    (4, 128, 576),  # a shorter last group (576 = 4 x 128 + 64)
    (4, None, 96),  # per channel, an odd number of blocks
    (3, 64, 192), (2, 32, 128),  # fewer bits, held in nibbles
    (8, None, 576), (8, 64, 160), (8, 32, 96),
])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9])
def test_lowbit_kernel_matches_its_reference_and_the_float_product(bits, group, in_features, rows):
    ops, weight = operands(72, in_features, bits, group)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    y = cpu_kernels.lowbit_matmul(x, ops)
    reference = cpu_kernels.reference_lowbit_matmul(x, ops)
    assert y.shape == (rows, 72) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())
    exact = x @ weight.t()  # int8 activations per block of 32: about 0.5% relative error
    assert (y - exact).norm() < 0.02 * exact.norm()


@needs_native
def test_act_order_groups_run_through_a_permutation():
    ops, weight = operands(48, 256, 4, 64, act_order=True)
    assert ops.permutation is not None
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    y = cpu_kernels.lowbit_matmul(x, ops)
    torch.testing.assert_close(y, cpu_kernels.reference_lowbit_matmul(x, ops), rtol=1e-5, atol=1e-4)
    assert (y - x @ weight.t()).norm() < 0.02 * (x @ weight.t()).norm()


@needs_native
def test_the_avx2_build_matches_the_reference_too():
    """Machines with AVX2 only get the maddubs kernels: built here with -march=haswell and held to the reference."""
    if "avx2" not in kernels.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    avx2 = cpu_kernels.build(["-O3", "-march=haswell", "-fno-math-errno", "-fopenmp-simd"])
    assert avx2.isa() == "avx2"
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    for bits, group in [(4, 64), (4, 32), (8, None), (8, 64)]:
        ops, weight = operands(40, 576, bits, group)
        y = cpu_kernels.lowbit_matmul(x, ops, module=avx2)
        torch.testing.assert_close(y, cpu_kernels.reference_lowbit_matmul(x, ops), rtol=1e-5, atol=1e-3)
    codes = torch.randint(-128, 128, (30, 200), dtype=torch.int8)
    x8 = torch.randint(-128, 128, (3, 200), dtype=torch.int8)
    assert torch.equal(cpu_kernels.s8_few_rows(x8, codes, module=avx2), x8.int() @ codes.int().t())
    weight = torch.randn(30, 577)
    x = torch.randn(3, 577)
    torch.testing.assert_close(cpu_kernels.f32_few_rows(x, weight, module=avx2), x @ weight.t(), rtol=1e-5, atol=1e-4)
    _decode_ops_match_torch(avx2)
    layer = Int8Linear.from_float(torch.randn(40, 200))
    x = torch.randn(3, 200)
    expected = layer._product(x, int8=False)
    assert torch.equal(cpu_kernels.native_matmul_many(x, [layer.native_operands()], module=avx2),
                       _int8_path_without_native(layer, x))
    torch.testing.assert_close(cpu_kernels.native_matmul_many(x, [layer.native_operands()], module=avx2), expected,
                               rtol=1e-5, atol=1e-4)


def _int8_path_without_native(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """Int8Linear's int8 path through PyTorch operations (quantize, integer product, rescale), bypassing the
    compiled whole-product kernel."""
    codes, scale, _ = layer.input_quantizer.quantize(x)
    return (codes.int() @ layer.weight.int().t()).float().mul_(scale).mul_(layer.weight_scale.float())


@needs_native
@pytest.mark.parametrize(("granularity", "bits"), [("per_token", 8), ("per_token", 5), ("per_tensor", 8)])
def test_w8a8_kernel_is_bitwise_the_int8_layer(granularity, bits):
    """The one-call W8A8 kernel (activation quantization, integer sums, rescale) gives bitwise the PyTorch
    operations of Int8Linear's int8 path, extremes, an all-zero row and ties included, fused or not."""
    generator = torch.Generator().manual_seed(bits)
    layers = [Int8Linear.from_float(torch.randn(n, 192, generator=generator), activation_bits=bits,
                                    granularity=granularity) for n in (48, 16, 16)]
    x = torch.randn(7, 192, generator=generator) * 4
    x[1] = 0.0  # an all-zero row: the reference widens its range to [-1, 1]
    x[2, :8] = torch.tensor([0.5, -0.5, 1.5, -2.5, 1e-8, -1e-8, 30.0, -30.0])
    if granularity == "per_tensor":  # calibrated ranges smaller than x (codes clamp); the last layer's differs
        for layer, factor in zip(layers, (0.5, 0.5, 0.7)):
            layer.input_quantizer.observe(x[3:] * factor)
    parts = [layer.native_operands() for layer in layers]
    assert cpu_kernels.fusable(parts[:2]) and cpu_kernels.fusable(parts) == (granularity == "per_token")
    for rows in (1, 2, 7):
        for layer, part in zip(layers, parts):
            expected = _int8_path_without_native(layer, x[:rows])
            assert torch.equal(cpu_kernels.native_matmul_many(x[:rows], [part]), expected)
        fused = cpu_kernels.native_matmul_many(x[:rows], parts[:2])
        assert torch.equal(fused, torch.cat([_int8_path_without_native(lay, x[:rows]) for lay in layers[:2]], -1))


@needs_native
def test_w8a8_layer_forward_takes_the_whole_product_kernel():
    layer = Int8Linear.from_float(torch.randn(40, 96), torch.randn(40))
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        y = layer(x)
    assert layer.last_path == "int8-native"
    expected = _int8_path_without_native(layer, x.reshape(6, 96)) + layer.bias
    assert torch.equal(y, expected.reshape(2, 3, 40))
    asymmetric = Int8Linear.from_float(torch.randn(40, 96), activation_symmetric=False)
    assert asymmetric.native_operands() is None  # the integer-sums kernel, the zero point in PyTorch


@needs_native
@pytest.mark.parametrize("in_features", [64, 96, 576, 100])
def test_int8_few_row_kernel_gives_the_exact_integers(in_features):
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randint(-128, 128, (70, in_features), generator=generator, dtype=torch.int8)
    for rows in (1, 2, 3, 4, 7):
        x = torch.randint(-128, 128, (rows, in_features), generator=generator, dtype=torch.int8)
        x[0, :5] = -128  # the extremes of both operands
        weight[:3, :5] = -128
        assert torch.equal(cpu_kernels.s8_few_rows(x, weight), x.int() @ weight.int().t())


def test_grids_the_kernels_cannot_express_get_no_operands():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    ones = torch.ones(8, 4)
    assert cpu_kernels.lowbit_operands(codes, ones, ones, 4, torch.arange(64) // 16) is None  # group of 16
    assert cpu_kernels.lowbit_operands(torch.zeros(8, 48, dtype=torch.uint8), ones[:, :1], ones[:, :1], 4,
                                       torch.zeros(48, dtype=torch.long)) is None  # 48 columns: not whole blocks


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8, 9])
def test_float32_few_row_kernel_matches_f_linear(rows):
    generator = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 77, generator=generator), torch.randn(50, 77, generator=generator)
    bias = torch.randn(50, generator=generator)
    torch.testing.assert_close(cpu_kernels.f32_few_rows(x, weight, bias), F.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


@needs_native
def test_quantized_linear_takes_the_native_path_when_decoding(native_mode):
    assert native_mode.path == "native" and native_mode.native_isa in native_mode.label
    layer = QuantizedLinear.from_quantized(quantize_weight(torch.randn(96, 128), bits=4, group_size=32,
                                                           symmetric=False), bias=torch.randn(96))
    x = torch.randn(1, 3, 128)
    exact = layer(x)
    assert layer.last_path == "reference"  # outside generation: exact
    with decode_kernels():
        fast = layer(x)
    assert layer.last_path == "native4" and fast.shape == exact.shape
    assert 0 < (fast - exact).norm() < 0.02 * exact.norm()


@needs_native
def test_generation_decodes_through_the_native_kernels(native_mode):
    model = tiny_model("llama")
    stages = [{"method": "quantize_head", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 32}]
    slimlm.compress(model, {"stages": stages, "float_storage": "float32"})
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = ModelRunner(model).forward(ids, [16], _cache(model), all_logits=True)
        paths = {m.last_path for m in model.modules() if isinstance(m, QuantizedLinear)}
        exact = ModelRunner(model, fast_kernels=False).forward(ids, [16], _cache(model), all_logits=True)
    assert paths == {"native4", "native8"}  # body at 4 bits, head at 8
    kl = F.kl_div(fast.log_softmax(-1), exact.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < kl < 1e-2
    result = generate_ids(model, [ids[0, :6].tolist()], 5)
    assert len(result.tokens[0]) == 5


def _cache(model):
    return ContiguousCache(ModelRunner(model).cache_shape(), batch=1, capacity=64)


def test_a_failed_build_leaves_the_other_paths(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.load.__wrapped__() is None and cpu_kernels.load_error()
    monkeypatch.setenv("SLIMLM_NATIVE_KERNELS", "0")
    assert cpu_kernels.load.__wrapped__() is None and cpu_kernels.load_error() == "SLIMLM_NATIVE_KERNELS=0"


def test_forcing_native_without_the_extension_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "isa", lambda: "")
    monkeypatch.setattr(cpu_kernels, "load_error", lambda: "no compiler")
    monkeypatch.setenv(kernels.ENV, "native")
    kernels.kernel_choice.cache_clear()
    try:
        choice = kernels.kernel_choice()
        assert choice.path in ("bf16", "reference") and "no compiler" in choice.reason
    finally:
        kernels.kernel_choice.cache_clear()


@pytest.mark.parametrize("mode", ["native", "reference"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_runner_float32_few_token_paths_match_the_modules(mode, family, monkeypatch):
    """Generation computes float32 linears over 1-8 tokens with the native few-row kernel (native mode) or
    `small_gemm` (otherwise), and RMSNorm inline: the same function as the modules, up to float32 rounding."""
    monkeypatch.setenv(kernels.ENV, mode)
    kernels.kernel_choice.cache_clear()
    try:
        model = tiny_model(family)
        ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
        fast_runner, exact_runner = ModelRunner(model), ModelRunner(model, fast_kernels=False)
        fast_cache, exact_cache = _cache(model), _cache(model)
        with torch.no_grad():
            for start, end in [(0, 12), (12, 13), (13, 16), (16, 20)]:  # a prefill, then 1, 3 and 4 tokens
                chunk = ids[:, start:end]
                fast = fast_runner.forward(chunk, [end - start], fast_cache, all_logits=True)
                exact = exact_runner.forward(chunk, [end - start], exact_cache, all_logits=True)
                torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)
            assert torch.allclose(exact, model(ids).logits[:, 16:], atol=1e-4)
    finally:
        kernels.kernel_choice.cache_clear()


def _decode_ops_match_torch(ops):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 96, generator=generator), torch.randn(96, generator=generator)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)
    rows, angles = torch.randn(5, 16, generator=generator), torch.rand(8, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    rotated = rows * cos + torch.cat([-rows[:, 8:], rows[:, :8]], dim=-1) * sin  # rotate_half
    torch.testing.assert_close(ops.rope_rows(rows, cos, sin), rotated, rtol=1e-5, atol=1e-5)
    cache = torch.randn(2, 2, 40, 16, generator=generator)  # keys, values in a larger buffer: strided views
    keys, values, query = cache[0, :, :33], cache[1, :, :33], torch.randn(6, 16, generator=generator)
    expected = F.scaled_dot_product_attention(query.view(1, 6, 1, 16), keys[None], values[None], scale=0.25,
                                              enable_gqa=True).view(6, 16)
    torch.testing.assert_close(ops.single_query_attention(query, keys, values, 0.25), expected, rtol=1e-5, atol=1e-5)
    gate, up = torch.randn(1, 1, 70, generator=generator), torch.randn(1, 1, 70, generator=generator)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@needs_native
def test_decode_step_float_ops_match_torch():
    _decode_ops_match_torch(cpu_kernels.load())


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_is_computed_the_same_whatever_the_rows_beside_it(bits):
    """Speculative verification relies on it: row t of a k-row call equals a one-row call on row t, bitwise."""
    ops, _ = operands(64, 576, bits, 64 if bits == 4 else None)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(1))
    together = cpu_kernels.lowbit_matmul(x, ops)
    assert all(torch.equal(together[t], cpu_kernels.lowbit_matmul(x[t:t + 1], ops)[0]) for t in range(9))
    weight = torch.randn(64, 576)
    together = cpu_kernels.f32_few_rows(x[:8], weight)
    assert all(torch.equal(together[t], cpu_kernels.f32_few_rows(x[t:t + 1], weight)[0]) for t in range(8))


@needs_native
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_runner_runs_w8a8_layers_through_the_fused_kernel(family):
    """W8A8 decoding: q/k/v and gate/up each one kernel call on the shared input, the logits those of the modules'
    own forward up to float32 rounding (which can move an activation across a rounding boundary: one code)."""
    model = tiny_model(family)
    slimlm.compress(model, "rtn-w8a8")
    runner, exact_runner = ModelRunner(model), ModelRunner(model, fast_kernels=False, small_gemm=False)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    fast_cache, exact_cache = _cache(model), _cache(model)
    with torch.no_grad():
        runner.forward(ids[:, :8], [8], fast_cache)
        exact_runner.forward(ids[:, :8], [8], exact_cache)
        fast = runner.forward(ids[:, 8:], [1], fast_cache)
        exact = exact_runner.forward(ids[:, 8:], [1], exact_cache)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.last_path == "int8-native" and model.model.layers[0].mlp.up_proj.last_path == "int8-native"
    assert len(runner._fused) >= 2 and all(runner._fused.values())
    torch.testing.assert_close(fast, exact, rtol=1e-3, atol=1e-3)


@needs_native
@pytest.mark.parametrize("quantized", [False, True])
def test_native_verification_rows_are_bitwise_single_steps(quantized, native_mode):
    """With `exact_rows` each row runs the one-token step's native calls: verifying k tokens gives bitwise the
    logits of k single-token steps (so greedy speculative decoding reproduces plain greedy decoding)."""
    model = tiny_model("qwen2")
    if quantized:
        stages = [{"method": "quantize_head", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 32}]
        slimlm.compress(model, {"stages": stages, "float_storage": "float32"})
    runner = ModelRunner(model)
    prompt, block = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2)), [9, 8, 7, 6, 5]
    batch_cache, step_cache = _cache(model), _cache(model)
    for cache in (batch_cache, step_cache):
        runner.forward(prompt, [10], cache)
    verified = runner.forward(torch.tensor([block]), [5], batch_cache, all_logits=True, exact_rows=True)[0]
    steps = torch.stack([runner.forward(torch.tensor([[t]]), [1], step_cache)[0] for t in block])
    assert torch.equal(verified, steps)


@needs_native
def test_float_weights_held_as_bfloat16_numbers_are_read_from_a_bfloat16_twin():
    """A weight whose values are all bfloat16 numbers (bfloat16 float_storage) is read as bfloat16 by the few-row
    kernel, bitwise the float32 result; any other weight, or one changed in place since, is read as it is."""
    from slimlm.infer.runner import bfloat16_twin, few_row_linear

    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(96, 577, generator=generator).bfloat16().float()
    x = torch.randn(3, 577, generator=generator)
    twin = bfloat16_twin(exact)
    assert twin.dtype == torch.bfloat16 and bfloat16_twin(exact) is twin  # made once
    assert torch.equal(few_row_linear(x, exact, None, native=True), cpu_kernels.f32_few_rows(x, exact))
    assert torch.equal(cpu_kernels.f32_few_rows(x, twin), cpu_kernels.f32_few_rows(x, exact))
    exact[0, 0] += 1e-3  # no longer a bfloat16 number: the float32 weight again
    assert bfloat16_twin(exact) is exact
    plain = torch.randn(8, 64, generator=generator)
    assert bfloat16_twin(plain) is plain


@pytest.mark.parametrize("out_features", [1229, 1228, 3])
@pytest.mark.parametrize("rows", [1, 3])
def test_small_gemm_equals_linear_for_odd_and_even_heights(out_features, rows):
    """Pruned widths are often odd (FLAP keeps 1229 of 1536 MLP channels): one row still takes the split product."""
    from slimlm.infer.runner import small_gemm

    torch.manual_seed(0)
    weight, bias, x = torch.randn(out_features, 64), torch.randn(out_features), torch.randn(1, rows, 64)
    assert torch.allclose(small_gemm(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
