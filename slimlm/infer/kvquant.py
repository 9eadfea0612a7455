"""KVQuant: pre-RoPE per-channel keys, per-token values, a calibrated non-uniform datatype, sparse outliers.

Hooper et al., NeurIPS 2024, "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization" (arXiv:2401.18079), Sec. 3.1-3.6. Per layer and sequence the cache stores:

- **keys before RoPE, per channel** (Sec. 3.1-3.2): the k_proj output (the pre-RoPE key) of each
  token as one vector over the layer's C = kv_heads * head_dim channels; every channel c has an
  offset o_c and a half-range r_c calibrated *offline* from the 1 - f/2 and f/2 percentiles of that
  channel over the calibration tokens (f the outlier fraction, 1% by default), so a key is normalised
  as (k_c - o_c) / r_c and values outside [-1, 1] are outliers. Keys are stored un-rotated and the
  runner rotates them at their cache position on every read (`rotate_on_read = True`, as the
  attention-sinks cache does);
- **values per token** (Sec. 3.1, 3.5): per token, the f * C / 2 largest and f * C / 2 smallest
  entries (rounded; computed *online*) are outliers; the rest give the token's offset and
  half-range ((max + min) / 2, (max - min) / 2, float16);
- **nuq datatype** (Sec. 3.3): per layer one codebook of 2^b levels for keys and one for values,
  fitted offline by k-means on the normalised calibration activations (outliers excluded), each
  activation weighted by its Fisher information, the squared gradient of the LM loss with respect
  to it (the paper's sensitivity weighting); codes index the codebook (nearest level);
- **dense-and-sparse** (Sec. 3.4): outliers are kept exactly in float16 in a sparse layout (per
  token a count, then int16 channel positions and float16 values: CSR rows); the dense codes hold
  the clamped value at those positions and are overwritten on read;
- **attention sink** (Sec. 3.6, "attention sink-aware quantization"): the first token of every
  sequence keeps its keys and values in full precision (the model's dtype).

Storage per layer and sequence: key codes [tokens, ceil(C * b / 8)] and value codes likewise (packed
with `slimlm.core.packing`), value offset and half-range [tokens] float16, outlier counts [tokens]
int16 and outlier positions (int16) and values (float16) for keys and for values, the sink token
[kv_heads, 1, head_dim]. Per cache (shared by the batch, counted once in `bytes_held`): per layer the
key offsets and half-ranges [C] float16 and the two codebooks [2^b] float16.

Calibration (`calibrate_kvquant`, `calibrate_from_corpus`): segments of the calibration split (16 x
512 tokens of WikiText-2 by default; the paper uses 16 x 2048) run through the Hugging Face model with
forward hooks that make each k_proj / v_proj output a leaf tensor, so one backward pass of the mean
next-token loss gives their gradients without any parameter gradient. The first position of every
segment is left out of the statistics (it is kept in full precision at run time). The k-means runs on
a 4096-bin weighted histogram of the normalised activations (each bin at its weighted mean), which
makes it cheap at the resolution of 1/2048 of the range.

Deviations from the paper and its reference code (`SqueezeAILab/KVQuant`, `quant/kvquant`):
- the codebook k-means uses two deterministic starts (weighted quantiles, even spacing) and Lloyd's
  iterations on the weighted histogram instead of scikit-learn's k-means++ on every activation (a
  value token and a key's per-channel statistics span all KV heads of a layer, as the reference code's
  v_proj / k_proj outputs do);
- value outliers are the top and bottom round(f * C / 2) entries of each token (the reference takes a
  quantile with interpolation); key outliers use the calibrated thresholds as the reference does;
- Q-Norm (the paper's optional mean/std correction of the dequantized distribution) is not
  implemented, nor the parallel top-k outlier kernels or the fused CUDA kernels: codes are dequantized
  in PyTorch on every read, so the saving is in what is held between steps;
- the calibration uses 512-token segments by default (options `--kv-calibration-seqlen`,
  `--kv-calibration-samples`) to stay within about a minute on CPU;
- the sink token is kept in the model's dtype (the paper: float16); the tokens written by the current
  step are read back in full precision (`QuantizedCacheBase.read`), as for the other caches.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from slimlm.core.packing import pack, packed_bytes, unpack
from slimlm.errors import SlimlmError
from slimlm.infer.cache import CacheShape
from slimlm.infer.quantized_cache import _FP16_MIN_SCALE, KV_BITS, KVQuantSpec, LayerStoreCache, tensor_bytes
from slimlm.quant.grid import fit_weighted_codebook

HISTOGRAM_BINS = 4096
DEFAULT_SAMPLES, DEFAULT_SEQLEN, DEFAULT_CORPUS = 16, 512, "wikitext2"


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCalibration:
    key_offset: torch.Tensor  # [C] float16: per-channel centre of the non-outlier range
    key_range: torch.Tensor  # [C] float16: per-channel half-range (>= 2^-14)
    key_codebook: torch.Tensor  # [2^b] float16, sorted: levels of normalised keys
    value_codebook: torch.Tensor  # [2^b] float16, sorted: levels of normalised values

    @property
    def channels(self) -> int:
        return self.key_offset.numel()

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.key_offset, self.key_range, self.key_codebook, self.value_codebook))

    def to(self, device) -> "LayerCalibration":
        return LayerCalibration(*(t.to(device) for t in (self.key_offset, self.key_range, self.key_codebook,
                                                          self.value_codebook)))


@dataclass
class KVQuantCalibration:
    bits: int
    outliers: float
    layers: list[LayerCalibration]
    segments: int = 0
    seqlen: int = 0
    source: str = "ids"

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def describe(self) -> dict:
        return {"bits": self.bits, "outliers": self.outliers, "segments": self.segments, "seqlen": self.seqlen,
                "source": self.source, "bytes": self.nbytes()}


def check_calibration_options(samples: int, seqlen: int) -> None:
    for name, value, least in (("samples", samples, 1), ("seqlen", seqlen, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SlimlmError(f"KVQuant calibration {name} must be an integer >= {least}, got {value!r}")


def _check_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise SlimlmError(f"KV cache quantization supports {', '.join(map(str, KV_BITS))} bits (got {bits})")


def _value_outlier_count(outliers: float, channels: int) -> int:
    """Outliers per side of one value token (the largest and the smallest entries)."""
    return min(int(round(outliers * channels / 2)), (channels - 1) // 2)


def _value_normalise(x: torch.Tensor, outliers: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, C] -> (outlier mask, offset [tokens] fp16, half-range [tokens] fp16, normalised [tokens, C])."""
    x = x.float()
    side = _value_outlier_count(outliers, x.shape[1])
    mask = torch.zeros_like(x, dtype=torch.bool)
    if side:
        mask.scatter_(1, x.topk(side, dim=1).indices, True)
        mask.scatter_(1, (-x).topk(side, dim=1).indices, True)
    high = torch.where(mask, -torch.inf, x).amax(dim=1)
    low = torch.where(mask, torch.inf, x).amin(dim=1)
    offset = ((high + low) / 2).half()
    half_range = ((high - low) / 2).clamp(min=_FP16_MIN_SCALE).half()
    normalised = (x - offset.float()[:, None]) / half_range.float()[:, None]
    return mask, offset, half_range, normalised


