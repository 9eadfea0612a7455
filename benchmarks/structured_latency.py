"""Prefill latency of structured-pruned SmolLM2-135M against the dense model, timed in alternation.

`benchmarks/pruning.py` times each model once, in its own job, with a 128-token prompt and three
repeats, so its latency columns move with whatever else the machine does. This script answers one
question, "is the structured model's prefill measurably faster?", with a paired design: the dense
and the pruned model stay loaded side by side and their prefills alternate (dense, pruned, dense,
pruned, ...) on the same prompt, so drift in the machine's speed hits both alike. Reported per
model: the median of each, the median of the per-pair ratios dense / pruned, and in how many of the
pairs the pruned model was the faster.

The pruned models come from the same stages as `benchmarks/pruning.py` (same methods, same
levels), calibrated on fewer C4 segments (`--calib-samples`, default 16 x 512) because only their
shapes matter here: a dense float32 matmul costs the same whatever the values. LLM-Pruner with LoRA
recovery has exactly LLM-Pruner's shapes, so it is not timed separately.

    python benchmarks/structured_latency.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning import LEVELS, block_share, structured_stage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("LLM-Pruner", "SliceGPT", "SliceGPT one rotation", "FLAP", "FLAP uniform", "layer removal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=15, help="alternating dense / pruned prefills per model")
    parser.add_argument("--calib-samples", type=int, default=16, help="C4 segments of 512 tokens for pruning")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="one level, 3 pairs, 64 tokens: to check the script")
    parser.add_argument("--out", default=str(RESULTS / "structured_latency"))
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.pairs, args.calib_samples = 64, 3, 4
        args.out = args.out + "-quick" if Path(args.out).parent == RESULTS else args.out

    import torch

    from slimlm.compress import compress
    from slimlm.data.calibration import calibration_samples
    from slimlm.eval.efficiency import count_parameters
    from slimlm.models.loading import embedded_gguf_path, gguf_to_directory, load_model
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    dense = load_model("smollm2-135m")
    calibration = calibration_samples(dense.tokenizer, "c4", args.calib_samples, 512, 0, args.data_dir)
    prompt = torch.randint(0, dense.model.config.vocab_size, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    share, blocks = block_share(str(gguf_to_directory(embedded_gguf_path("smollm2-135m"))))
    dense_parameters = count_parameters(dense.model)
    levels = dict(list(LEVELS.items())[:1]) if args.quick else LEVELS
    rows = []
    for level_name, level in levels.items():
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            pruned = load_model("smollm2-135m").model
            stage = structured_stage(method, level, share, blocks)
            compress(pruned, {"stages": [stage], "calibration": {"batch_size": 8}}, calibration=calibration)
            dense_s, pruned_s = paired_prefill_seconds(dense.model, pruned, prompt, args.pairs)
            ratios = [d / p for d, p in zip(dense_s, pruned_s)]
            parameters = count_parameters(pruned)
            rows.append({
                "level": level_name, "method": method, "parameters": parameters,
                "parameter_reduction": 1 - parameters / dense_parameters,
                "dense_prefill_ms": 1000 * statistics.median(dense_s),
                "pruned_prefill_ms": 1000 * statistics.median(pruned_s),
                "median_speedup": statistics.median(ratios),
                "pairs_pruned_faster": f"{sum(r > 1 for r in ratios)}/{len(ratios)}",
            })
            print(rows[-1], flush=True)
            del pruned
    command = shlex.join(["python", "benchmarks/structured_latency.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "prompt_tokens": args.prompt_tokens, "pairs": args.pairs,
              "calibration_samples": args.calib_samples, "threads": torch.get_num_threads(), "rows": rows,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command}
    m, v = result["machine"], result["versions"]
    preamble = (f"# Prefill latency of structured-pruned models: smollm2-135m\n\nCommand: `{command}`  \n"
                f"Machine: {m['cpu']}, {m['cores']} cores, {result['threads']} threads; torch {v['torch']}, "
                f"transformers {v['transformers']}  \nDate: {result['date']}\n\n"
                f"Batch 1, {args.prompt_tokens}-token prompt, float32, {args.pairs} alternating dense / pruned "
                "prefills per model after one warm-up each. Speedup: median over the pairs of dense time / "
                "pruned time.")
    write_results(args.out, [result], markdown_table(rows), preamble=preamble)
    print(Path(args.out).with_suffix(".md").read_text())


def paired_prefill_seconds(dense, pruned, prompt, pairs: int) -> tuple[list[float], list[float]]:
    """Alternate one prefill of each model `pairs` times (after a warm-up of each); their times."""
    import torch

    def prefill(model) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(prompt, use_cache=True)
        return time.perf_counter() - start

    prefill(dense), prefill(pruned)
    times = [(prefill(dense), prefill(pruned)) for _ in range(pairs)]
    return [d for d, _ in times], [p for _, p in times]


if __name__ == "__main__":
    main()
