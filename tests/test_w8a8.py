"""Activation quantizers (slimlm.quant.activation), Int8Linear (slimlm.quant.w8a8) and the W8A8 recipe."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.quant import cpu_kernels
from slimlm.quant.activation import ActivationQuantizer
from slimlm.quant.grid import find_params, quantize, quantize_signed, range_params
from slimlm.quant.w8a8 import Int8Linear

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
GRIDS = [("per_token", True), ("per_token", False), ("per_tensor", True), ("per_tensor", False)]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def activations(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """LLM-like inputs: a shifted Gaussian with a few outlier channels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator) + 0.2
    x[:, :3] *= 20
    return x


def layer(granularity: str, symmetric: bool, bits: int = 8, bias: bool = True, in_features: int = 96,
          out_features: int = 80) -> tuple[torch.nn.Linear, Int8Linear]:
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    int8 = Int8Linear.from_float(linear.weight, linear.bias, bits, granularity, symmetric)
    if granularity == "per_tensor":
        int8.input_quantizer.observe(activations(64, in_features, seed=7))
    return linear, int8


def both_paths(int8: Int8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        int8.use_int8_kernel = True
        fast = int8(x)
        assert int8.last_path.startswith("int8")  # "int8-native" for few rows
        int8.use_int8_kernel = False
        reference = int8(x)
        assert int8.last_path == "reference"
        int8.use_int8_kernel = True
    return fast, reference


def assert_paths_agree(fast: torch.Tensor, reference: torch.Tensor) -> None:
    # The same integers on both paths: only float32 rounding of the reference's accumulation differs.
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


# ------------------------------------------------------------------------------------------------
# Grid reuse and activation quantizers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_range_params_and_signed_codes_are_the_weight_grid(bits, symmetric):
    x = activations(16, 40)
    x[3] = 0.0  # an all-zero token: the reference's [-1, 1] widening
    scale, zero = find_params(x, bits, symmetric)
    scale_r, zero_r = range_params(x.amin(dim=1), x.amax(dim=1), bits, symmetric)
    assert torch.equal(scale, scale_r) and torch.equal(zero, zero_r)
    signed = quantize_signed(x, scale[:, None], zero[:, None], bits)
    assert signed.dtype == torch.int8
    assert torch.equal(signed.int(), quantize(x, scale, zero, bits).int() - 2 ** (bits - 1))
    quantizer = ActivationQuantizer(bits, "per_token", symmetric)
    codes, scale_q, zero_q = quantizer.quantize(x)
    assert torch.equal(codes, signed) and torch.equal(scale_q[:, 0], scale)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_ranges_are_independent_and_within_half_a_step(symmetric):
    x = activations(8, 64)
    quantizer = ActivationQuantizer(8, "per_token", symmetric)
    approx = quantizer.fake_quantize(x)
    scale, _ = quantizer.params(x)
    # The top of a symmetric range lands at 127.5 steps and is clipped to 127: exactly half a step.
    assert torch.all((approx - x).abs() <= scale / 2 * (1 + 1e-4))
    spiked = x.clone()
    spiked[0] *= 1000  # an outlier token changes its own grid only
    assert torch.equal(quantizer.fake_quantize(spiked)[1:], approx[1:])
    assert torch.equal(quantizer.fake_quantize(x.reshape(2, 4, 64)), approx.reshape(2, 4, 64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_range_is_the_calibration_min_max_and_clips_beyond_it(symmetric):
    quantizer = ActivationQuantizer(8, "per_tensor", symmetric)
    assert not quantizer.calibrated
    with pytest.raises(SlimlmError, match="no calibration range"):
        quantizer.fake_quantize(torch.randn(2, 8))
    batches = [activations(8, 32, seed) for seed in range(3)]
    for batch in batches:
        quantizer.observe(batch.reshape(2, 4, 32))
    everything = torch.cat(batches)
    assert quantizer.observed_min == everything.min() and quantizer.observed_max == everything.max()
    scale, zero = quantizer.params(everything)
    assert scale.dim() == 0 and zero.dim() == 0
    expected_scale, expected_zero = find_params(everything.reshape(1, -1), 8, symmetric)
    assert torch.equal(scale, expected_scale[0]) and torch.equal(zero, expected_zero[0])
    beyond = quantizer.fake_quantize(torch.full((1, 32), 10 * float(everything.abs().max())))
    assert float(beyond.max()) <= float(everything.abs().max()) * (1 + 2 / 255) + float(scale)


def test_bad_activation_settings_name_the_problem():
    for bits in (1, 9, 8.0, True):
        with pytest.raises(SlimlmError, match="activation bits must be an integer from 2 to 8"):
            ActivationQuantizer(bits)
    with pytest.raises(SlimlmError, match="unknown activation granularity 'per_channel'"):
        ActivationQuantizer(8, "per_channel")
    with pytest.raises(SlimlmError, match="only per_tensor observes"):
        ActivationQuantizer(8, "per_token").observe(torch.randn(2, 4))
    bad = torch.randn(2, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match="NaN"):
        ActivationQuantizer(8, "per_tensor").observe(bad)
    with pytest.raises(SlimlmError, match="activation bits"):
        Int8Linear(8, 8, activation_bits=12)


# ------------------------------------------------------------------------------------------------
# Int8Linear: integer GEMM against the exact fake-quant reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,symmetric", GRIDS)
@pytest.mark.parametrize("shape", [(37, 96), (3, 11, 96), (1, 96)])
def test_int8_gemm_matches_the_fake_quant_reference(granularity, symmetric, shape):
    linear, int8 = layer(granularity, symmetric)
    x = activations(int(torch.tensor(shape[:-1]).prod()), 96, seed=3).reshape(shape)
    fast, reference = both_paths(int8, x)
    assert fast.shape == reference.shape == (*shape[:-1], 80)
    assert_paths_agree(fast, reference)
    with torch.no_grad():  # and W8A8 stays close to the float layer; one range for all tokens suffers
        exact = linear(x)  # more from the outlier channels (SmoothQuant's observation)
    assert float((fast - exact).norm() / exact.norm()) < (0.02 if granularity == "per_token" else 0.08)


@pytest.mark.parametrize("granularity,symmetric", GRIDS)
def test_int8_gemm_sums_are_exact_integers(granularity, symmetric):
    """The int8 path equals s_x s_w (p q^T - z rowsum(q)) computed in float64 up to one float32 rounding."""
    _, int8 = layer(granularity, symmetric, bias=False)
    x = activations(20, 96, seed=4)
    codes, scale, zero = int8.input_quantizer.quantize(x)
    q = int8.weight.double()
    exact = (codes.double() - zero.double()) @ q.T * scale.double() * int8.weight_scale.double()
    with torch.no_grad():
        fast = int8(x)
    torch.testing.assert_close(fast.double(), exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_lower_activation_bits_use_the_same_gemm(bits):
    _, int8 = layer("per_token", False, bits=bits)
    codes, _, _ = int8.input_quantizer.quantize(activations(5, 96))
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert_paths_agree(*both_paths(int8, activations(9, 96, seed=5)))


def test_paths_agree_on_a_tiny_models_activations():
    model = tiny_model("llama")
    inputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0]))
             for name, module in model.named_modules() if name.endswith(("q_proj", "o_proj", "down_proj"))]
    with torch.no_grad():
        model(PROBE)
    for hook in hooks:
        hook.remove()
    assert len(inputs) == 6
    for name, x in inputs.items():
        linear = model.get_submodule(name)
        for granularity, symmetric in GRIDS:
            int8 = Int8Linear.from_float(linear.weight, linear.bias, 8, granularity, symmetric)
            if granularity == "per_tensor":
                int8.input_quantizer.observe(x)
            assert x.dim() == 3
            assert_paths_agree(*both_paths(int8, x))


