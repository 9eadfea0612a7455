"""Time `Int8Linear` (W8A8: int8 GEMM via torch._int_mm, with the activation quantization and the
rescale included) against float32 F.linear at SmolLM2-135M's linear shapes, on one thread.

    OMP_NUM_THREADS=1 python benchmarks/w8a8_matmul.py [--repeats 30] [--out benchmarks/results/w8a8_matmul]
                                                       [--model smollm2-135m]

writes OUT.json and OUT.md and prints the table. With --model, also the whole model: prefill latency of
512 random tokens, float32 against `rtn-w8a8` (timed in alternating rounds), and pydoc perplexity over
4 windows of 512 tokens (a quick sanity check of quality, not a benchmark of it).

Each cell is the median of `repeats` timed calls after two warm-up calls; the "kernel only" column
is torch._int_mm alone on ready int8 operands (what the quantize + rescale steps add is the rest).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.quant.w8a8 import Int8Linear

SHAPES = ((576, 576), (576, 1536), (1536, 576))  # q/o projections, gate/up, down
TOKENS = (1, 128, 512)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def measure(in_features: int, out_features: int, tokens: int, repeats: int, granularity: str, symmetric: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    x = torch.randn(tokens, in_features, generator=generator)
    layer = Int8Linear.from_float(weight, None, 8, granularity, symmetric)
    if granularity == "per_tensor":
        layer.input_quantizer.observe(x)
    codes, _, _ = layer.input_quantizer.quantize(x)
    float_ms = median_ms(lambda: F.linear(x, weight), repeats)
    int8_ms = median_ms(lambda: layer(x), repeats)
    kernel_ms = median_ms(lambda: torch._int_mm(codes, layer.weight.t()), repeats)
    layer.use_int8_kernel = False
    reference_ms = median_ms(lambda: layer(x), repeats)
    return {"shape": f"{in_features}->{out_features}", "tokens": tokens, "activations": granularity,
            "symmetric": symmetric, "float32_ms": float_ms, "int8_ms": int8_ms, "int8_kernel_only_ms": kernel_ms,
            "fake_quant_reference_ms": reference_ms, "speedup": float_ms / int8_ms}


@torch.no_grad()
def whole_model(spec: str, repeats: int = 3) -> dict:
    import copy

    import slimlm
    from slimlm.compress import compress

    loaded = slimlm.load_model(spec)
    models = {"float32": loaded.model, "rtn-w8a8": copy.deepcopy(loaded.model)}
    compress(models["rtn-w8a8"], "rtn-w8a8")
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits both alike
        for name, model in models.items():
            times[name].append(median_ms(lambda: model(ids, use_cache=False), 1))
    result = {"model": spec, "prefill_tokens": 512}
    for name, model in models.items():
        result[f"{name}_prefill_ms"] = statistics.median(times[name])
        result[f"{name}_pydoc_ppl"] = slimlm.perplexity(model, loaded.tokenizer, "pydoc", seqlen=512, max_windows=4).ppl
    return result


def model_table(r: dict) -> str:
    return ("\n| model | prefill 512 tokens ms | pydoc ppl (4 x 512) |\n|---|---|---|\n" + "".join(
        f"| {r['model']} {name} | {r[f'{name}_prefill_ms']:.0f} | {r[f'{name}_pydoc_ppl']:.3f} |\n"
        for name in ("float32", "rtn-w8a8")))


def table(rows: list[dict], threads: int) -> str:
    lines = [f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"{threads} thread(s), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"command: {' '.join(['python'] + sys.argv)}", "",
             "| shape | tokens | activations | float32 ms | int8 ms | int8 kernel only ms | fake-quant ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = f"{r['activations']} {'sym' if r['symmetric'] else 'asym'}"
        lines.append(f"| {r['shape']} | {r['tokens']} | {grid} | {r['float32_ms']:.3f} | {r['int8_ms']:.3f} | "
                     f"{r['int8_kernel_only_ms']:.3f} | {r['fake_quant_reference_ms']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="also time the whole model's prefill, float32 against rtn-w8a8")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "w8a8_matmul"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(k, n, t, args.repeats, granularity, symmetric)
            for granularity, symmetric in (("per_token", True), ("per_token", False), ("per_tensor", True))
            for k, n in SHAPES for t in TOKENS]
    text = table(rows, args.threads)
    model = whole_model(args.model) if args.model else None
    if model:
        text += model_table(model)
    print(text)
    Path(args.out + ".md").write_text("# W8A8 int8 GEMM vs float32 (SmolLM2-135M linear shapes)\n\n" + text)
    Path(args.out + ".json").write_text(json.dumps(
        {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
         "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "rows": rows, "whole_model": model}, indent=2) + "\n")


if __name__ == "__main__":
    main()
