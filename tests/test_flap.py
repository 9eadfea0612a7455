"""FLAP: the fluctuation metric, bias compensation, adaptive widths, and both ways of loading the result."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimlm.compress import compress, load_recipe
from slimlm.core.statistics import ChannelStatistics
from slimlm.errors import SlimlmError
from slimlm.models.tiny import TINY_CONFIGS, tiny_model
from slimlm.prune.flap import channel_metric
from tests.helpers import assert_plain_transformers_roundtrip, assert_slimlm_roundtrip

CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def run_flap(model, **stage):
    recipe = load_recipe({"stages": [{"method": "flap", **stage}], "calibration": {"batch_size": 2},
                         "float_storage": "float32"})  # exactness checks: no bfloat16 rounding
    return compress(model, recipe, calibration=CALIBRATION)


def test_wifv_is_channel_variance_times_squared_column_norm():
    x = torch.randn(3, 50, 8)
    weight = torch.randn(5, 8)
    stats = ChannelStatistics(8)
    stats.add_batch(x)
    flat = x.reshape(-1, 8).double()
    expected = flat.var(0, unbiased=False) * weight.double().pow(2).sum(0)
    torch.testing.assert_close(channel_metric(weight, stats, "WIFV").double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(channel_metric(weight, stats, "IFV").double(), flat.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_bias_compensation_makes_removing_constant_channels_exact():
    """MLP channels whose activation is the same for every token carry no fluctuation: FLAP removes them
    first, and the compensating bias (their mean through the down projection) makes that removal exact."""
    config = AutoConfig.for_model("llama", **dict(TINY_CONFIGS["llama"], mlp_bias=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    constant = torch.arange(0, 128, 8)  # 16 of 128 channels per block
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj"):
                getattr(layer.mlp, name).weight[constant] = 0  # the channel sees only its biases
            layer.mlp.gate_proj.bias[constant] = 1.0
            layer.mlp.up_proj.bias[constant] = 2.0
        dense = model(PROBE).logits
    report = run_flap(model, ratio=16 / 128, structure="UL-UM")
    assert report.structure[0]["mlp_width_per_block"] == [112, 112]
    assert report.structure[0]["kv_heads_per_block"] == [2, 2]  # floor(0.125 * 2) = 0 attention units removed
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, dense, atol=1e-5, rtol=1e-5)


def test_without_compensation_the_same_removal_changes_the_outputs():
    config = AutoConfig.for_model("llama", **dict(TINY_CONFIGS["llama"], mlp_bias=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[::8] = 0
            layer.mlp.up_proj.weight[::8] = 0
            layer.mlp.gate_proj.bias[::8] = 1.0
            layer.mlp.up_proj.bias[::8] = 2.0
        dense = model(PROBE).logits
    run_flap(model, ratio=16 / 128, structure="UL-UM", bias_compensation=False)
    with torch.no_grad():
        assert (model(PROBE).logits - dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_adaptive_structure_meets_the_ratio_and_round_trips_through_slimlm_save(family, tmp_path):
    model = tiny_model(family, blocks=4)
    block_parameters = sum(p.numel() for p in model.model.layers.parameters())
    before = sum(p.numel() for p in model.parameters())
    report = run_flap(model, ratio=0.3, structure="AL-AM")
    summary = report.structure[0]
    removed = before - sum(p.numel() for p in model.parameters())
    # within one attention unit (a KV group: 64 * 16 * 4 + 32 * 64 weights) of the target, biases aside
    assert abs(removed - 0.3 * block_parameters) < 64 * 16 * 6 + 4 * 2 * 64
    assert all(k >= 1 for k in summary["kv_heads_per_block"]) and all(w >= 1 for w in summary["mlp_width_per_block"])
    for layer, width in zip(model.model.layers, summary["mlp_width_per_block"]):
        assert layer.mlp.down_proj.in_features == width and layer.mlp.down_proj.bias is not None
    assert_slimlm_roundtrip(model, tmp_path / "m", PROBE)


def test_uniform_structure_without_bias_loads_with_plain_transformers(tmp_path):
    model = tiny_model("qwen2", blocks=3)
    run_flap(model, ratio=0.5, structure="UL-UM", bias_compensation=False)
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.intermediate_size == 64
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)


def test_uniform_structure_with_bias_loads_with_plain_transformers_where_the_config_has_bias_switches(tmp_path):
    model = tiny_model("llama", blocks=3)
    run_flap(model, ratio=0.5, structure="UL-UM")
    assert model.config.attention_bias and model.config.mlp_bias
    block = model.model.layers[0]
    assert torch.count_nonzero(block.self_attn.q_proj.bias) == 0  # added zero: outputs unchanged
    assert torch.count_nonzero(block.mlp.down_proj.bias) > 0  # the compensation itself
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)


def test_bias_switches_stay_off_where_the_architecture_has_none():
    model = tiny_model("mistral", blocks=2)
    run_flap(model, ratio=0.5, structure="UL-UM")
    assert not hasattr(model.config, "attention_bias") or model.config.attention_bias is False
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert model.model.layers[0].mlp.down_proj.bias is not None


def test_standardisation_makes_the_global_ranking_insensitive_to_each_block_scale():
    """Scaling one block's down projection by 1e-3 and another's by 10 must not send the whole cut to
    the first block: each block's scores are standardised before the global ranking."""
    model = tiny_model("llama", blocks=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[1].mlp.down_proj.weight.mul_(10.0)
    summary = run_flap(model, ratio=0.3, structure="AL-AM").structure[0]
    widths = summary["mlp_width_per_block"]
    assert abs(widths[0] - widths[1]) <= 0.25 * 128


def test_flap_refuses_bad_ratios_and_fused_attention():
    for ratio, message in ((0.0, "greater than 0"), (1.0, "less than 1")):
        with pytest.raises(SlimlmError, match=message):
            load_recipe({"stages": [{"method": "flap", "ratio": ratio}]})
    with pytest.raises(SlimlmError, match="flap needs separate q/k/v/o"):
        run_flap(tiny_model("gpt2"), ratio=0.2)