def _key_params(keys: torch.Tensor, outliers: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel offset and half-range (float16) from calibration keys [tokens, C]."""
    keys = keys.float()
    if outliers > 0:
        bounds = torch.tensor([outliers / 2, 1 - outliers / 2], dtype=torch.float32)
        low, high = torch.quantile(keys, bounds, dim=0)
    else:
        low, high = keys.amin(dim=0), keys.amax(dim=0)
    return ((high + low) / 2).half(), ((high - low) / 2).clamp(min=_FP16_MIN_SCALE).half()


def _weighted_histogram(normalised: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-outlier normalised values (in [-1, 1]) and weights -> per-bin weighted means and bin weights."""
    bins = ((normalised + 1) / 2 * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
    mass = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64).scatter_add_(0, bins, weights.double())
    moment = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64).scatter_add_(0, bins, (weights * normalised).double())
    count = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64).scatter_add_(0, bins,
                                                                          torch.ones_like(bins, dtype=torch.float64))
    used = count > 0
    centre = (torch.arange(HISTOGRAM_BINS, dtype=torch.float64) + 0.5) / HISTOGRAM_BINS * 2 - 1
    means = torch.where(mass > 0, moment / mass.clamp_min(1e-300), centre)
    return means[used].float(), mass[used].float()


def fit_nuq_codebook(normalised: torch.Tensor, fisher: torch.Tensor, bits: int) -> torch.Tensor:
    """Sensitivity-weighted k-means codebook (2^bits sorted levels, float16) of normalised activations
    (outliers already removed: values in [-1, 1]) weighted by their Fisher information."""
    normalised, fisher = normalised.reshape(-1).float(), fisher.reshape(-1).float()
    if normalised.numel() == 0:
        raise SlimlmError("KVQuant calibration saw no activation inside the outlier thresholds")
    scale = fisher.mean()
    weights = fisher / scale if scale > 0 else torch.ones_like(fisher)
    values, mass = _weighted_histogram(normalised.clamp(-1, 1), weights)
    return fit_weighted_codebook(values, mass, bits).half()


