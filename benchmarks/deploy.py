"""Deployment benchmark, slimlm's runner part: do compressed models decode faster, and at what cost?

Writes `benchmarks/results/deploy.{json,md}` (`--quick`: `deploy-quick.*`). Model: SmolLM2-135M float32.
Rows (each a float32 model as `slimlm.load` gives it; inside the generation runner quantized linears
take the decode path `slimlm.quant.kernels` measured fastest on this CPU: slimlm's native kernels
(int8 activations per block of 32, integer dot products; `slimlm.quant.cpu_kernels`), PyTorch's packed
int4 / int8 kernels with bfloat16 activations, or the exact reference path; `SLIMLM_KERNELS` forces one.
The float linears take the native few-row kernel at one to eight tokens where the native path was
chosen; in the compressed rows, whose float tensors are kept as bfloat16 numbers, it reads them from
bfloat16 copies, exactly: "bf16-weights" in the kernel column):

- float32;
- W8: RTN 8-bit symmetric per channel (the int8 packed kernel), alone and with the LM head at 8 bits;
- W4 g64: RTN 4-bit asymmetric g64 (the int4 packed kernel), alone and with the LM head quantized
  (`quantize_head`: 8-bit per channel, or 4-bit g64), and with the 8-bit head shared by the embedding
  (`embedding: true`: the tied matrix stored once, 8-bit);
- W4 g64 GPTQ and W4 g32 GPTQ and AWQ (calibrated on C4), with the 8-bit head;
- W8A8 (RTN, int8 weights per channel and int8 activations per token, `rtn-w8a8`: `Int8Linear`);
- 2:4 (magnitude, `magnitude-2of4`: dense float32 layers with zeros; no sparse kernel, so the speed of
  dense is the target), for speed only: its quality is that of one-shot magnitude pruning.

Every compressed row keeps its unquantized tensors (norms, a float embedding) in the recipe's default
`float_storage: auto` (bfloat16 here, the source being float32); `float_storage` says which.

Columns:
- decode tokens/s at batch 1 and 8 (a 128-token prompt from the embedded pydoc text, 64 new tokens,
  greedy), median of alternating runs in this one process, and the ratio to float32 in the same runs;
  time to first token; the kernel each row's quantized layers took;
- bytes of the saved slimlm checkpoint and the ratio to the float32 one;
- WikiText-2 perplexity of the exact (reference) path (`--windows` x 512 tokens), the perplexity of the
  decode path and its relative difference, and the KL divergence of the decode path from the exact
  path: the same windows run through the runner in chunks of 64 tokens (what decoding computes), once
  with the decode kernels and once exactly;
- weight bytes read per generated token (every linear, head included, as the kernel reads it: packed
  codes with float32 scale and scaled-zero pairs per group for the native kernels, bf16 pairs for the
  packed int4 kernel, int8 codes, float32 or its bfloat16 twin) over a measured single-thread read bandwidth:
  the memory-bandwidth bound on tokens/s, and the fraction of it reached.

Not in this script (issue 15): llama.cpp rows (benchmarks/gguf_export.py), ONNX Runtime rows
(benchmarks/onnx_export.py), speculative rows (benchmarks/speculative.py).

    python benchmarks/deploy.py --data-dir ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS, NEW_TOKENS = 128, 64
W4 = {"method": "rtn", "bits": 4, "group_size": 64}
HEAD8 = {"method": "quantize_head", "bits": 8}
W8 = {"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True}
VARIANTS = {
    "float32": None,
    "W8 ch sym (RTN)": {"stages": [W8]},
    "W8 ch sym (RTN) + head 8-bit": {"stages": [HEAD8, W8]},
    "W4 g64 (RTN)": {"stages": [W4]},
    "W4 g64 (RTN) + head 8-bit": {"stages": [HEAD8, W4]},
    "W4 g64 (RTN) + head and embedding 8-bit": {"stages": [{**HEAD8, "embedding": True}, W4]},
    "W4 g64 (RTN) + head 4-bit g64": {"stages": [{"method": "quantize_head", "bits": 4, "group_size": 64}, W4]},
    "W4 g64 (GPTQ) + head 8-bit": {"stages": [HEAD8, {"method": "gptq", "bits": 4, "group_size": 64}]},
    "W4 g32 (GPTQ) + head 8-bit": {"stages": [HEAD8, {"method": "gptq", "bits": 4, "group_size": 32}]},
    "W4 g32 (AWQ) + head 8-bit": {"stages": [HEAD8, {"method": "awq", "bits": 4, "group_size": 32}]},
    "W8A8 (RTN; per-token int8 activations)": "rtn-w8a8",
    "2:4 (magnitude)": "magnitude-2of4",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="small protocol, to check the script")
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "deploy"))
    args = parser.parse_args()
    if args.quick:
        args.windows, args.repeats = 2, 2
        if Path(args.out).parent == RESULTS:
            args.out += "-quick"
    torch.set_num_threads(1)
    run(args)


def run(args: argparse.Namespace) -> None:
    from slimlm.compress import compress
    from slimlm.data.calibration import calibration_samples, tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.export.native import model_bytes, save
    from slimlm.models.loading import load_model
    from slimlm.quant.kernels import kernel_choice
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    started = time.perf_counter()
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    names = args.variants.split(",")
    calibration = calibration_samples(tokenizer, "c4", 8 if args.quick else 128, 512, 0, args.data_dir)
    models, rows = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            model = loaded.model if VARIANTS[name] is None else copy.deepcopy(loaded.model)
            seconds, storage = 0.0, "float32"
            if VARIANTS[name] is not None:
                start = time.perf_counter()
                storage = compress(model, VARIANTS[name], calibration=calibration).float_storage
                seconds = time.perf_counter() - start
            directory = Path(scratch) / f"m{len(models)}"
            save(model, directory, tokenizer)
            models[name] = model
            rows[name] = {"variant": name, "file_bytes": model_bytes(directory), "compress_s": round(seconds, 1),
                          "float_storage": storage}
            print(f"built {name}", flush=True)
    float_bytes = rows[names[0]]["file_bytes"]
    for row in rows.values():
        row["file_ratio"] = row["file_bytes"] / float_bytes
    choice = kernel_choice()
    prompt_ids = tokenize_corpus(tokenizer, load_corpus("pydoc", split="eval"))[:PROMPT_TOKENS].tolist()
    for batch in (1, 8):
        timings = time_decoding(models, [prompt_ids] * batch, args.repeats)
        base = statistics.median(timings[names[0]]["tokens_per_s"])
        for name, timing in timings.items():
            speed = statistics.median(timing["tokens_per_s"])
            rows[name][f"decode_tok_s_b{batch}"] = speed
            rows[name][f"ratio_b{batch}"] = speed / base
            rows[name][f"ttft_s_b{batch}"] = statistics.median(timing["ttft_s"])
            rows[name]["kernel"] = timing["kernel"]
    bandwidth = read_bandwidth()
    wikitext = tokenize_corpus(tokenizer, load_corpus("wikitext2", split="eval", data_dir=args.data_dir))
    windows = wikitext[: args.windows * 512].reshape(args.windows, 512)
    for name, model in models.items():
        rows[name].update(quality(model, windows))
        read = weight_bytes_per_token(model)
        rows[name]["weight_MB_per_token"] = read / 1e6
        bound = bandwidth / read
        rows[name]["bound_tok_s"] = bound
        rows[name]["bound_fraction_b1"] = rows[name]["decode_tok_s_b1"] / bound
        print(f"quality {name}: {rows[name]['ppl']:.3f}", flush=True)
    record = {"benchmark": "deploy", "model": args.model, "quick": args.quick,
              "protocol": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
                           "wikitext2_windows": f"{args.windows} x 512", "calibration": f"{len(calibration)} x 512 C4",
                           "threads": torch.get_num_threads(), "greedy": True},
              "kernel_choice": choice.to_dict(), "read_bandwidth_GB_s": bandwidth / 1e9,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(),
              "command": shlex.join([sys.executable, *sys.argv]), "seconds": time.perf_counter() - started,
              "rows": list(rows.values())}
    columns = ["variant", "kernel", "decode_tok_s_b1", "ratio_b1", "decode_tok_s_b8", "ratio_b8", "ttft_s_b1",
               "file_bytes", "file_ratio", "float_storage", "ppl", "ppl_decode_path",
               "ppl_decode_vs_exact", "kl_decode_vs_exact", "kl_to_float32",
               "weight_MB_per_token", "bound_tok_s", "bound_fraction_b1", "compress_s"]
    preamble = (f"# Deployment benchmark: slimlm's runner ({'quick protocol' if args.quick else 'full protocol'})\n\n"
                f"Model {args.model} (float32 checkpoints), {torch.get_num_threads()} torch thread, {record['date']}, "
                f"CPU {record['machine']['cpu']} (flags: {', '.join(choice.cpu_flags)}; torch capability "
                f"{choice.torch_capability}). Kernel choice for float32 decoding: {choice.label} ({choice.reason}). "
                f"Read bandwidth (one thread, measured): {bandwidth / 1e9:.1f} GB/s. Command: `{record['command']}`. "
                "Speeds are medians of alternating runs in this one process; compare ratios, not absolute numbers "
                "(other work shared the 2 cores). See the docstring of benchmarks/deploy.py for the protocol. "
                "File sizes against llama.cpp's own GGUF files: benchmarks/results/file_sizes.md.")
    json_path, md_path = write_results(args.out, [record], markdown_table(list(rows.values()), columns), preamble)
    print(preamble + "\n\n" + markdown_table(list(rows.values()), columns))
    print(f"wrote {json_path} and {md_path}")


def time_decoding(models: dict, prompts: list[list[int]], repeats: int) -> dict[str, dict]:
    """Alternating greedy generations of NEW_TOKENS tokens; tokens/s of the decode steps and TTFT per model."""
    from slimlm.infer import generate_ids

    timings = {name: {"tokens_per_s": [], "ttft_s": [], "kernel": ""} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            result = generate_ids(model, prompts, NEW_TOKENS)
            stats = result.stats
            timings[name]["tokens_per_s"].append(len(prompts) / stats.per_token_s)
            timings[name]["ttft_s"].append(stats.time_to_first_token_s)
            paths = sorted({m.last_path for m in model.modules()  # quantized linears, not embeddings
                            if getattr(m, "is_compressed_linear", False) and hasattr(m, "last_path")})
            timings[name]["kernel"] = "+".join(paths + float_linear_paths(model)) or "float32"
    return timings


def float_linear_paths(model) -> list[str]:
    """How the runner's native path reads the float linears left (the head of a weight-only model): "bf16-weights"
    where their values are bfloat16 numbers (bfloat16 float_storage; `slimlm.infer.runner.bfloat16_twin`)."""
    from slimlm.infer.runner import bfloat16_twin
    from slimlm.quant.kernels import kernel_choice

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    if kernel_choice().path != "native" or not linears:  # the generation runner's decode path
        return []
    return ["bf16-weights"] if all(bfloat16_twin(m.weight) is not m.weight for m in linears) else []


@torch.no_grad()
def quality(model, windows: torch.Tensor, chunk: int = 64) -> dict[str, float]:
    """Exact perplexity; KL of the decode path (chunks of `chunk` through the runner with and without
    the decode kernels) from the exact path; KL to float32 against the exact log-probabilities of the first
    model measured (the caller measures float32 first), which `_FLOAT_REFERENCE` keeps."""
    from slimlm.infer.cache import ContiguousCache
    from slimlm.infer.runner import ModelRunner

    exact_runner, decode_runner = ModelRunner(model, fast_kernels=False), ModelRunner(model)
    nll, nll_decode, kl, count = 0.0, 0.0, 0.0, 0
    logits_exact_all = []
    for window in windows:
        per_path = []
        for runner in (exact_runner, decode_runner):
            cache = ContiguousCache(runner.cache_shape(), 1, len(window))
            parts = [runner.forward(window[None, s : s + chunk], [min(chunk, len(window) - s)], cache, all_logits=True)
                     for s in range(0, len(window), chunk)]
            per_path.append(torch.cat(parts, dim=1)[0].float().log_softmax(-1))
        exact, decode = per_path
        nll -= float(exact[:-1].gather(1, window[1:, None]).sum())
        nll_decode -= float(decode[:-1].gather(1, window[1:, None]).sum())
        kl += float((exact.exp() * (exact - decode)).sum())
        count += len(window)
        logits_exact_all.append(exact)
    scored = count - len(windows)
    result = {"ppl": math.exp(nll / scored), "ppl_decode_path": math.exp(nll_decode / scored),
              "kl_decode_vs_exact": kl / count}
    result["ppl_decode_vs_exact"] = result["ppl_decode_path"] / result["ppl"] - 1
    reference = _FLOAT_REFERENCE.setdefault("logprobs", logits_exact_all)
    result["kl_to_float32"] = sum(float((r.exp() * (r - e)).sum()) for r, e in zip(reference, logits_exact_all)) / count
    return result


_FLOAT_REFERENCE: dict = {}  # the first variant's (float32's) exact log-probabilities


def weight_bytes_per_token(model) -> int:
    """Bytes of linear weights one decode step reads (embedding lookups excluded): packed codes plus the
    kernel's per-group (scale, offset) pairs (float32 for the native kernels, bf16 for PyTorch's int4
    kernel, one bf16 scale per row for its int8 kernel), float32 otherwise (bfloat16 where the native path reads
    the float linears' bfloat16 twins)."""
    from torch import nn

    from slimlm.quant.qlinear import QuantizedLinear
    from slimlm.quant.w8a8 import Int8Linear

    total, bf16 = 0, float_linear_paths(model) == ["bf16-weights"]  # float linears read from bfloat16 twins
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and not module.is_compressed_linear:
            continue  # a quantized embedding: looked up, one row a token
        if isinstance(module, QuantizedLinear):
            groups = module.n_groups
            if module.last_path.startswith("native"):
                scale_bytes = 8 * groups * module.out_features
            else:
                scale_bytes = 4 * groups * module.out_features if module.bits == 4 else 2 * module.out_features
            total += module.packed.numel() * module.packed.element_size() + scale_bytes
        elif isinstance(module, Int8Linear):
            total += module.weight.numel() + 4 * module.out_features
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * (2 if bf16 else module.weight.element_size())
    return total


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second one thread reads (a float32 sum over a buffer larger than the caches)."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


if __name__ == "__main__":
    main()
