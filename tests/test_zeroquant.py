"""ZeroQuant (slimlm.quant.zeroquant): group-wise weights, token-wise activations, W4/8-A8, LKD."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.tiny import tiny_model
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qlinear import QuantizedLinear

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def logits_error(model, reference) -> float:
    with torch.no_grad():
        return float((model(PROBE).logits - reference(PROBE).logits).pow(2).mean())


def test_w4_8_a8_quantizes_mlp_to_4_bits_and_attention_to_8_group_wise():
    model, reference = tiny_model("llama"), tiny_model("llama")
    compress(model, {"stages": [{"method": "zeroquant", "bits": 4, "attention_bits": 8, "group_size": 32}]})
    block, float_block = model.model.layers[0], reference.model.layers[0]
    assert block.mlp.up_proj.bits == 4 and block.self_attn.q_proj.bits == 8
    for layer, source in ((block.mlp.up_proj, float_block.mlp.up_proj), (block.self_attn.v_proj, float_block.self_attn.v_proj)):
        assert isinstance(layer, QuantizedLinear) and layer.group_size == 32 and layer.symmetric
        expected = quantize_weight(source.weight.detach(), layer.bits, 32, True)
        assert torch.equal(layer.codes(), expected.codes)
        assert layer.input_quantizer.granularity == "per_token" and layer.input_quantizer.bits == 8


def test_presets_run_and_reload(tmp_path):
    for preset in ("zeroquant-w8a8", "zeroquant-w4a8", "zeroquant-w4a8-lkd"):
        model = tiny_model("llama")
        recipe = load_recipe(preset)
        compress(model, recipe, calibration=CALIBRATION if recipe.needs_calibration else None)
        save(model, tmp_path / preset)
        reloaded, _ = load(tmp_path / preset)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(PROBE).logits, model(PROBE).logits, rtol=0, atol=0)


def test_lkd_lowers_the_error_against_the_float_model():
    reference = tiny_model("llama")
    errors = {}
    for lkd in (None, {"epochs": 20, "lr": 1e-4}):
        model = tiny_model("llama")
        stage = {"method": "zeroquant", "bits": 3, "attention_bits": 3, "group_size": 32, "lkd": lkd}
        compress(model, {"stages": [stage]}, calibration=CALIBRATION if lkd else None)
        errors[lkd is not None] = logits_error(model, reference)
    assert errors[True] < 0.8 * errors[False]


def test_lkd_feeds_the_next_block_the_teachers_activations(monkeypatch):
    """With LKD every block is distilled on the float model's activations (L_k . L_{k-1} ... L_1 (X))."""
    import slimlm.quant.zeroquant as zeroquant

    seen = []
    original = zeroquant._distil

    def spy(context, stage):
        seen.append([h.clone() for h in context.inputs.hidden])
        original(context, stage)

    monkeypatch.setattr(zeroquant, "_distil", spy)
    model, reference = tiny_model("llama"), tiny_model("llama")
    compress(model, {"stages": [{"method": "zeroquant", "bits": 2, "attention_bits": 2, "group_size": 32,
                                 "lkd": {"epochs": 1}}]}, calibration=CALIBRATION)
    with torch.no_grad():
        hidden = reference(CALIBRATION, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(torch.cat(seen[1]), hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage, message", [
    ({"attention_bits": 9}, "attention_bits: Input should be less than or equal to 8"),
    ({"activations": {"granularity": "per_tensor"}}, "token-wise"),
    ({"activations": {"bits": 8, "outlier_threshold": 6.0}}, "token-wise"),
    ({"lkd": {"lr": 0}}, "greater than 0"),
    ({"lkd": {"epochs": 0}}, "greater than or equal to 1"),
    ({"bits": 1}, "bits must be between 2 and 8"),
    ({"lkd": {"steps": 3}}, "unknown key 'steps'"),
])
def test_bad_settings_fail_before_any_work(stage, message):
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match=message):
        compress(model, {"stages": [{"method": "zeroquant", **stage}]})
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_lkd_without_calibration_is_refused():
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(tiny_model("llama"), "zeroquant-w4a8-lkd")
