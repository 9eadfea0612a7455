"""slimlm's ONNX Runtime export checked in ONNX Runtime itself: decode speed, perplexity, agreement, size.

Writes `benchmarks/results/onnx_export.{json,md}` (`--quick`: `onnx_export-quick.*`). SmolLM2-135M (the
embedded float32 model) is compressed by slimlm (`rtn-w4g64-head8`: RTN 4-bit asymmetric g64 on every
decoder linear, the LM head 8-bit per channel; `--variants` adds `gptq-w4g64-head8`, calibrated on C4)
and written with `slimlm.export.onnx.export_onnx` (MatMulNBits, accuracy_level 4 unless `--accuracy-level`).
The float32 model is exported too (float32 MatMul, the head tied to the embedding): the graph itself, with
no quantization, against PyTorch.

For each exported model, in this one process, one thread everywhere (`torch.set_num_threads(1)`,
ONNX Runtime `intra_op_num_threads=1`):
- decode tokens/s at batch 1: a 128-token prompt (the embedded pydoc text, as `benchmarks/deploy.py`),
  64 new tokens, greedy; PyTorch float32 in slimlm's runner (`slimlm.infer.generate_ids`), the same
  compressed model in slimlm's runner, and each export (float32 included) in onnxruntime-genai's generator loop
  (`append_tokens` = prefill, then `generate_next_token`); tokens/s of the decode steps (the 63 forwards
  after the first token), medians of `--repeats` alternating runs, and the ratio to float32 of the same runs;
- WikiText-2 perplexity on the first `--windows` windows of 512 tokens of the test split
  (`slimlm.eval.perplexity.token_windows`, tokens 2..512 of each window scored) from ONNX Runtime's logits
  (a plain `onnxruntime.InferenceSession` on the exported graph, each window from an empty KV cache) and
  from slimlm's reference path on the same compressed model, plus the largest and mean absolute logit
  difference and top-1 agreement between the two over the scored positions;
- greedy agreement: the 64 tokens ONNX Runtime generates against slimlm's exact path (`ModelRunner` without
  the fast kernels) on the same prompt;
- the export's bytes on disk (model.onnx + model.onnx.data + genai_config + tokenizer files) and how many
  linears were carried with their codes read back exactly.

    flock /tmp/slimlm-bench.lock python benchmarks/onnx_export.py --data-dir ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS, NEW_TOKENS = 128, 64
VARIANTS = ("rtn-w4g64-head8", "gptq-w4g64-head8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=VARIANTS[0], help=f"comma-separated presets, of {', '.join(VARIANTS)}")
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level of the export")
    parser.add_argument("--calib-samples", type=int, default=128, help="C4 calibration segments of 512 (GPTQ)")
    parser.add_argument("--quick", action="store_true", help="small protocol, to check the script")
    parser.add_argument("--out", default=str(RESULTS / "onnx_export"))
    args = parser.parse_args()
    if args.quick:
        args.windows, args.repeats, args.calib_samples = 2, 2, 8
        if Path(args.out).parent == RESULTS:
            args.out += "-quick"
    torch.set_num_threads(1)
    run(args)


def run(args: argparse.Namespace) -> None:
    import onnxruntime
    import onnxruntime_genai

    from slimlm.compress import compress
    from slimlm.compress.recipe import load_recipe
    from slimlm.data.calibration import calibration_samples, tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.eval.perplexity import token_windows
    from slimlm.export.onnx import describe, export_onnx
    from slimlm.models.loading import load_model
    from slimlm.quant.kernels import kernel_choice
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    started = time.perf_counter()
    loaded = load_model(args.model)
    tokenizer, float_model = loaded.tokenizer, loaded.model
    prompt = tokenize_corpus(tokenizer, load_corpus("pydoc", split="eval"))[:PROMPT_TOKENS].tolist()
    wikitext = tokenize_corpus(tokenizer, load_corpus("wikitext2", split="eval", data_dir=args.data_dir))
    windows = token_windows(wikitext, 512, args.windows)
    names = ["float32", *args.variants.split(",")]  # float32: the same exporter on the float model (float MatMul)
    scratch = tempfile.TemporaryDirectory()
    rows, models, exports = [], {}, {}
    for name in names:
        model, calibration, compress_s = float_model, None, 0.0
        if name != "float32":
            recipe = load_recipe(name)
            model = copy.deepcopy(float_model)
            if any(stage.method not in ("rtn", "quantize_head") for stage in recipe.stages):
                calibration = calibration_samples(tokenizer, "c4", args.calib_samples, 512, 0, args.data_dir)
            start = time.perf_counter()
            compress(model, recipe, calibration=calibration)
            compress_s = time.perf_counter() - start
        directory = Path(scratch.name) / name
        start = time.perf_counter()
        exported = export_onnx(model, tokenizer, directory, accuracy_level=args.accuracy_level)
        export_s = time.perf_counter() - start
        print(describe(exported), flush=True)
        models[name], exports[name] = model, exported
        summary = exported.summary()
        rows.append({"variant": name, "compress_s": round(compress_s, 1), "export_s": round(export_s, 1),
                     "onnx_bytes": exported.bytes, "onnx_files": exported.files,
                     "linears_carried": summary["carried"], "linears_float": summary["float"],
                     "carried_max_abs_error": summary["carried_max_abs_error"], "matmulnbits": summary["by_grid"],
                     "calibration": None if calibration is None else f"{len(calibration)} x 512 C4"})

    # decode speed: alternating runs, float32 and each variant in slimlm's runner and in onnxruntime-genai
    generators = {name: _genai_model(onnxruntime_genai, Path(scratch.name) / name) for name in names}
    timings: dict[str, list[float]] = {"float32 (PyTorch, slimlm runner)": []}
    for name in names:
        if name != "float32":
            timings[f"{name} (slimlm runner)"] = []
        timings[f"{name} (ONNX Runtime)"] = []
    ort_tokens = {}
    for round_index in range(args.repeats):
        timings["float32 (PyTorch, slimlm runner)"].append(_torch_decode(float_model, prompt)[0])
        for name in names:
            if name != "float32":
                timings[f"{name} (slimlm runner)"].append(_torch_decode(models[name], prompt)[0])
            speed, tokens = _genai_decode(onnxruntime_genai, generators[name], prompt)
            timings[f"{name} (ONNX Runtime)"].append(speed)
            ort_tokens[name] = tokens
        print(f"timing round {round_index + 1}/{args.repeats}", flush=True)
    base = statistics.median(timings["float32 (PyTorch, slimlm runner)"])
    speed_rows = [{"engine": engine, "decode_tok_s_b1": statistics.median(values),
                   "ratio_to_float32": statistics.median(values) / base,
                   "runs_tok_s": [round(v, 2) for v in values]} for engine, values in timings.items()]

    # quality and agreement
    for row in rows:
        name = row["variant"]
        session = _session(onnxruntime, Path(scratch.name) / name / "model.onnx")
        row.update(_quality(models[name], session, windows))
        reference = _greedy_reference(models[name], prompt)
        row["greedy_tokens_equal"] = _agreement(reference, ort_tokens[name])
        row["greedy_first_mismatch"] = next((i for i, (a, b) in enumerate(zip(reference, ort_tokens[name]))
                                             if a != b), None)
        row["ort_decode_tok_s_b1"] = statistics.median(timings[f"{name} (ONNX Runtime)"])
        row["ort_ratio_to_float32"] = row["ort_decode_tok_s_b1"] / base
        runner = timings.get(f"{name} (slimlm runner)", timings["float32 (PyTorch, slimlm runner)"])
        row["slimlm_runner_ratio_to_float32"] = statistics.median(runner) / base
        print(f"quality {name}: ORT {row['ppl_ort']:.4f} slimlm {row['ppl_slimlm']:.4f}", flush=True)
    float_ppl = rows[0]["ppl_slimlm"]
    choice = kernel_choice()
    record = {"benchmark": "onnx_export", "model": args.model, "quick": args.quick,
              "protocol": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
                           "threads": 1, "greedy": True, "wikitext2_windows": f"{len(windows)} x 512",
                           "tokens_scored": int(len(windows) * 511), "accuracy_level": args.accuracy_level},
              "float32_ppl": float_ppl, "speed": speed_rows, "rows": rows,
              "export_records": {name: exports[name].to_dict() for name in names},
              "cpu_flags": choice.cpu_flags, "slimlm_kernel_choice": choice.label,
              "machine": machine_info(), "versions": {**library_versions(), "onnxruntime": onnxruntime.__version__,
                                                      "onnxruntime_genai": onnxruntime_genai.__version__,
                                                      "onnx": __import__("onnx").__version__},
              "date": utc_now(), "command": shlex.join([sys.executable, *sys.argv]),
              "seconds": time.perf_counter() - started}
    scratch.cleanup()
    quality_columns = ["variant", "onnx_bytes", "linears_carried", "carried_max_abs_error", "ppl_ort", "ppl_slimlm",
                       "ppl_ratio", "max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement",
                       "greedy_tokens_equal", "ort_ratio_to_float32", "slimlm_runner_ratio_to_float32"]
    preamble = (f"# ONNX Runtime export ({'quick protocol' if args.quick else 'full protocol'})\n\n"
                f"Model {args.model}, {record['date']}, CPU {record['machine']['cpu']} (flags: "
                f"{', '.join(choice.cpu_flags)}), ONNX Runtime {onnxruntime.__version__}, onnxruntime-genai "
                f"{onnxruntime_genai.__version__}, MatMulNBits accuracy_level {args.accuracy_level}, one thread. "
                f"Command: `{record['command']}`.\n\n"
                f"Decode at batch 1 ({PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy; medians of "
                f"{args.repeats} alternating runs in this process; ratios to float32 of the same runs):\n\n"
                + markdown_table(speed_rows, ["engine", "decode_tok_s_b1", "ratio_to_float32"])
                + f"\n\nQuality: WikiText-2, {len(windows)} windows x 512 tokens ({len(windows) * 511} tokens scored), "
                f"ONNX Runtime's logits against slimlm's reference path on the same compressed weights "
                f"(float32 PyTorch: ppl {float_ppl:.4f}). See the docstring of benchmarks/onnx_export.py.")
    table = markdown_table(rows, quality_columns)
    json_path, md_path = write_results(args.out, [record], table, preamble)
    print(preamble + "\n\n" + table)
    print(f"wrote {json_path} and {md_path}")


def _genai_model(og, directory: Path):
    config = og.Config(str(directory))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                         "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def _genai_decode(og, model, prompt: list[int]) -> tuple[float, list[int]]:
    """(decode tokens/s, generated ids): prefill by append_tokens, then NEW_TOKENS generate_next_token calls;
    the speed counts the calls after the first (each runs one forward on the previous token)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False, top_k=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens, stamps = [], []
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
        stamps.append(time.perf_counter())
        tokens.append(int(generator.get_next_tokens()[0]))
    del generator
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def _torch_decode(model, prompt: list[int]) -> tuple[float, list[int]]:
    from slimlm.infer import generate_ids

    result = generate_ids(model, [prompt], NEW_TOKENS)
    return 1.0 / result.stats.per_token_s, result.tokens[0]