def test_autograd_and_bfloat16_inputs():
    _, int8 = layer("per_token", True)
    x = activations(6, 96).requires_grad_()
    y = int8(x)
    assert int8.last_path == "reference" and y.requires_grad  # the integer GEMM has no backward
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        half = int8(activations(6, 96).bfloat16())
    assert int8.last_path == ("int8-native" if cpu_kernels.load() is not None else "int8")  # 6 rows: few-row kernel
    assert half.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Recipe, engine, save / load, CLI
# ------------------------------------------------------------------------------------------------


def test_w8a8_recipes_fail_before_any_work():
    model = tiny_model("llama")
    cases = [
        ({"stages": [{"method": "gptq", "activations": {"bits": 8}}]}, "a setting of the rtn, smoothquant"),
        ({"stages": [{"method": "awq", "activations": {}}]}, "a setting of the rtn, smoothquant"),
        ({"stages": [{"method": "rtn", "activations": {"outlier_threshold": 6.0}}]},
         "needs bits: 8, group_size: channel, symmetric: true"),
        ({"stages": [{"method": "rtn", "bits": 4, "group_size": "channel", "activations": {"fmt": "fp8_e4m3", "bits": 4}}]},
         "fp8_e4m3 activations have 8 bits"),
        ({"stages": [{"method": "rtn", "bits": 4, "fmt": "fp8_e4m3", "symmetric": True}]}, "stores 8 bits"),
        ({"stages": [{"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True,
                      "activations": {"bits": 9}}]}, "activation bits must be between 2 and 8"),
        ({"stages": [{"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True,
                      "activations": {"granularity": "per_channel"}}]}, "per_token"),
        ({"stages": [{"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True,
                      "activations": {"bitz": 8}}]}, "valid keys: bits, fmt, granularity, outlier_threshold, symmetric"),
    ]
    for data, message in cases:
        with pytest.raises(SlimlmError, match=message):
            compress(model, data)
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(model, "rtn-w8a8-static")
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