def _calibrate_layer(keys, key_fisher, values, value_fisher, bits: int, outliers: float) -> LayerCalibration:
    key_offset, key_range = _key_params(keys, outliers)
    normalised = (keys.float() - key_offset.float()) / key_range.float()
    inside = normalised.abs() <= 1
    key_codebook = fit_nuq_codebook(normalised[inside], key_fisher[inside], bits)
    mask, _, _, normalised = _value_normalise(values, outliers)
    value_codebook = fit_nuq_codebook(normalised[~mask], value_fisher[~mask], bits)
    return LayerCalibration(key_offset, key_range, key_codebook, value_codebook)


def calibrate_kvquant(model, segments: torch.Tensor, bits: int, outliers: float = 0.01,
                      source: str = "ids") -> KVQuantCalibration:
    """Offline KVQuant calibration from `segments` [n, L] token ids (L >= 2): per-layer key thresholds and
    Fisher-weighted nuq codebooks (see the module docstring). Runs one forward and backward per segment."""
    from slimlm.infer.runner import ModelRunner
    from slimlm.models.loss import next_token_loss

    _check_bits(bits)
    KVQuantSpec("kvquant", bits, outliers=outliers)  # checks the outlier fraction
    if segments.dim() != 2 or segments.shape[0] < 1 or segments.shape[1] < 2:
        raise SlimlmError(f"KVQuant calibration needs segments [n, L >= 2] of token ids, got {tuple(segments.shape)}")
    runner = ModelRunner(model, fast_kernels=False)  # exact; the cache is only used through the runner
    if any(len(plan.projections) != 3 or plan.k_norm is not None for plan in runner.plans):
        raise SlimlmError(f"KVQuant calibration reads the cached keys and values at the k and v projections' "
                          f"outputs, but {runner.family} fuses those projections or normalizes its keys after them; "
                          "use the kivi or naive KV cache for this model")
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def capture(_module, _inputs, output):
            leaf = output.detach().requires_grad_(True)  # a leaf: its .grad is kept, no parameter gradients
            captured[key] = leaf
            return leaf
        return capture

    handles = []
    for index, plan in enumerate(runner.plans):
        _, key, value = plan.projections
        handles.append(key.register_forward_hook(hook((index, "k"))))
        handles.append(value.register_forward_hook(hook((index, "v"))))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gathered: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # activations, Fisher
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for segment in segments:
            captured.clear()
            with torch.enable_grad():
                loss = next_token_loss(model, segment[None].to(runner.device))
                loss.backward()
            for key, leaf in captured.items():
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                # position 0 stays in full precision at run time: left out of the statistics
                gathered.setdefault(key, []).append((leaf.detach()[0, 1:].float().cpu(),
                                                     grad[0, 1:].float().pow(2).cpu()))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    layers = []
    for index in range(len(runner.layers)):
        keys, key_fisher = (torch.cat(parts) for parts in zip(*gathered[(index, "k")]))
        values, value_fisher = (torch.cat(parts) for parts in zip(*gathered[(index, "v")]))
        layers.append(_calibrate_layer(keys, key_fisher, values, value_fisher, bits, outliers))
    return KVQuantCalibration(bits, float(outliers), layers, segments.shape[0], segments.shape[1], source)


