"""compressed-tensors export: loaded by transformers (symmetric and asymmetric), bit-exact against the library's packer."""

import pytest
import torch

from slimlm.compress import compress
from slimlm.errors import SlimlmError
from slimlm.export.compressed_tensors import export_compressed_tensors, pack_int32
from slimlm.models.tiny import tiny_model
from slimlm.quant.qlinear import QuantizedLinear

ct = pytest.importorskip("compressed_tensors")
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def quantized_tiny(family="llama", **stage):
    model = tiny_model(family)
    compress(model, {"stages": [{"method": "gptq", "bits": 4, "group_size": 32, **stage}]}, calibration=CALIBRATION)
    return model


@pytest.mark.parametrize("family, symmetric", [("llama", True), ("qwen2", True), ("gemma2", True), ("llama", False),
                                               ("qwen2", False)])
def test_transformers_loads_the_export_with_the_same_logits(family, symmetric, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    model = quantized_tiny(family, symmetric=symmetric)
    export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config.get("dequantize", False) is not symmetric  # asymmetric: the load path that unpacks zero points
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    probe = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(probe).logits, model(probe).logits, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_the_compressed_tensors_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (24, 70), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


def test_asymmetric_export_equals_the_library_compressor(tmp_path):
    """The asymmetric tensors we write are the ones compressed-tensors itself makes from the same weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    model = quantized_tiny("llama", symmetric=False)
    export_compressed_tensors(model, tmp_path / "ct")
    written = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    layer: QuantizedLinear = model.get_submodule(name)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))
    reference = PackedQuantizationCompressor.compress({
        "weight": layer.dequantize_weight(), "weight_scale": layer.scale.float(),
        "weight_zero_point": (layer.zero.to(torch.int16) - 8).to(torch.int8),
    }, scheme)
    for key in ("weight_packed", "weight_zero_point", "weight_scale"):
        assert torch.equal(written[f"{name}.{key}"], reference[key].to(written[f"{name}.{key}"].dtype)), key


def test_inexpressible_layers_are_refused():
    with pytest.raises(SlimlmError, match="does not divide"):
        model = tiny_model("llama")
        compress(model, {"stages": [{"method": "rtn", "bits": 4, "group_size": 48}]})
        export_compressed_tensors(model, "/tmp/never-written")
    with pytest.raises(SlimlmError, match="static_groups"):
        export_compressed_tensors(quantized_tiny(act_order=True), "/tmp/never-written")