@pytest.mark.parametrize("preset", ["rtn-w8a8", "rtn-w8a8-static"])
def test_w8a8_presets_replace_the_block_linears(preset, tmp_path):
    model, reference = tiny_model("llama"), tiny_model("llama")
    recipe = load_recipe(preset)
    assert recipe.stages[0].activations.bits == 8 and preset in PRESETS
    report = compress(model, recipe, calibration=CALIBRATION if recipe.needs_calibration else None)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == len(report.layers) == 14
    assert all(m.input_quantizer.calibrated for m in int8)
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert {m.last_path for m in int8} == {"int8"}
    assert 0 < float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())
    # save / load: bitwise the same outputs, the grid recorded in slimlm.json
    save(model, tmp_path / "w8a8")
    section = json.loads((tmp_path / "w8a8" / "slimlm.json").read_text())
    meta = section["compressed_modules"]["model.layers.0.self_attn.q_proj"]
    assert meta["kind"] == "int8" and meta["activations"]["granularity"] == recipe.stages[0].activations.granularity
    reloaded, _ = load(tmp_path / "w8a8")
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            again = reloaded.get_submodule(name)
            assert isinstance(again, Int8Linear)
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, again.state_dict()[key]) and tensor.dtype == again.state_dict()[key].dtype
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE).logits, logits)