def calibrate_from_corpus(model, tokenizer, spec: KVQuantSpec, samples: int = DEFAULT_SAMPLES,
                          seqlen: int = DEFAULT_SEQLEN, corpus: str = DEFAULT_CORPUS,
                          data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                          quiet: bool = False) -> KVQuantSpec:
    """`spec` with a calibration from `samples` segments of `seqlen` tokens of `corpus`'s calibration split."""
    from dataclasses import replace

    from slimlm.data.calibration import calibration_samples

    if spec.method != "kvquant":
        return spec
    check_calibration_options(samples, seqlen)
    segments = calibration_samples(tokenizer, corpus, samples, seqlen, seed, data_dir)
    if not quiet:
        print(f"KVQuant: calibrating {spec.name} on {samples} x {seqlen} tokens of {corpus} "
              "(Fisher-weighted codebooks, key outlier thresholds)...", file=sys.stderr, flush=True)
    calibration = calibrate_kvquant(model, segments, spec.bits, spec.outliers,
                                    source=f"{corpus} calibration split, seed {seed}")
    return replace(spec, calibration=calibration)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


class _SparseRows:
    """Per-token outliers: counts [tokens] int16, positions [n] int16, values [n] float16 (CSR rows)."""

    def __init__(self, device):
        self.counts = torch.empty(0, dtype=torch.int16, device=device)
        self.positions = torch.empty(0, dtype=torch.int16, device=device)
        self.values = torch.empty(0, dtype=torch.float16, device=device)

    def append(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        self.counts = torch.cat([self.counts, mask.sum(dim=1).to(torch.int16)])
        self.positions = torch.cat([self.positions, cols.to(torch.int16)])
        self.values = torch.cat([self.values, x[rows, cols].half()])

    def scatter(self, dense: torch.Tensor) -> torch.Tensor:
        if self.values.numel():
            rows = torch.repeat_interleave(torch.arange(self.counts.numel(), device=dense.device), self.counts.long())
            dense[rows, self.positions.long()] = self.values.to(dense.dtype)
        return dense

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.counts, self.positions, self.values))


