"""Named recipes for `slimlm compress --recipe NAME` (each also expressible as YAML: `Recipe.to_yaml`).

Weight-only presets quantize every linear of the decoder blocks (the LM head and embedding stay in
float) asymmetrically, the default of the GPTQ and AWQ papers' code. `g128` on a model whose width
is not a multiple of 128 (SmolLM2: 576) uses a shorter last group.
"""

from __future__ import annotations


def _weight_only(method: str, bits: int, group_size: int | str, **extra) -> dict:
    return {"stages": [{"method": method, "bits": bits, "group_size": group_size, **extra}]}


PRESETS: dict[str, dict] = {}
for _bits in (2, 3, 4, 8):
    for _group in (32, 64, 128, "channel"):
        _suffix = f"g{_group}" if isinstance(_group, int) else "ch"
        for _method in ("rtn", "gptq", "awq"):
            PRESETS[f"{_method}-w{_bits}{_suffix}"] = _weight_only(_method, _bits, _group)
        PRESETS[f"gptq-w{_bits}{_suffix}-actorder"] = _weight_only("gptq", _bits, _group, act_order=True)

# GGUF block formats (`slimlm export --format gguf`, `slimlm.export.gguf`): group 32 with the block format's
# symmetry, so the export carries the codes and scales as they are (Q4_0 = 4-bit symmetric, Q4_1 = 4-bit
# asymmetric, Q5_0 / Q5_1 the same at 5 bits, Q8_0 = 8-bit symmetric). The only inexactness left is GGUF's
# float16: slimlm stores scales in float16 unless they would overflow or turn subnormal (then float32,
# rounded on export with the error reported), and Q4_1/Q5_1 round the offset -scale * zero to float16.
# Q4_0 / Q5_0 take llama.cpp's own range rule for RTN (clip "signed_max": the largest-magnitude weight of a
# block exact, a 6% finer step than the balanced symmetric grid) and, for GPTQ, llama.cpp's importance-weighted
# scale search with the Hessian's diagonal as the importance ("weighted_lsq") plus relative_dampening 1 (the
# input correlations shrunk by half: on SmolLM2-135M, WikiText-2 ppl 37.8 against 40.5 without it and 39.0
# when rounding to nearest with the same scales, benchmarks/results/gguf_export.md). GPTQ also orders columns
# by activation (act_order with static_groups, so every 32-column block still has one scale).
_GGUF_GRIDS = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False), "q8_0": (8, True)}
for _method in ("rtn", "gptq", "awq"):
    for _format, (_bits, _symmetric) in _GGUF_GRIDS.items():
        _extra = {"clip": "signed_max"} if _format in ("q4_0", "q5_0") and _method != "awq" else {}
        if _method == "gptq":
            _extra.update(act_order=True, static_groups=True)
            if _format in ("q4_0", "q5_0"):
                _extra.update(clip="weighted_lsq", relative_dampening=1.0)
        PRESETS[f"{_method}-gguf-{_format}"] = _weight_only(_method, _bits, 32, symmetric=_symmetric, **_extra)