def _greedy_reference(model, prompt: list[int]) -> list[int]:
    """slimlm's greedy tokens on the exact path (no bfloat16 decode kernels)."""
    from slimlm.infer import generate_ids
    from slimlm.infer.runner import ModelRunner

    return generate_ids(ModelRunner(model, fast_kernels=False), [prompt], NEW_TOKENS).tokens[0]


def _agreement(a: list[int], b: list[int]) -> int:
    """Tokens equal from the start until the first difference (later tokens depend on earlier ones)."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _session(ort, path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session, window: np.ndarray) -> np.ndarray:
    """(tokens, vocab) float32 logits of one window from an empty KV cache."""
    feed = {"input_ids": window[None].astype(np.int64), "attention_mask": np.ones((1, len(window)), np.int64)}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            _, heads, _, head_dim = item.shape
            feed[item.name] = np.zeros((1, heads, 0, head_dim), np.float32)
    return session.run(["logits"], feed)[0][0]


def _nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed NLL of tokens 2..n of the window from the logits of positions 1..n-1."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()


def _quality(model, session, windows: torch.Tensor) -> dict:
    from slimlm.eval.perplexity import window_logits

    nll_ort, nll_ref, max_diff, sum_diff, agree, count = 0.0, 0.0, 0.0, 0.0, 0, 0
    for window in windows:
        ours = window_logits(model, window)
        theirs = torch.from_numpy(ort_logits(session, window.numpy()))
        nll_ref += _nll(ours, window)
        nll_ort += _nll(theirs, window)
        ours, theirs = ours[:-1], theirs[:-1]  # the scored positions
        difference = (theirs - ours).abs()
        max_diff = max(max_diff, float(difference.max()))
        sum_diff += float(difference.double().mean()) * len(ours)
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        count += len(ours)
    ppl_ort, ppl_ref = math.exp(nll_ort / count), math.exp(nll_ref / count)
    return {"ppl_ort": ppl_ort, "ppl_slimlm": ppl_ref, "ppl_ratio": ppl_ort / ppl_ref, "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": sum_diff / count, "top1_agreement": agree / count}


if __name__ == "__main__":
    main()