class _KVQuantLayer:
    """One sequence's keys (pre-RoPE) and values of one layer."""

    def __init__(self, heads: int, head_dim: int, bits: int, outliers: float, calibration: LayerCalibration,
                 dtype, device):
        self.heads, self.dim, self.bits, self.outliers = heads, head_dim, bits, outliers
        self.calibration = calibration
        channels = heads * head_dim
        self.sink_keys = torch.empty(heads, 0, head_dim, dtype=dtype, device=device)
        self.sink_values = torch.empty_like(self.sink_keys)
        self.key_codes = torch.empty(0, packed_bytes(channels, bits), dtype=torch.uint8, device=device)
        self.value_codes = torch.empty_like(self.key_codes)
        self.value_offset = torch.empty(0, dtype=torch.float16, device=device)
        self.value_range = torch.empty_like(self.value_offset)
        self.key_outliers, self.value_outliers = _SparseRows(device), _SparseRows(device)

    @property
    def tokens(self) -> int:
        return self.sink_keys.shape[1] + self.key_codes.shape[0]

    def _codes(self, normalised: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        table = codebook.float()
        midpoints = (table[1:] + table[:-1]) / 2
        return pack(torch.searchsorted(midpoints, normalised.contiguous()).to(torch.uint8), self.bits)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [heads, tokens, D]; k before RoPE."""
        if not self.sink_keys.shape[1]:  # the sequence's first token: the attention sink, full precision
            self.sink_keys, self.sink_values = k[:, :1].clone(), v[:, :1].clone()
            k, v = k[:, 1:], v[:, 1:]
        if not k.shape[1]:
            return
        cal = self.calibration
        keys = k.transpose(0, 1).reshape(k.shape[1], -1).float()  # [tokens, C]
        values = v.transpose(0, 1).reshape(v.shape[1], -1).float()
        normalised = (keys - cal.key_offset.float()) / cal.key_range.float()
        mask = normalised.abs() > 1
        self.key_codes = torch.cat([self.key_codes, self._codes(normalised.clamp(-1, 1), cal.key_codebook)])
        self.key_outliers.append(keys, mask)
        mask, offset, half_range, normalised = _value_normalise(values, self.outliers)
        self.value_codes = torch.cat([self.value_codes, self._codes(normalised.clamp(-1, 1), cal.value_codebook)])
        self.value_offset = torch.cat([self.value_offset, offset])
        self.value_range = torch.cat([self.value_range, half_range])
        self.value_outliers.append(values, mask)

    def _levels(self, packed: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        codes = unpack(packed, self.bits, self.heads * self.dim)
        return codebook.float()[codes.long()]

    def read(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cal, tokens = self.calibration, self.key_codes.shape[0]
        keys = self._levels(self.key_codes, cal.key_codebook) * cal.key_range.float() + cal.key_offset.float()
        keys = self.key_outliers.scatter(keys)
        values = (self._levels(self.value_codes, cal.value_codebook) * self.value_range.float()[:, None]
                  + self.value_offset.float()[:, None])
        values = self.value_outliers.scatter(values)

        def heads_first(x):
            return x.reshape(tokens, self.heads, self.dim).transpose(0, 1).to(dtype)

        return (torch.cat([self.sink_keys.to(dtype), heads_first(keys)], dim=1),
                torch.cat([self.sink_values.to(dtype), heads_first(values)], dim=1))

    def nbytes(self) -> int:
        return (sum(tensor_bytes(t) for t in (self.sink_keys, self.sink_values, self.key_codes, self.value_codes,
                                              self.value_offset, self.value_range))
                + self.key_outliers.nbytes() + self.value_outliers.nbytes())


class KVQuantCache(LayerStoreCache):
    """KVQuant quantized KV cache: keys stored before RoPE (rotated on read), see the module docstring."""

    rotate_on_read = True

    def __init__(self, shape: CacheShape, batch: int, spec: KVQuantSpec):
        if spec.method != "kvquant":
            raise SlimlmError(f"KVQuantCache needs a kvquant spec, got {spec.name}")
        calibration = spec.calibration
        if calibration is None:
            raise SlimlmError(f"{spec.name} needs an offline calibration: calibrate_kvquant(model, segments, bits) "
                              "or calibrate_from_corpus(model, tokenizer, spec) (the CLI calibrates on "
                              "--kv-calibration-corpus)")
        if calibration.bits != spec.bits or calibration.outliers != spec.outliers:
            raise SlimlmError(f"the KVQuant calibration is for {calibration.bits} bits and outlier fraction "
                              f"{calibration.outliers}, the cache asks for {spec.bits} and {spec.outliers}")
        channels = [h * shape.head_dim for h in shape.kv_heads]
        if [layer.channels for layer in calibration.layers] != channels:
            raise SlimlmError("the KVQuant calibration was made for another model (per-layer KV channels "
                              f"{[layer.channels for layer in calibration.layers]}, this model {channels})")
        super().__init__(shape, batch, spec)
        self.calibration = [layer.to(shape.device) for layer in calibration.layers]
        self._init_stores()

    def _new(self, layer: int) -> _KVQuantLayer:
        return _KVQuantLayer(self.shape.kv_heads[layer], self.shape.head_dim, self.spec.bits, self.spec.outliers,
                             self.calibration[layer], self.shape.dtype, self.shape.device)

    def constant_bytes(self) -> int:
        """Per-cache constants: per-channel key offsets and ranges, codebooks (shared by every sequence)."""
        return sum(layer.nbytes() for layer in self.calibration)

    def bytes_held(self) -> int:
        return super().bytes_held() + self.constant_bytes()

    def token_bytes(self) -> int:
        """Nominal bytes of one quantized token, all layers: codes, value offset and range, outlier counts and
        the expected outliers (keys: the calibrated fraction; values: the fixed per-token count), each outlier
        an int16 position and a float16 value. `bytes_per_token` is the measured figure."""
        total = 0
        for heads in self.shape.kv_heads:
            channels = heads * self.shape.head_dim
            expected = round(self.spec.outliers * channels) + 2 * _value_outlier_count(self.spec.outliers, channels)
            total += 2 * packed_bytes(channels, self.spec.bits) + 2 * 2 + 2 * 2 + 4 * expected
        return total

    def outlier_fraction(self) -> tuple[float, float]:
        """(keys, values): fraction of the quantized entries held as sparse outliers, over all layers."""
        counts = {"k": 0, "v": 0}
        entries = 0
        for index in range(self.shape.layers):
            for state in self.layers[index]:
                counts["k"] += state.key_outliers.values.numel()
                counts["v"] += state.value_outliers.values.numel()
                entries += state.key_codes.shape[0] * state.heads * state.dim
        return (counts["k"] / entries, counts["v"] / entries) if entries else (0.0, 0.0)