# W8A8 (`slimlm.quant.w8a8`): int8 symmetric per-channel weights, int8 activations per token (dynamic)
# or per tensor (static, calibrated), multiplied by an integer GEMM.
_W8 = {"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True}
PRESETS["rtn-w8a8"] = {"stages": [{**_W8, "activations": {"bits": 8, "granularity": "per_token", "symmetric": True}}]}
PRESETS["rtn-w8a8-static"] = {"stages": [{**_W8, "activations": {"bits": 8, "granularity": "per_tensor",
                                                                   "symmetric": True}}]}
# LLM.int8() (`slimlm.quant.llm_int8`): per-token W8A8 plus the float path for outlier columns (|x| >= 6).
PRESETS["llm-int8"] = {"stages": [{**_W8, "activations": {"bits": 8, "granularity": "per_token", "symmetric": True,
                                                           "outlier_threshold": 6.0}}]}

# SmoothQuant (`slimlm.quant.smoothquant`): alpha = 0.5 smoothing of the linears after each norm, then W8A8
# with per-token dynamic activations.
PRESETS["smoothquant-w8a8"] = {"stages": [{"method": "smoothquant", "alpha": 0.5,
                                          "activations": {"bits": 8, "granularity": "per_token", "symmetric": True}}]}

# Simulated low-bit weights and activations (`QuantizedLinear.quantize_inputs`): the OmniQuant paper's W-A grids,
# weights per channel and activations per token, both asymmetric; RTN and SmoothQuant baselines at W4A8,
# W6A6 and W4A4.
_PER_TOKEN_ASYM = {"granularity": "per_token", "symmetric": False}
for _w, _a in ((4, 8), (6, 6), (4, 4)):
    _grid = {"bits": _w, "group_size": "channel", "symmetric": False}
    PRESETS[f"rtn-w{_w}a{_a}"] = {"stages": [{"method": "rtn", **_grid,
                                              "activations": {"bits": _a, **_PER_TOKEN_ASYM}}]}
    PRESETS[f"smoothquant-w{_w}a{_a}"] = {"stages": [{"method": "smoothquant", "alpha": 0.5, **_grid,
                                                      "activations": {"bits": _a, **_PER_TOKEN_ASYM}}]}
# ZeroQuant: group-wise symmetric weights (64 columns), token-wise dynamic 8-bit activations; W8A8, and the
# paper's W4/8-A8 (MLP weights 4-bit, attention 8-bit) with and without layer-by-layer distillation.
PRESETS["zeroquant-w8a8"] = {"stages": [{"method": "zeroquant", "bits": 8}]}
PRESETS["zeroquant-w4a8"] = {"stages": [{"method": "zeroquant", "bits": 4, "attention_bits": 8}]}
PRESETS["zeroquant-w4a8-lkd"] = {"stages": [{"method": "zeroquant", "bits": 4, "attention_bits": 8, "lkd": {}}]}
# FP8 (E4M3) W8A8: per-channel weight scales with per-token dynamic activation scales, or per-tensor weight
# scales with a static per-tensor activation scale (the scheme of FP8 inference engines).
_FP8 = {"method": "rtn", "bits": 8, "fmt": "fp8_e4m3", "symmetric": True}
PRESETS["fp8-w8a8"] = {"stages": [{**_FP8, "group_size": "channel",
                                   "activations": {"bits": 8, "fmt": "fp8_e4m3", "granularity": "per_token"}}]}
PRESETS["fp8-w8a8-static"] = {"stages": [{**_FP8, "group_size": "tensor",
                                          "activations": {"bits": 8, "fmt": "fp8_e4m3", "granularity": "per_tensor"}}]}
# LLM-FP4 (`slimlm.quant.llm_fp4`): FP4 weights (per channel) and activations (per tensor, static) with the
# format / maximum-value search and the per-channel pre-shifted activation exponent bias folded into the weights.
PRESETS["llm-fp4-w4a4"] = {"stages": [{"method": "llm_fp4"}]}

# Pruning: unstructured at 50/60/70%, N:M 2:4 and 4:8; DSnoT refines a Wanda mask; OWL ratios.
for _method in ("magnitude", "wanda", "sparsegpt", "dsnot"):
    for _percent in (50, 60, 70):
        PRESETS[f"{_method}-{_percent}"] = {"stages": [{"method": _method, "sparsity": _percent / 100}]}
    for _n, _m in ((2, 4), (4, 8)):
        PRESETS[f"{_method}-{_n}of{_m}"] = {"stages": [{"method": _method, "pattern": f"{_n}:{_m}"}]}
for _method in ("wanda", "sparsegpt"):
    PRESETS[f"{_method}-owl-70"] = {"stages": [{"method": _method, "sparsity": 0.7, "owl": {}}]}
# SparseGPT 2:4 then GPTQ 4-bit (GPTQ keeps the zeros), and the paper's joint single sweep.
PRESETS["sparsegpt-2of4+gptq-w4g64"] = {"stages": [
    {"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": 64}]}
PRESETS["sparsegpt-2of4-joint-w4g64"] = {"stages": [
    {"method": "sparsegpt", "pattern": "2:4", "quantize": {"bits": 4, "group_size": 64}}]}
# Depth pruning: remove blocks by ShortGPT's block influence or Shortened LLaMA's perplexity criterion.
for _count in (2, 4, 6):
    PRESETS[f"drop-layers-{_count}"] = {"stages": [{"method": "drop_layers", "count": _count}]}
    PRESETS[f"drop-layers-{_count}-ppl"] = {"stages": [{"method": "drop_layers", "count": _count, "criterion": "perplexity"}]}
# Compression then recovery by knowledge distillation from the model before it (slimlm.distill): 200 steps of
# 4 x 256 tokens on the calibration segments (128 x 512 C4 tokens, each read about three times).
_KD = {"method": "kd", "seqlen": 256, "training": {"steps": 200, "batch_size": 4, "lr": 1e-4, "warmup_steps": 10}}
for _count in (2, 4, 6):
    PRESETS[f"drop-layers-{_count}-kd"] = {"stages": [{"method": "drop_layers", "count": _count}, _KD]}
PRESETS["sparsegpt-2of4-kd"] = {"stages": [{"method": "sparsegpt", "pattern": "2:4"}, _KD]}
# Width pruning: LLM-Pruner, without and with LoRA recovery.
for _percent in (10, 20, 30):
    PRESETS[f"llm-pruner-{_percent}"] = {"stages": [{"method": "llm_pruner", "ratio": _percent / 100}]}
    PRESETS[f"llm-pruner-{_percent}-lora"] = {"stages": [{"method": "llm_pruner", "ratio": _percent / 100,
                                                          "recovery": {"steps": 100}}]}
# Structured presets give plain transformers models (`from_pretrained` loads them); the paper forms whose
# blocks differ from one another (SliceGPT's per-block rotations, FLAP's adaptive widths) are slimlm
# checkpoints and have their own names.
# SliceGPT: slice 25 / 30 % of the hidden size (one global rotation, or the paper's per-block rotations),
# or remove 10 / 20 / 30 % of the parameters.
for _percent in (25, 30):
    PRESETS[f"slicegpt-{_percent}"] = {"stages": [{"method": "slicegpt", "slicing": _percent / 100}]}
    PRESETS[f"slicegpt-per-block-{_percent}"] = {"stages": [{"method": "slicegpt", "slicing": _percent / 100,
                                                              "rotation": "per_block"}]}
for _percent in (10, 20, 30):
    PRESETS[f"slicegpt-params-{_percent}"] = {"stages": [{"method": "slicegpt", "parameter_reduction": _percent / 100}]}
# FLAP with bias compensation, a ratio of the blocks' parameters: the same fraction of every block, or
# the paper's adaptive structure (AL-AM).
for _percent in (10, 20, 30):
    PRESETS[f"flap-{_percent}"] = {"stages": [{"method": "flap", "ratio": _percent / 100}]}
    PRESETS[f"flap-{_percent}-adaptive"] = {"stages": [{"method": "flap", "ratio": _percent / 100, "structure": "AL-AM"}]}
# OmniQuant (`slimlm.quant.omniquant`): LWC, plus LET for weight-activation quantization (per-channel asymmetric
# weights, per-token dynamic asymmetric activations), trained block by block. The plain names are CPU budgets
# (64 segments x 256 tokens, 2 epochs: about 15 minutes for SmolLM2-135M on 2 cores); the `-paper` names use
# the paper's 128 x 2048 WikiText2 tokens and 20 epochs (W4A4 with the reference script's aug_loss).
_OMNI_CPU = {"samples": 64, "seqlen": 256}
_OMNI_PAPER = {"corpus": "wikitext2", "samples": 128, "seqlen": 2048, "batch_size": 1}
for _bits in (4, 6):
    _acts = {"bits": _bits, "granularity": "per_token", "symmetric": False}
    _stage = {"method": "omniquant", "bits": _bits, "group_size": "channel", "activations": _acts,
              "lwc": True, "let": True}
    PRESETS[f"omniquant-w{_bits}a{_bits}"] = {"stages": [{**_stage, "epochs": 2}], "calibration": _OMNI_CPU}
    PRESETS[f"omniquant-w{_bits}a{_bits}-paper"] = {"stages": [{**_stage, "epochs": 20, "aug_loss": _bits == 4}],
                                                    "calibration": _OMNI_PAPER}
for _bits, _group in ((4, "channel"), (3, "channel"), (4, 128), (3, 128)):
    _suffix = f"g{_group}" if isinstance(_group, int) else ""
    _stage = {"method": "omniquant", "bits": _bits, "group_size": _group, "lwc": True, "let": False}
    PRESETS[f"omniquant-w{_bits}a16{_suffix}"] = {"stages": [{**_stage, "epochs": 2}], "calibration": _OMNI_CPU}
    PRESETS[f"omniquant-w{_bits}a16{_suffix}-paper"] = {"stages": [{**_stage, "epochs": 20}], "calibration": _OMNI_PAPER}

# Weight-only W4 g64 with the LM head quantized to 8 bits per channel (`quantize_head`): what slimlm's runner
# decodes fastest on CPUs with the packed kernels (benchmarks/deploy.py); the embedding stays float
# (-emb8: quantized too, sharing the head's codes when tied: the smallest file). W8 with an 8-bit head: the
# whole model 8-bit.
for _method in ("rtn", "gptq", "awq"):
    PRESETS[f"{_method}-w4g64-head8"] = {"stages": [{"method": "quantize_head", "bits": 8},
                                                    {"method": _method, "bits": 4, "group_size": 64}]}
    PRESETS[f"{_method}-w4g64-head8-emb8"] = {
        "stages": [{"method": "quantize_head", "bits": 8, "embedding": True},
                   {"method": _method, "bits": 4, "group_size": 64}]}
PRESETS["rtn-w8-head8"] = {"stages": [{"method": "quantize_head", "bits": 8},
                                      {"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True}]}

# Low-rank factorization (`slimlm.lowrank`), each at 10 / 20 / 30 % fewer parameters in the decoder linears:
# truncated SVD (no data), ASVD (activation scaling, alpha searched, sensitivity-based ranks), ASVD with SVD-LLM
# whitening, and LPLR's 8-bit factors at the bytes SVD's 16-bit factors take at that reduction.
for _percent in (10, 20, 30):
    _fraction = _percent / 100
    PRESETS[f"svd-{_percent}"] = {"stages": [{"method": "svd", "parameter_reduction": _fraction}]}
    PRESETS[f"asvd-{_percent}"] = {"stages": [{"method": "asvd", "parameter_reduction": _fraction}]}
    PRESETS[f"asvd-whiten-{_percent}"] = {"stages": [{"method": "asvd", "parameter_reduction": _fraction,
                                                      "scaling": "whitening"}]}
    PRESETS[f"lplr-8bit-{_percent}"] = {"stages": [{"method": "lplr", "bytes_reduction": _fraction, "bits": 8}]}
# LASER: the paper's search over every block and matrix (slow: blocks x 7 x 8 evaluations), and its cheaper
# common case, the MLP matrices of the last quarter of the blocks; scored on WikiText-2's validation split.
_LASER_DATA = {"corpus": "wikitext2", "samples": 8, "seqlen": 512}
PRESETS["laser"] = {"stages": [{"method": "laser"}], "calibration": _LASER_DATA}
PRESETS["laser-late-mlp"] = {"stages": [{"method": "laser", "blocks": [-8, -7, -6, -5, -4, -3, -2, -1],
                                         "matrices": ["gate", "up", "down"]}], "calibration": _LASER_DATA}
# Low-rank error compensation after a compression stage: LoRC (SVD of W - W_hat) and EoRA (in the eigenspace of
# the inputs) at ranks 8 / 16 / 32 / 64, on GPTQ W3 g64, RTN W4 per channel and SparseGPT 2:4.
_COMPENSATED = {"gptq-w3g64": {"method": "gptq", "bits": 3, "group_size": 64},
                "rtn-w4ch": {"method": "rtn", "bits": 4, "group_size": "channel"},
                "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"}}
for _base, _stage in _COMPENSATED.items():
    for _method in ("lorc", "eora"):
        for _rank in (8, 16, 32, 64):
            PRESETS[f"{_base}+{_method}-r{_rank}"] = {"stages": [_stage, {"method": _method, "rank": _rank}]}
