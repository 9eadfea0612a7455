"""LLM-FP4 (slimlm.quant.llm_fp4): FP4 formats, format / max-value search, pre-shifted exponent bias."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.tiny import tiny_model
from slimlm.quant.grid import FP4_MAGNITUDES, check_format, fp_decode, fp_encode, fp_max, quantize_weight
from slimlm.quant.llm_fp4 import (
    FP4Choice,
    build_layer,
    fold_preshift,
    fp4_round,
    output_error,
    preshift_exponents,
    search_linear,
)
from slimlm.quant.qlinear import QuantizedLinear

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
OUTLIERS = {"input_layernorm": [3, 17], "post_attention_layernorm": [5, 40]}
RTN_FP4 = {"stages": [{"method": "rtn", "bits": 4, "fmt": "fp4_e2m1", "symmetric": True, "group_size": "channel",
                       "activations": {"bits": 4, "fmt": "fp4_e2m1", "granularity": "per_tensor"}}]}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def planted(family: str = "llama", factor: float = 40.0):
    """A tiny model whose norms emit a few outlier channels (large inter-channel variance)."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in OUTLIERS:
                module.weight[OUTLIERS[name.rpartition(".")[2]]] *= factor
    return model


def outlier_inputs(tokens: int = 128, features: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator)
    x[:, :4] *= torch.tensor([30.0, 8.0, 0.1, 3.0])  # channel ranges spanning several binades
    return x


# ------------------------------------------------------------------------------------------------
# The 4-bit FP grids
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"])
def test_fp4_formats_round_to_their_nearest_value(fmt):
    magnitudes = torch.tensor(FP4_MAGNITUDES[fmt])
    values = torch.cat([magnitudes, -magnitudes])
    assert torch.equal(fp_decode(fp_encode(values, fmt), fmt), values)  # every grid value is exact
    x = torch.linspace(-1.5 * fp_max(fmt), 1.5 * fp_max(fmt), 1001)
    approx = fp_decode(fp_encode(x, fmt), fmt)
    nearest = values[(x[:, None] - values[None, :]).abs().argmin(dim=1)]
    assert torch.allclose((approx - x.clamp(-fp_max(fmt), fp_max(fmt))).abs(),
                          (nearest - x.clamp(-fp_max(fmt), fp_max(fmt))).abs())
    assert fp_encode(values, fmt).max() < 16  # 4-bit codes
    q = quantize_weight(torch.randn(8, 32), 4, None, True, granularity="channel", fmt=fmt)
    assert torch.equal(QuantizedLinear.from_quantized(q, scale_dtype=torch.float32).dequantize_weight(), q.dequantize())
    with pytest.raises(SlimlmError, match="stores 4 bits"):
        check_format(8, fmt)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"])
def test_the_searchs_fast_rounding_matches_the_stored_codes(fmt):
    v = torch.randn(64, 300) * fp_max(fmt) * torch.logspace(-3, 0.5, 300)[None, :]  # subnormals to clipping
    assert torch.equal(fp4_round(v, fmt), fp_decode(fp_encode(v, fmt), fmt))


def test_e1m2_is_uniform_and_e3m0_is_powers_of_two():
    assert FP4_MAGNITUDES["fp4_e1m2"] == tuple(i / 4 for i in range(8))
    assert FP4_MAGNITUDES["fp4_e3m0"][1:] == tuple(2.0 ** k for k in range(-3, 4))
    assert (fp_max("fp4_e1m2"), fp_max("fp4_e2m1"), fp_max("fp4_e3m0")) == (1.75, 6.0, 8.0)


# ------------------------------------------------------------------------------------------------
# Pre-shifted exponent bias
# ------------------------------------------------------------------------------------------------


def test_preshift_is_exact_in_float():
    x, weight = outlier_inputs(), torch.randn(48, 64)
    rho = preshift_exponents(x.abs().amax(dim=0), float(x.abs().max()), "fp4_e2m1", max_shift=12)
    assert rho.dtype == torch.long and int(rho.min()) < -3  # the small channels are lifted
    shifted, factor = fold_preshift(weight, rho)
    assert torch.equal(factor, torch.pow(2.0, rho.float()))
    assert torch.equal(shifted * (1 / factor)[None, :], weight)  # powers of two: no rounding
    assert torch.equal(F.linear(x / factor, shifted), F.linear(x, weight))


def test_preshift_exponents_are_clamped_integers():
    tensor_max = 10.0
    channel_max = tensor_max * torch.tensor([1.0, 0.5, 0.25, 0.125, 2.0 ** -5, 0.0, 2.0])
    rho = preshift_exponents(channel_max, tensor_max, "fp4_e2m1")
    assert rho.tolist() == [0, -1, -2, -3, -3, -3, 0]  # E2M1: |rho| <= 2^2 - 1; beyond the tensor max: 0
    assert preshift_exponents(channel_max, tensor_max, "fp4_e2m1", max_shift=8).tolist() == [0, -1, -2, -3, -5, -8, 0]
    assert preshift_exponents(channel_max, tensor_max, "fp4_e1m2").tolist() == [0, -1, -1, -1, -1, -1, 0]
    assert preshift_exponents(channel_max, tensor_max, "fp4_e3m0").tolist() == [0, -1, -2, -3, -5, -7, 0]
    # the lifted channels reach the tensor's range within a binade (b_j and t are rounded separately,
    # as in the reference code)
    spread = tensor_max * torch.rand(200) ** 3 + 1e-3  # channel maxima spanning ~18 binades
    rho = preshift_exponents(spread, tensor_max, "fp4_e2m1", max_shift=30)
    lifted = spread / torch.pow(2.0, rho.float())
    assert torch.all(lifted < tensor_max * 2) and torch.all(lifted > tensor_max / 2)


