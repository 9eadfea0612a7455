"""Efficiency metrics as the compression surveys define them.

- Parameter count: unique parameters (tied embedding and head counted once). Modules that store
  compressed weights report their logical count through a `num_logical_params()` method.
- Size in bytes by actual storage: in memory (every unique tensor storage of parameters and
  buffers) and on disk (the checkpoint `slimlm.save` writes: weights, safetensors header, configs;
  tokenizer files left out).
- Compression ratio: original size / compressed size.
- FLOPs per token from the architecture (a multiply-add counts 2 FLOPs): every linear layer of the
  blocks (a low-rank layer: 2 r (in + out)) and the LM head, plus attention scores and the weighted
  sum of values (4 * heads * head_dim FLOPs per attended position). Decode at context L attends to L
  positions; the prefill of L tokens attends to 1..L (causal), so its per-token average is
  4 * heads * head_dim * (L + 1) / 2.
  Layers with a sliding window attend to at most `window` positions. Norms, activations, rotary
  embeddings and the softmax are left out (under 1% for the models here).
- Latency: prefill of a prompt (one forward pass that fills the KV cache) and per-token decode
  (greedy steps with the KV cache), median over repeats after a warm-up; throughput = generated
  tokens per second (batch * steps / decode time); speedup = baseline latency / latency.
- MFU = achieved FLOP/s / peak FLOP/s, with the peak measured by a float32 matmul micro-benchmark on
  this machine (or given by the user).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.progress import progress


def count_parameters(model: nn.Module) -> int:
    """Unique parameters; compressed modules report their logical count."""
    total, seen = 0, set()
    for module in model.modules():
        if hasattr(module, "num_logical_params"):
            total += module.num_logical_params()
            seen.update(id(p) for p in module.parameters())
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes of every unique tensor storage the model holds (parameters and buffers)."""
    storages: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def directory_bytes(directory: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def disk_bytes(model: PreTrainedModel) -> int:
    """Bytes on disk of the model saved as a slimlm checkpoint (weights, safetensors header, configs)."""
    from slimlm.export.native import model_bytes, save

    with tempfile.TemporaryDirectory(prefix="slimlm-size-") as directory:
        return model_bytes(save(model, Path(directory) / "model"))


def compression_ratio(original_bytes: int, compressed_bytes: int) -> float:
    if compressed_bytes <= 0:
        raise SlimlmError(f"compressed size must be positive (got {compressed_bytes})")
    return original_bytes / compressed_bytes


@dataclass(frozen=True)
class FlopsPerToken:
    context: int
    linear: int  # block linears, per token
    lm_head: int
    attention_decode: int  # attention at context `context`, one new token
    attention_prefill: int  # average per token over a causal prefill of `context` tokens

    @property
    def decode(self) -> int:
        return self.linear + self.lm_head + self.attention_decode

    @property
    def prefill(self) -> int:
        return self.linear + self.lm_head + self.attention_prefill

    def to_dict(self) -> dict:
        return {**asdict(self), "decode": self.decode, "prefill": self.prefill}


def _attention_windows(config, layers: int) -> list[int | None]:
    """Per layer: the sliding window size, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * layers


def flops_per_token(model: PreTrainedModel, context: int = 2048) -> FlopsPerToken:
    """Forward FLOPs per token from the architecture (see the module docstring)."""
    if context < 1:
        raise SlimlmError(f"context length must be at least 1 (got {context})")
    adapter = ModelAdapter(model)
    linear = sum(_linear_flops(module) for module in adapter.linear_layers().values())
    head_in, head_out = adapter.lm_head.weight.shape[1], adapter.lm_head.weight.shape[0]
    decode = prefill = 0
    for block, window in zip(adapter, _attention_windows(model.config, len(adapter))):
        width = _attention_width(block)
        decode += 4 * width * min(context, window or context)
        # Causal prefill: position i attends to min(i, window) positions; averaged over i = 1..L.
        span = window or context
        prefill += 4 * width * sum(min(i, span) for i in range(1, context + 1)) // context
    return FlopsPerToken(context, linear, 2 * head_in * head_out, decode, prefill)


def _linear_flops(module: nn.Module) -> int:
    """2 in out per token, or what a layer that factorizes its weight reports (`LowRankLinear`)."""
    if hasattr(module, "matmul_flops_per_token"):
        return module.matmul_flops_per_token()
    in_features, out_features = linear_shape(module)
    return 2 * in_features * out_features


def _attention_width(block) -> int:
    """heads * head_dim of the query projection (what the scores and value sums are computed over)."""
    if "q" in block.linears:
        return linear_shape(block.linears["q"])[1]
    return linear_shape(block.linears["qkv"])[1] // 3


def measure_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    """Best float32 matmul FLOP/s on this machine (the MFU denominator)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@dataclass(frozen=True)
class LatencyResult:
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # median time of one prefill of `batch` prompts
    decode_s_per_token: float  # median time of one decode step (one token for each sequence)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # batch / decode step time
    prefill_flops_per_s: float
    decode_flops_per_s: float
    repeats: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_latency(
    model: PreTrainedModel,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> LatencyResult:
    """Prefill and decode latency with the KV cache, greedy, on random prompt tokens."""
    if min(prompt_tokens, new_tokens, batch, repeats) < 1:
        raise SlimlmError("prompt_tokens, new_tokens, batch and repeats must all be at least 1")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    _generate(model, prompt[:, :8], 2)  # warm-up: first calls allocate and pick kernels
    prefills, steps = [], []
    for _ in progress(range(repeats), desc=f"latency b{batch}", total=repeats):
        prefill, step_times = _generate(model, prompt, new_tokens)
        prefills.append(prefill)
        steps.extend(step_times)
    prefill_s, step_s = statistics.median(prefills), statistics.median(steps)
    flops = flops_per_token(model, context=prompt_tokens)
    decode_flops = flops_per_token(model, context=prompt_tokens + new_tokens // 2).decode
    return LatencyResult(
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_s=prefill_s,
        decode_s_per_token=step_s,
        prefill_tokens_per_s=batch * prompt_tokens / prefill_s,
        decode_tokens_per_s=batch / step_s,
        prefill_flops_per_s=flops.prefill * batch * prompt_tokens / prefill_s,
        decode_flops_per_s=decode_flops * batch / step_s,
        repeats=repeats,
        threads=torch.get_num_threads(),
    )


def _generate(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """Greedy decoding; returns the prefill time and each decode step's time."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    step_times = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_times.append(time.perf_counter() - start)
        cache = out.past_key_values
    return prefill, step_times or [prefill]


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    if peak_flops_per_s <= 0:
        raise SlimlmError(f"peak FLOP/s must be positive (got {peak_flops_per_s})")
    return achieved_flops_per_s / peak_flops_per_s


def count_nonzero_parameters(model: nn.Module) -> int:
    """Unique parameters that are not exactly zero (what a pruned model really keeps); compressed
    modules count their logical parameters."""
    total, seen = 0, set()
    for module in model.modules():
        if hasattr(module, "num_logical_params"):
            total += getattr(module, "num_nonzero_params", module.num_logical_params)()
            seen.update(id(p) for p in module.parameters())
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += int(torch.count_nonzero(param))
    return total