def test_cli_compress_rtn_w8a8_end_to_end(tmp_path, capsys):
    from slimlm.cli import main

    source, out = tmp_path / "float", tmp_path / "w8a8"
    tiny_model("qwen2").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)  # a model folder without one is refused (tests/test_bad_inputs.py)
    assert main(["compress", "--model", str(source), "--recipe", "rtn-w8a8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "disk_bytes_after" in printed
    section = json.loads((out / "slimlm.json").read_text())
    assert len(section["compressed_modules"]) == 14 and section["recipe"]["stages"][0]["activations"]["bits"] == 8
    model, _ = load(out)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.isfinite(model(PROBE).logits).all()


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt2"])
def test_w8a8_on_families_with_biases_and_conv1d(family):
    from slimlm.eval.efficiency import count_parameters

    model, reference = tiny_model(family), tiny_model(family)
    compress(model, "rtn-w8a8")
    assert any(isinstance(m, Int8Linear) and m.bias is not None for m in model.modules())
    assert count_parameters(model) == count_parameters(reference)  # logical parameters
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert 0 < float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())


def test_export_and_metadata_refusals():
    from slimlm.export.compressed_tensors import check_recipe_exportable

    with pytest.raises(SlimlmError, match="W8A8"):
        check_recipe_exportable(load_recipe("rtn-w8a8"), {}, [set()])
    meta = Int8Linear(8, 4).meta()
    with pytest.raises(SlimlmError, match="version"):
        Int8Linear.empty({**meta, "version": 99})
    with pytest.raises(SlimlmError, match="lacks 'activations'"):
        Int8Linear.empty({k: v for k, v in meta.items() if k != "activations"})


# ------------------------------------------------------------------------------------------------
# Simulated weight + activation quantization (QuantizedLinear with an input quantizer), FP8
# ------------------------------------------------------------------------------------------------


def test_simulated_layer_is_fake_quantized_inputs_times_dequantized_weights():
    from slimlm.quant.grid import quantize_weight
    from slimlm.quant.qlinear import QuantizedLinear

    linear = torch.nn.Linear(96, 80)
    qw = quantize_weight(linear.weight.detach(), 4, None, False, granularity="channel")
    shift = torch.randn(96)
    layer = QuantizedLinear.from_quantized(qw, linear.bias).quantize_inputs(
        ActivationQuantizer(4, "per_token", False), input_shift=shift)
    x = activations(10, 96)
    rows = x - shift
    scale, zero = range_params(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), 4, False)
    expected = torch.nn.functional.linear((quantize(rows, scale, zero, 4).float() - zero) * scale,
                                          layer.dequantize_weight(), linear.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.last_path == "simulated"
    assert len(set(layer.quantized_input(x)[0].tolist())) <= 16  # 4-bit inputs: at most 16 values per token


def test_fp8_activations_round_to_e4m3_values():
    quantizer = ActivationQuantizer(8, "per_token", True, "fp8_e4m3")
    x = activations(16, 64)
    fake = quantizer.fake_quantize(x)
    scale = x.abs().amax(1, keepdim=True) / 448.0
    on_grid = fake / scale
    torch.testing.assert_close(on_grid, on_grid.to(torch.float8_e4m3fn).float())  # representable exactly
    assert float(((fake - x).abs() / x.abs().clamp(min=1e-3 * float(x.abs().max()))).max()) <= 2 ** -4 + 1e-6
    with pytest.raises(SlimlmError, match="no integer codes"):
        quantizer.quantize(x)
    with pytest.raises(SlimlmError, match="symmetric"):
        ActivationQuantizer(8, "per_token", False, "fp8_e4m3")


@pytest.mark.parametrize("preset", ["rtn-w4a8", "rtn-w6a6", "rtn-w4a4", "smoothquant-w4a4", "fp8-w8a8",
                                    "fp8-w8a8-static"])
def test_simulated_presets_save_and_reload(preset, tmp_path):
    from slimlm.quant.qlinear import QuantizedLinear

    model, reference = tiny_model("llama"), tiny_model("llama")
    recipe = load_recipe(preset)
    compress(model, recipe, calibration=CALIBRATION)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.input_quantizer is not None for m in layers)
    with torch.no_grad():
        logits = model(PROBE).logits
        error = float((logits - reference(PROBE).logits).abs().mean())
        assert 0 < error < float(reference(PROBE).logits.abs().mean())
        save(model, tmp_path / "m")
        reloaded, _ = load(tmp_path / "m")
        torch.testing.assert_close(reloaded(PROBE).logits, logits, rtol=0, atol=0)
        reloaded.to(torch.bfloat16)
        reloaded(PROBE)  # a lower-precision model still runs (the grids compute in float32)


def test_lower_activation_bits_cost_more():
    errors = {}
    for preset in ("rtn-w6a6", "rtn-w4a4"):
        model, reference = tiny_model("llama"), tiny_model("llama")
        compress(model, preset)
        with torch.no_grad():
            errors[preset] = float((model(PROBE).logits - reference(PROBE).logits).pow(2).mean())
    assert errors["rtn-w6a6"] < errors["rtn-w4a4"]
