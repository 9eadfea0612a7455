"""SmoothQuant (slimlm.quant.smoothquant): function-preserving smoothing, then W8A8."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.errors import SlimlmError
from slimlm.export.native import load
from slimlm.models.tiny import tiny_model
from slimlm.quant.smoothquant import smooth_model_, smoothing_scales
from slimlm.quant.w8a8 import Int8Linear

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
OUTLIERS = {"input_layernorm": [3, 17], "post_attention_layernorm": [5, 40]}


def planted(family: str = "llama", factor: float = 40.0):
    """A tiny model whose norms emit a few outlier channels (the activations SmoothQuant is for)."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in OUTLIERS:
                module.weight[OUTLIERS[leaf]] *= factor
    return model


def q_inputs(model) -> torch.Tensor:
    seen = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(PROBE)
    hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def spread(x: torch.Tensor) -> float:
    channel_max = x.abs().amax(dim=0)
    return float(channel_max.max() / channel_max.median())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma"])
def test_smoothing_alone_keeps_the_logits(family):
    model = planted(family) if family == "llama" else tiny_model(family)
    reference = planted(family) if family == "llama" else tiny_model(family)
    smooth_model_(model, CALIBRATION, alpha=0.5, batch_size=2)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, reference.get_parameter(n))]
    assert any("norm" in n or "ln_" in n or "layer_norm" in n for n in changed)  # the norms took 1/s
    assert any("proj" in n or "c_attn" in n or "fc" in n for n in changed)  # the linears took s
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, reference(PROBE).logits, rtol=0, atol=1e-5)


def test_smoothing_shrinks_the_channel_spread():
    model = planted()
    before = spread(q_inputs(model))
    smooth_model_(model, CALIBRATION, alpha=0.5)
    after = spread(q_inputs(model))
    assert before > 20 and after < before / 4, (before, after)


def test_scales_follow_equation_4():
    x_max = torch.tensor([4.0, 1.0, 0.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-0.25, 0.5, 0.0]])]
    scales = smoothing_scales(x_max, weights, 0.5)
    torch.testing.assert_close(scales, torch.tensor([2.0 / 1.0, 1.0 / 2 ** 0.5, 1e-5]))
    assert torch.equal(smoothing_scales(x_max, weights, 1.0), x_max.clamp(min=1e-5))


def test_smoothquant_beats_naive_w8a8_on_planted_outliers():
    reference = planted()
    with torch.no_grad():
        expected = reference(PROBE).logits
    errors = {}
    for preset in ("rtn-w8a8", "smoothquant-w8a8"):
        model = planted()
        compress(model, preset, calibration=CALIBRATION)
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
        with torch.no_grad():
            errors[preset] = float((model(PROBE).logits - expected).pow(2).mean())
    assert errors["smoothquant-w8a8"] < errors["rtn-w8a8"] / 2, errors


def test_alpha_search_picks_the_lowest_block_error_and_static_grids_calibrate():
    reference = planted()
    model = planted()
    recipe = {"stages": [{"method": "smoothquant", "alpha_grid": [0.0, 0.5, 0.8],
                          "activations": {"granularity": "per_tensor"}}]}
    report = compress(model, recipe, calibration=CALIBRATION)
    labels = {entry.method for entry in report.layers}
    assert labels <= {"smoothquant(alpha=0)", "smoothquant(alpha=0.5)", "smoothquant(alpha=0.8)"}
    assert "smoothquant(alpha=0)" not in labels  # no smoothing loses to smoothing on planted outliers
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 14 and all(m.input_quantizer.calibrated for m in int8)
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())


@pytest.mark.parametrize("stage,message", [
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
    ({"alpha_grid": [0.3, 1.2]}, r"alpha_grid values must be in \[0, 1\]"),
    ({"alpha_grid": []}, "alpha_grid is empty"),
    ({"activations": {"outlier_threshold": 6.0}}, "setting of the rtn stage"),
    ({"activations": {"bitz": 8}}, "valid keys: bits, fmt, granularity, outlier_threshold, symmetric"),
])
def test_bad_settings_fail_before_any_work(stage, message):
    model, reference = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(SlimlmError, match=message):
        compress(model, {"stages": [{"method": "smoothquant", **stage}]}, calibration=CALIBRATION)
    assert all(torch.equal(p, reference.get_parameter(n)) for n, p in model.named_parameters())
    with pytest.raises(SlimlmError, match="alpha must be in"):
        smooth_model_(model, CALIBRATION, alpha=1.5)
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(model, "smoothquant-w8a8")


def test_cli_compress_smoothquant_w8a8_end_to_end(tmp_path, tokenizer, capsys):
    from slimlm.cli import main

    source, out = tmp_path / "float", tmp_path / "sq"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert "smoothquant-w8a8" in PRESETS and load_recipe("smoothquant-w8a8").stages[0].alpha == 0.5
    assert main(["compress", "--model", str(source), "--recipe", "smoothquant-w8a8", "--out", str(out),
                 "--calib-corpus", "pydoc", "--calib-samples", "2", "--calib-seqlen", "32"]) == 0
    assert "disk_bytes_after" in capsys.readouterr().out
    section = json.loads((out / "slimlm.json").read_text())
    assert len(section["compressed_modules"]) == 14 and section["recipe"]["stages"][0]["method"] == "smoothquant"
    model, _ = load(out)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
    probe = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(probe).logits).all()


def test_compressed_tensors_export_refuses_both_methods():
    from slimlm.export.compressed_tensors import check_recipe_exportable

    for preset in ("smoothquant-w8a8", "llm-int8"):
        with pytest.raises(SlimlmError, match="W8A8"):
            check_recipe_exportable(load_recipe(preset), {}, [set()])


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt2", "gemma2", "gemma3_text"])
def test_smoothquant_on_families_with_biases_fused_qkv_and_sandwich_norms(family):
    model, reference = tiny_model(family), tiny_model(family)
    report = compress(model, "smoothquant-w8a8", calibration=CALIBRATION)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == len(report.layers) > 0
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert 0 < float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())


def test_a_block_with_one_norm_for_both_halves_is_refused_before_any_work():
    """Phi's attention and MLP read one norm: folding one set of scales into it would mis-scale a half."""
    calls = []
    model = tiny_model("phi")
    model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(SlimlmError, match="SmoothQuant folds scales .* norms \\['attn_norm'\\]"):
        compress(model, {"stages": [{"method": "smoothquant"}]}, calibration=torch.randint(0, 256, (4, 16)))
    assert not calls  # refused before the calibration pass
