"""OmniQuant (slimlm.quant.omniquant): LWC, LET, block-wise training, folding, save/load, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.core.blocks import linear_weight
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.adapter import ModelAdapter
from slimlm.models.tiny import tiny_model
from slimlm.quant.grid import fake_quantize_ste, quantize_weight, quantize_weight_range, round_ste
from slimlm.quant.omniquant import LWC_INIT, EquivalentTransform, TrainableLinear, fold_
from slimlm.quant.qlinear import QuantizedLinear
from slimlm.quant.smoothquant import smoothing_groups

# Training tiny blocks is dominated by per-operation overhead: a second thread only adds contention.
pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
OUTLIERS = {"input_layernorm": [3, 17], "post_attention_layernorm": [5, 40]}
W4A4 = {"bits": 4, "granularity": "per_token", "symmetric": False}


def planted(factor: float = 40.0):
    """A tiny Llama whose norms emit a few outlier channels (the activations LET is for)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in OUTLIERS:
                module.weight[OUTLIERS[name.rpartition(".")[2]]] *= factor
    return model


def stage(**settings):
    return load_recipe({"stages": [{"method": "omniquant", **settings}]}).stages[0]


@pytest.mark.parametrize("group_size", ["channel", 16, 24])  # 24 does not divide 64: a shorter last group
def test_lwc_without_clipping_is_minmax_rtn_and_its_init_clips_by_sigmoid_4(group_size):
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    layer = TrainableLinear(weight, None, stage(bits=4, group_size=group_size, let=False), None)
    columns = None if group_size == "channel" else group_size
    with torch.no_grad():
        # The reference's init: gamma = beta = sigmoid(4) shrinks each group's range to 0.982 of min-max.
        xmin, xmax = layer.clipping_range(weight)
        shrink = torch.sigmoid(torch.tensor(LWC_INIT))
        first = weight[:, : 64 if columns is None else columns]
        torch.testing.assert_close(xmax[:, 0], shrink * first.amax(dim=1))
        torch.testing.assert_close(xmin[:, 0], shrink * first.amin(dim=1))
        expected = quantize_weight_range(weight, xmin, xmax, 4, columns, False)
        assert torch.equal(layer.quantized_weight(), expected.dequantize())
        assert torch.equal(layer.to_quantized_linear(torch.float32).codes(), expected.codes)
        # gamma = beta = 1: exactly min-max round-to-nearest of the shared grid.
        layer.gamma_raw.fill_(40.0)
        layer.beta_raw.fill_(40.0)
        rtn = quantize_weight(weight, 4, columns, False)
        assert torch.equal(layer.quantized_weight(), rtn.dequantize())
        final = layer.to_quantized_linear(torch.float32)
        assert torch.equal(final.codes(), rtn.codes)  # stored like every method's layer (float16 scales)
        assert torch.equal(final.dequantize_weight(), QuantizedLinear.from_quantized(rtn).dequantize_weight())


def test_fake_quantize_ste_matches_the_composite_expression_and_its_gradients():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 8, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(6, 4, 1, dtype=torch.float64) * 0.3 + 0.05).requires_grad_()
    zero = torch.full((6, 4, 1), 7.0, dtype=torch.float64)
    grad = torch.randn(6, 4, 8, dtype=torch.float64)
    (fake_quantize_ste(w, scale, zero, 4) * grad).sum().backward()
    fused = (w.grad.clone(), scale.grad.clone())
    w.grad = scale.grad = None
    composite = (torch.clamp(round_ste(w / scale) + zero, 0, 15) - zero) * scale
    (composite * grad).sum().backward()
    assert torch.equal(fake_quantize_ste(w, scale, zero, 4), composite)
    torch.testing.assert_close(fused, (w.grad, scale.grad))