def test_built_layer_folds_the_shifts_into_the_weight():
    x, weight, bias = outlier_inputs(), torch.randn(48, 64), torch.randn(48)
    choice = search_linear(weight, x, x.abs().amax(dim=0))
    layer = build_layer(weight, bias, choice)
    assert torch.equal(layer.input_scale, torch.pow(2.0, choice.rho.float()))
    assert layer.input_quantizer.static and layer.input_quantizer.fmt == choice.activation_format
    assert float(layer.input_quantizer.observed_max) == pytest.approx(choice.activation_max)
    shifted = weight * layer.input_scale[None, :]
    dequantized = layer.dequantize_weight()
    # per-row FP4 of W * 2^rho: within half of the largest step of each row's grid (plus clipping)
    row_max = shifted.abs().amax(dim=1, keepdim=True)
    assert torch.all((dequantized - shifted).abs() <= row_max * 0.75)
    with torch.no_grad():
        expected = layer.input_quantizer.fake_quantize(x / layer.input_scale) @ dequantized.T + bias
        torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent_bias", [True, False])
@pytest.mark.parametrize("search_formats", [True, False])
def test_searched_maxima_are_never_worse_than_absmax(exponent_bias, search_formats):
    x, weight = outlier_inputs(), torch.randn(40, 64)
    channel_max = x.abs().amax(dim=0)
    choice = search_linear(weight, x, channel_max, exponent_bias=exponent_bias, search_formats=search_formats)
    absmax = float(channel_max.max())
    rho = preshift_exponents(channel_max, absmax, "fp4_e2m1") if exponent_bias else torch.zeros(64, dtype=torch.long)
    plain = FP4Choice("fp4_e2m1", torch.ones(40), "fp4_e2m1", absmax, rho, 0.0)
    searched_error, plain_error = output_error(weight, x, choice), output_error(weight, x, plain)
    assert searched_error == pytest.approx(choice.error, rel=1e-4)  # the search simulates the built layer
    assert searched_error <= plain_error * (1 + 1e-5)
    assert searched_error < plain_error  # on outlier inputs clipping pays
    assert torch.all((choice.weight_fraction > 0) & (choice.weight_fraction <= 1))
    assert choice.activation_max <= absmax
    if not search_formats:
        assert choice.weight_format == "fp4_e2m1"


def test_preshift_lowers_the_output_error_on_outlier_channels():
    x, weight = outlier_inputs(), torch.randn(40, 64)
    errors = {bias: search_linear(weight, x, x.abs().amax(dim=0), exponent_bias=bias).error for bias in (True, False)}
    assert errors[True] < errors[False]


# ------------------------------------------------------------------------------------------------
# Recipe, engine, save / load
# ------------------------------------------------------------------------------------------------


def test_llm_fp4_beats_fp4_rtn_on_planted_outliers():
    reference = planted()
    with torch.no_grad():
        expected = reference(PROBE).logits
    errors = {}
    for name, recipe in (("llm-fp4-w4a4", "llm-fp4-w4a4"), ("rtn-fp4", RTN_FP4)):
        model = planted()
        report = compress(model, recipe, calibration=CALIBRATION)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == len(report.layers) == 14
        assert all(m.input_quantizer.fmt == "fp4_e2m1" and m.input_quantizer.static for m in layers)
        with torch.no_grad():
            errors[name] = float((model(PROBE).logits - expected).pow(2).mean())
    assert errors["llm-fp4-w4a4"] < errors["rtn-fp4"] / 2, errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_reload_give_identical_logits(family, tmp_path):
    model, reference = tiny_model(family), tiny_model(family)
    recipe = load_recipe("llm-fp4-w4a4")
    assert "llm-fp4-w4a4" in PRESETS and recipe.stages[0].method == "llm_fp4" and recipe.needs_calibration
    small = {"stages": [{"method": "llm_fp4", "max_grid": 6, "search_tokens": 64}]}  # a quicker search
    report = compress(model, small, calibration=CALIBRATION)
    assert all(entry.method.startswith("llm_fp4(") for entry in report.layers)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers and all(m.input_scale is not None for m in layers.values())
    with torch.no_grad():
        logits = model(PROBE).logits
        expected = reference(PROBE).logits
    assert 0 < float((logits - expected).abs().mean()) < 0.5 * float(expected.abs().mean())
    save(model, tmp_path / "m")
    section = json.loads((tmp_path / "m" / "slimlm.json").read_text())
    meta = section["compressed_modules"][next(iter(layers))]
    assert meta["input_scale"] and meta["activations"]["granularity"] == "per_tensor"
    reloaded, _ = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE).logits, logits)
    for name, layer in layers.items():
        again = reloaded.get_submodule(name)
        assert again.fmt == layer.fmt and torch.equal(again.input_scale, layer.input_scale)


@pytest.mark.parametrize("stage, message", [
    ({"max_grid": 1}, "max_grid must be at least 2"),
    ({"min_fraction": 0.0}, r"min_fraction must be in \(0, 1\)"),
    ({"min_fraction": 1.5}, r"min_fraction must be in \(0, 1\)"),
    ({"search_tokens": 4}, "search_tokens: Input should be greater than or equal to 16"),
    ({"search_rounds": 0}, "search_rounds: Input should be greater than or equal to 1"),
    ({"max_shift": -1}, "max_shift must be between 0 and 30"),
    ({"weight_format": "fp4_e4m1"}, "weight_format"),
    ({"bits": 4}, "valid keys"),
])
def test_bad_settings_fail_before_any_work(stage, message):
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match=message):
        compress(model, {"stages": [{"method": "llm_fp4", **stage}]}, calibration=CALIBRATION)
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(model, "llm-fp4-w4a4")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