def test_let_is_an_equivalent_transformation():
    """Y = ((X - delta) / s)(s W)^T + (B + delta W^T) = X W^T + B, in float."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(16, 32), torch.randn(16), torch.randn(5, 32)
    let = EquivalentTransform(torch.rand(32) + 0.5, torch.randn(32), None)
    layer = TrainableLinear(weight, bias, stage(bits=4, activations=W4A4), let)
    with torch.no_grad():
        y = let.transform(x) @ layer.transformed_weight().T + layer.transformed_bias()
    torch.testing.assert_close(y, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def _install_random_lets(model, settings):
    """Trainable stand-ins with random LET scales (some negative) and shifts in every block; returns
    (block, lets, trainables by path) per block."""
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(3)
    installed = []
    for block in adapter:
        lets, trainables = [], {}
        for group in smoothing_groups(block):
            width = linear_weight(block.module.get_submodule(group.linears[0])).shape[1]
            scale = (torch.rand(width, generator=generator) + 0.5) * torch.where(
                torch.rand(width, generator=generator) < 0.1, -1.0, 1.0)
            let = EquivalentTransform(scale, torch.randn(width, generator=generator) * 0.3, None)
            lets.append((group.norm, let))
            for path in group.linears:
                module = block.module.get_submodule(path)
                trainables[path] = TrainableLinear(linear_weight(module), module.bias, stage(**settings), let)
        for path, module in trainables.items():
            parent, _, child = path.rpartition(".")
            setattr(block.module.get_submodule(parent) if parent else block.module, child, module)
        installed.append((block.module, lets, trainables))
    return adapter, installed


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2", "gemma"])
def test_folding_the_let_keeps_the_trained_function(family):
    """The block with the transform applied at training time (inputs (x - delta) / s, weights s W) and the
    folded block (norm / s, shift delta / s in the layer, delta W^T in the bias) give the same logits."""
    model = tiny_model(family)
    adapter, installed = _install_random_lets(model, {"bits": 8, "let": True})
    with torch.no_grad():
        expected = model(PROBE).logits
        for block, lets, trainables in installed:
            fold_(block, lets, trainables, adapter.norm_weight_offset, torch.float32, scale_dtype=torch.float32)
        logits = model(PROBE).logits
    for block, _lets, trainables in installed:
        assert all(isinstance(block.get_submodule(path), QuantizedLinear) and block.get_submodule(path).input_shift
                   is not None for path in trainables)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # ... and, at 8 bits, close to the float model the transform started from.
    with torch.no_grad():
        reference = tiny_model(family)(PROBE).logits
    assert float((logits - reference).abs().mean()) < 0.05 * float(reference.abs().mean())


def _block0_error(model, reference) -> float:
    outputs = []
    hooks = [m.model.layers[0].register_forward_hook(
        lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out)) for m in (reference, model)]
    with torch.no_grad():
        reference(CALIBRATION)
        model(CALIBRATION)
    for hook in hooks:
        hook.remove()
    return float((outputs[0] - outputs[1]).pow(2).mean())


def test_training_reduces_the_block_output_error():
    reference = planted()
    errors, reports = {}, {}
    for name, lr, epochs in (("initial", 1e-12, 1), ("trained", None, 8)):  # lr 1e-12: the initial LWC / LET
        model = planted()
        rates = {"lwc_lr": lr, "let_lr": lr} if lr else {}
        reports[name] = compress(model, {"stages": [{"method": "omniquant", "epochs": epochs, "activations": W4A4,
                                                     **rates}]}, calibration=CALIBRATION)
        errors[name] = _block0_error(model, reference)
    assert errors["trained"] < 0.97 * errors["initial"], errors
    # The report's error is the last epoch's mean training loss, which the folded block reproduces.
    assert reports["trained"].layers[0].error == pytest.approx(errors["trained"], rel=0.1)
    assert {entry.method for entry in reports["trained"].layers} == {"omniquant"}


def test_omniquant_w4a4_beats_rtn_w4a4_on_planted_outliers():
    reference = planted()
    with torch.no_grad():
        expected = reference(PROBE).logits
    errors = {}
    for name, stage_settings in (("rtn", {"method": "rtn", "bits": 4, "group_size": "channel", "activations": W4A4}),
                                 ("omniquant", {"method": "omniquant", "epochs": 4, "activations": W4A4})):
        model = planted()
        compress(model, {"stages": [stage_settings]}, calibration=CALIBRATION)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 14 and all(m.input_quantizer is not None for m in layers)
        with torch.no_grad():
            errors[name] = float((model(PROBE).logits - expected).pow(2).mean())
    assert errors["omniquant"] < 0.8 * errors["rtn"], errors


def test_final_layers_carry_the_shift_only_after_norms_and_weight_only_has_no_input_grid():
    model = planted()
    compress(model, {"stages": [{"method": "omniquant", "epochs": 1, "activations": W4A4}]}, calibration=CALIBRATION)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(m.input_shift is not None for m in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                     mlp.gate_proj, mlp.up_proj))
    assert attention.o_proj.input_shift is None and mlp.down_proj.input_shift is None
    assert attention.q_proj.bias is not None  # delta W^T
    model = tiny_model("llama")
    compress(model, "omniquant-w4a16", calibration=CALIBRATION)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.input_quantizer is None and m.input_shift is None for m in layers)
    assert all(m.bias is None for m in layers)


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt2", "gemma2"])
def test_omniquant_on_families_with_biases_fused_qkv_and_sandwich_norms(family):
    model, reference = tiny_model(family), tiny_model(family)
    report = compress(model, {"stages": [{"method": "omniquant", "bits": 6, "epochs": 1,
                                          "activations": {"bits": 6, "symmetric": False}}]}, calibration=CALIBRATION)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == len(report.layers) > 0
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert 0 < float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())


def test_bfloat16_model_trains_in_float32_and_keeps_its_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    compress(model, {"stages": [{"method": "omniquant", "epochs": 1, "activations": W4A4}]}, calibration=CALIBRATION)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad is False for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(PROBE).logits).all()


def test_saved_model_reloads_with_identical_logits(tmp_path):
    model = tiny_model("qwen2")
    recipe = {"stages": [{"method": "omniquant", "epochs": 1, "activations": W4A4}]}
    compress(model, recipe, calibration=CALIBRATION)
    save(model, tmp_path / "omni", recipe=recipe)
    reloaded, _ = load(tmp_path / "omni")
    layers = [m for m in reloaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and sum(m.input_shift is not None for m in layers) == 10
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE).logits, model(PROBE).logits)


@pytest.mark.parametrize("settings,message", [
    ({"activations": {"bits": 1}}, "activation bits must be between 2 and 8"),
    ({"activations": {"bits": 16}}, "activation bits must be between 2 and 8"),
    ({"activations": {"bits": 4, "granularity": "per_tensor"}}, "per token"),
    ({"activations": {"bits": 8, "outlier_threshold": 6.0}}, "setting of the rtn stage"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"lwc_lr": 0}, "learning rates must be positive"),
    ({"let_lr": -1e-3}, "learning rates must be positive"),
    ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
    ({"lwc": False, "let": False}, "nothing to learn"),
    ({"group_size": "tensor"}, "per output channel or group"),
    ({"bits": 9}, "bits must be between 2 and 8"),
    ({"epoch": 3}, "unknown key 'epoch'"),
])
def test_bad_settings_fail_before_any_work(settings, message):
    model, reference = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(SlimlmError, match=message):
        compress(model, {"stages": [{"method": "omniquant", **settings}]}, calibration=CALIBRATION)
    assert all(torch.equal(p, reference.get_parameter(n)) for n, p in model.named_parameters())
    with pytest.raises(SlimlmError, match="needs calibration"):
        compress(model, "omniquant-w4a4")


def test_presets():
    for name in ("omniquant-w4a4", "omniquant-w6a6", "omniquant-w4a16", "omniquant-w3a16g128", "omniquant-w4a4-paper"):
        assert name in PRESETS
    w4a4 = load_recipe("omniquant-w4a4")
    assert (w4a4.stages[0].bits, w4a4.stages[0].activations.bits, w4a4.stages[0].let) == (4, 4, True)
    paper = load_recipe("omniquant-w4a4-paper")
    assert (paper.stages[0].epochs, paper.calibration.samples, paper.calibration.seqlen) == (20, 128, 2048)
    assert load_recipe("omniquant-w4a16").stages[0].activations is None


def test_cli_compress_omniquant_w4a4_end_to_end(tmp_path, tiny_dir, capsys):
    from slimlm.cli import main

    out = tmp_path / "omni"
    assert main(["compress", "--model", tiny_dir, "--recipe", "omniquant-w4a4", "--out", str(out),
                 "--calib-corpus", "pydoc", "--calib-samples", "2", "--calib-seqlen", "32"]) == 0
    assert "disk_bytes_after" in capsys.readouterr().out
    section = json.loads((out / "slimlm.json").read_text())
    assert len(section["compressed_modules"]) == 14 and section["recipe"]["stages"][0]["method"] == "omniquant"
    model, _ = load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.input_quantizer is not None and m.input_quantizer.bits == 4 for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 100, (2, 16))).logits).all()


def test_let_on_a_block_with_one_norm_for_both_halves_is_refused_before_any_work():
    """Phi's attention and MLP read one norm: LET's scales would be folded into it for both halves."""
    model = tiny_model("phi")
    with pytest.raises(SlimlmError, match="OmniQuant's LET .* norms \\['attn_norm'\\]"):
        compress(model, {"stages": [{"method": "omniquant", "bits": 4, "group_size": 32}]},
                 calibration=torch.randint(0, 256, (4, 16)))
    compress(model, {"stages": [{"method": "omniquant", "bits": 4, "group_size": 32, "let": False, "epochs": 1}]},
             calibration=torch.randint(0, 256, (2, 16)))
