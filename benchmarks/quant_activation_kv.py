"""Weight + activation and KV-cache quantization of SmolLM2-135M, with llm-compressor's SmoothQuant beside ours.

Writes `benchmarks/results/quant_activation_kv.{json,md}`. Every job runs in its own process;
finished jobs are kept in a progress file, so an interrupted run resumes (delete
`benchmarks/results/.quant_activation_kv.partial.json` to start over).

    python benchmarks/quant_activation_kv.py --data-dir ../shared/data --limit 100  # quality rows
    python benchmarks/quant_activation_kv.py --data-dir ../shared/data --latency  # + prefill latency (quiet machine)
    python benchmarks/quant_activation_kv.py --data-dir ../shared/data --quick    # minutes: checks the script

Rows:
- weights and activations: W8A8 (naive RTN, SmoothQuant, LLM.int8(), ZeroQuant; per-token dynamic,
  and per-tensor static for RTN and SmoothQuant), W4A8 / W6A6 / W4A4 (RTN, SmoothQuant, OmniQuant:
  per-channel asymmetric weights, per-token asymmetric activations, the OmniQuant paper's grids),
  ZeroQuant W4/8-A8 with and without LKD, FP8 (E4M3) W8A8, FP4 (E2M1) W4A4 by RTN and LLM-FP4;
  llm-compressor's SmoothQuant W8A8 and
  naive W8A8 (same calibration tokens, same windows, its own virtual environment);
- KV cache (float32 weights): naive per-token, KIVI and KVQuant at 4, 3 and 2 bits, evaluated through
  slimlm's runner with the text fed in chunks, so every chunk reads the earlier chunks' keys and values
  back from the quantized cache (`slimlm.infer.quantized_cache.chunked_logits`); the float row is the same
  chunked evaluation with a float cache.

Protocol (recorded in the results): calibration 128 x 512 tokens of C4 documents 0-999 (seed 0; a job
may use the first N of them, as recorded); WikiText-2 test perplexity and KL from float32 over the
first 20 windows of 512 tokens; PIQA, ARC-Easy and HellaSwag on their first `--limit` examples. KV
rows: windows fed in chunks of `--kv-chunk` tokens; zero-shot prefills each context into the
quantized cache and scores the continuation as the next chunk (it reads the context back quantized).
Bytes per token: held by the cache after one 512-token window, over its tokens, against a float16
cache of the same tokens. Latency (`--latency`, one thread, alternating rounds): whole-model prefill
of 512 tokens, each W8A8 integer-GEMM configuration against float32.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import compress_job, evaluate_quality, llmcompressor_row, preamble, run_child, start  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KV_BITS = (4, 3, 2)
KV_METHODS = ("naive", "kivi", "kvquant")
EVAL_WINDOWS = 20  # WikiText-2 windows of 512 tokens (the weight-only benchmark uses 40; CPU budget)
OMNIQUANT_SAMPLES = 32  # calibration segments for OmniQuant's block training (CPU budget; the paper: 128 x 2048)
LKD_SAMPLES = 32  # calibration segments for ZeroQuant's distillation (CPU budget)
LATENCY_CALIBRATION = 16  # segments calibrating the models that are only timed (speed does not depend on them)


def _preset(name: str, **update) -> dict:
    from slimlm.compress.presets import PRESETS

    return {**PRESETS[name]["stages"][0], **update}


def weight_activation_rows() -> dict[str, tuple[str, str, dict, dict]]:
    """key -> (config, method, stage, job options)."""
    rows = {
        "W8A8/naive": ("W8A8", "naive (RTN)", _preset("rtn-w8a8"), {}),
        "W8A8/SmoothQuant": ("W8A8", "SmoothQuant", _preset("smoothquant-w8a8"), {}),
        "W8A8/LLM.int8()": ("W8A8", "LLM.int8()", _preset("llm-int8"), {}),
        "W8A8/ZeroQuant": ("W8A8", "ZeroQuant", _preset("zeroquant-w8a8"), {}),
        "W8A8 static/naive": ("W8A8 static", "naive (RTN)", _preset("rtn-w8a8-static"), {}),
        "W8A8 static/SmoothQuant": ("W8A8 static", "SmoothQuant", _preset(
            "smoothquant-w8a8", activations={"bits": 8, "granularity": "per_tensor", "symmetric": True}), {}),
    }
    for w, a in ((4, 8), (6, 6), (4, 4)):
        config = f"W{w}A{a}"
        rows[f"{config}/RTN"] = (config, "RTN", _preset(f"rtn-w{w}a{a}"), {})
        rows[f"{config}/SmoothQuant"] = (config, "SmoothQuant", _preset(f"smoothquant-w{w}a{a}"), {})
        rows[f"{config}/OmniQuant"] = (config, "OmniQuant", _omniquant_stage(w, a),
                                       {"calibration_samples": OMNIQUANT_SAMPLES, "calibration_batch_size": 1})
    rows["W4/8-A8/ZeroQuant"] = ("W4/8-A8", "ZeroQuant", _preset("zeroquant-w4a8"), {})
    rows["W4/8-A8/ZeroQuant+LKD"] = ("W4/8-A8", "ZeroQuant + LKD", _preset("zeroquant-w4a8-lkd"),
                                     {"calibration_samples": LKD_SAMPLES})
    rows["FP8 W8A8/per-channel"] = ("FP8 W8A8", "per-channel W, per-token A", _preset("fp8-w8a8"), {})
    rows["FP8 W8A8/per-tensor static"] = ("FP8 W8A8", "per-tensor W, static per-tensor A",
                                          _preset("fp8-w8a8-static"), {})
    fp4 = {"bits": 4, "fmt": "fp4_e2m1", "granularity": "per_tensor"}
    rows["FP4 W4A4/RTN"] = ("FP4 W4A4", "RTN (E2M1, per-channel W, static per-tensor A)", {
        "method": "rtn", "bits": 4, "fmt": "fp4_e2m1", "symmetric": True, "group_size": "channel",
        "activations": fp4}, {})
    rows["FP4 W4A4/LLM-FP4"] = ("FP4 W4A4", "LLM-FP4", _preset("llm-fp4-w4a4"), {})
    rows["FP4 W4A4/LLM-FP4 max_shift 8"] = ("FP4 W4A4", "LLM-FP4, max_shift 8", _preset("llm-fp4-w4a4", max_shift=8), {})
    return rows


def _omniquant_stage(w: int, a: int) -> dict:
    """The CPU preset (`omniquant-w4a4`: 2 epochs) at these bits; there is no W4A8 preset, so it is built from it."""
    stage = _preset("omniquant-w4a4")
    return {**stage, "bits": w, "activations": {**stage["activations"], "bits": a}}


KV_ROWS = {"KV float/float cache": None, **{f"KV {b}-bit/{m}": f"{m}-{b}bit" for b in KV_BITS for m in KV_METHODS}}
INT8_GEMM_ROWS = ("W8A8/naive", "W8A8/SmoothQuant", "W8A8/LLM.int8()", "W8A8 static/naive", "W8A8 static/SmoothQuant")
PEERS = {"W8A8/llm-compressor SmoothQuant": "smoothquant", "W8A8/llm-compressor naive": "w8a8"}


# ---- jobs (each runs in a child process) ------------------------------------------------------


def run_job(spec: dict) -> dict:
    if spec["kind"] == "kv":
        return kv_job(spec)
    if spec["kind"] == "kv_memory":
        return kv_memory_job(spec)
    if spec["kind"] == "latency":
        return latency_job(spec)
    return weight_activation_job(spec)


def _calibration_subset(spec: dict) -> dict:
    """With `calibration_samples`, the job calibrates on the first N segments of the shared calibration set."""
    import torch

    if not spec.get("calibration_samples"):
        return spec
    calibration = torch.load(spec["calibration"], weights_only=True)[: spec["calibration_samples"]]
    path = Path(spec["calibration"]).with_name(f"calib-{spec['calibration_samples']}.pt")
    if not path.is_file():
        torch.save(calibration, path)
    return {**spec, "calibration": str(path)}


def weight_activation_job(spec: dict) -> dict:
    model, tokenizer, result, report = compress_job(_calibration_subset(spec), "calibration_seconds")
    if report is not None:
        result["calibration_tokens"] = report.calibration_tokens
    result["layer_types"] = sorted({type(m).__name__ for m in model.modules()
                                    if getattr(m, "is_compressed_linear", False)})
    result.update(evaluate_quality(model, tokenizer, spec["protocol"], spec["data_dir"], c4=False))
    return result


def kv_job(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from slimlm.infer.quantized_cache import chunked_logits
    from slimlm.infer.runner import ModelRunner
    from slimlm.models.loading import load_model

    torch.manual_seed(0)
    proto = spec["protocol"]
    kv = proto["kv"]
    lm = load_model("smollm2-135m")
    runner = ModelRunner(lm.model)
    result = {"config": spec["config"], "method": spec["method"], "kv_cache": spec["kv_cache"]}
    cache_spec = None
    if spec["kv_cache"] is not None:
        began = time.perf_counter()
        cache_spec = _kv_spec(spec["kv_cache"], lm, spec, kv)
        if cache_spec.calibration is not None:  # KVQuant's offline calibration
            result["calibration_seconds"] = time.perf_counter() - began
    windows = load_file(spec["eval_tokens"])["input_ids"]
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for window in windows:
        reference = [logits.float() for logits, _ in chunked_logits(runner, window, kv["chunk"], None)]
        for (logits, targets), ref in zip(chunked_logits(runner, window, kv["chunk"], cache_spec), reference):
            logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref, -1)
            nll += float(F.nll_loss(logp, targets, reduction="sum"))
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            count += targets.numel()
    result.update(wikitext2_ppl=float(torch.tensor(nll / count).exp()), kl_mean=kl / count,
                  top1_agreement=agree / count, tokens=count)
    result.update(_kv_bytes(runner, windows[0], kv["chunk"], cache_spec))
    for task in proto["zero_shot"]["tasks"]:
        scores = _kv_zero_shot(runner, lm.tokenizer, task, spec["data_dir"], proto["zero_shot"]["limit"], cache_spec)
        result[f"{task}_acc_norm" if task != "arc_easy" else "arc_easy_acc"] = (
            scores["acc"] if task == "arc_easy" else scores["acc_norm"])
    return result


def _kv_spec(name: str, lm, spec: dict, kv: dict):
    from slimlm.infer.quantized_cache import parse_kv_cache

    calibration = None
    if name.startswith("kvquant"):
        import torch

        from slimlm.infer.kvquant import calibrate_kvquant

        segments = torch.load(spec["calibration"], weights_only=True)[: kv["kvquant_samples"]]
        bits = int(name.split("-")[1].removesuffix("bit"))
        calibration = calibrate_kvquant(lm.model, segments, bits)
    return parse_kv_cache(name, kv["group_size"], kv["residual"], calibration=calibration)


def _float16_bytes_per_token(shape) -> int:
    """Keys + values of all layers of one token in a float16 cache."""
    return sum(2 * h * shape.head_dim * 2 for h in shape.kv_heads)


def _kv_bytes(runner, window, chunk: int, cache_spec) -> dict:
    """Bytes per token held by the cache after one window, and what a float16 cache would hold."""
    from slimlm.infer.quantized_cache import make_quantized_cache

    shape = runner.cache_shape()
    float16 = _float16_bytes_per_token(shape)
    if cache_spec is None:
        return {"kv_bytes_per_token": float16, "kv_float16_bytes_per_token": float16, "kv_bytes_ratio": 1.0}
    cache = make_quantized_cache(shape, 1, cache_spec)
    for first in range(0, window.numel(), chunk):
        piece = window[first:first + chunk]
        runner.forward(piece[None], [piece.numel()], cache)
    held = cache.bytes_per_token()
    return {"kv_bytes_per_token": held, "kv_float16_bytes_per_token": float16, "kv_bytes_ratio": held / float16}


def kv_memory_job(spec: dict) -> dict:
    """Bytes held per token after `lengths` tokens of WikiText-2 (the evaluation windows joined), fed in chunks."""
    import torch
    from safetensors.torch import load_file

    from slimlm.infer.runner import ModelRunner
    from slimlm.models.loading import load_model

    torch.manual_seed(0)
    kv = spec["protocol"]["kv"]
    lm = load_model("smollm2-135m")
    runner = ModelRunner(lm.model)
    cache_spec = _kv_spec(spec["kv_cache"], lm, spec, kv)
    text = load_file(spec["eval_tokens"])["input_ids"].reshape(-1)
    result = {"config": spec["config"], "method": spec["method"], "kv_cache": spec["kv_cache"],
              "model_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch.")}
    for length in kv["memory_lengths"]:
        measured = _kv_bytes(runner, text[:length], kv["chunk"], cache_spec)
        result[f"bytes_per_token_{length}"] = measured["kv_bytes_per_token"]
        result[f"ratio_{length}"] = measured["kv_bytes_ratio"]
    from slimlm.infer.quantized_cache import make_quantized_cache

    shape = runner.cache_shape()
    float16 = _float16_bytes_per_token(shape)
    result["quantized_token_bytes"] = make_quantized_cache(shape, 1, cache_spec).token_bytes()
    result["quantized_token_ratio"] = result["quantized_token_bytes"] / float16
    result["float16_bytes_per_token"] = float16
    return result


def _kv_zero_shot(runner, tokenizer, task: str, data_dir: str, limit: int, cache_spec, batch: int = 16) -> dict:
    """Multiple-choice accuracy where each continuation reads its context back from the (quantized) cache:
    the contexts of a batch are prefilled as one chunk, their continuations are the next chunk."""
    import torch
    import torch.nn.functional as F

    from slimlm.data.tasks import load_task
    from slimlm.eval.zeroshot import ContinuationScore, encode_pairs, multiple_choice_metrics
    from slimlm.infer.cache import ContiguousCache
    from slimlm.infer.quantized_cache import make_quantized_cache

    examples = load_task(task, data_dir, limit=limit)
    pairs = encode_pairs(tokenizer, [pair for example in examples for pair in example.pairs()])
    shape, scores = runner.cache_shape(), []
    for first in range(0, len(pairs), batch):
        group = pairs[first:first + batch]
        longest = max(len(c) + len(t) for c, t in group)
        cache = (make_quantized_cache(shape, len(group), cache_spec) if cache_spec
                 else ContiguousCache(shape, len(group), longest))
        contexts = _right_padded([c for c, _ in group])
        last = runner.forward(contexts, [len(c) for c, _ in group], cache)  # [batch, vocab]: predicts cont[0]
        rests = [t[:-1] for _, t in group]
        later = None
        if any(rests):
            later = runner.forward(_right_padded([r or [0] for r in rests]), [len(r) for r in rests], cache,
                                   all_logits=True)
        for row, (_, continuation) in enumerate(group):
            logits = last[row:row + 1]
            if len(continuation) > 1:
                logits = torch.cat([logits, later[row, :len(continuation) - 1]])
            logp = F.log_softmax(logits.float(), -1)
            targets = torch.tensor(continuation, device=logp.device)
            token_logp = logp.gather(1, targets[:, None]).squeeze(1)
            scores.append(ContinuationScore(float(token_logp.sum()), bool((logp.argmax(-1) == targets).all()),
                                            len(continuation)))
    return multiple_choice_metrics(examples, scores)


def _right_padded(rows: list[list[int]]):
    import torch

    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def latency_job(spec: dict) -> dict:
    """Prefill latency of 512 tokens on one thread: the W8A8 model against float32, alternating rounds."""
    import torch

    torch.set_num_threads(1)
    model, _, result, _ = compress_job(_calibration_subset(spec), "calibration_seconds")
    from slimlm.models.loading import load_model

    dense = load_model("smollm2-135m").model
    tokens = torch.randint(0, 49152, (1, spec["protocol"]["latency"]["tokens"]), generator=torch.Generator().manual_seed(0))
    @torch.no_grad()
    def once(m) -> float:
        start = time.perf_counter()
        m(tokens, use_cache=False)
        return time.perf_counter() - start

    once(model), once(dense), once(model), once(dense)
    paths = {getattr(m, "last_path", None) for m in model.modules() if getattr(m, "is_compressed_linear", False)}
    quantized, float32 = [], []
    for _ in range(spec["protocol"]["latency"]["rounds"]):
        quantized.append(once(model))
        float32.append(once(dense))
    result.update(prefill_ms=statistics.median(quantized) * 1e3, float32_prefill_ms=statistics.median(float32) * 1e3,
                  paths=",".join(sorted(p for p in paths if p)))
    result["speedup_vs_float32"] = result["float32_prefill_ms"] / result["prefill_ms"]
    return result


# ---- the driver ------------------------------------------------------------------------------


def _options(parser) -> None:
    parser.add_argument("--latency", action="store_true", help="also time prefill (run on a quiet machine)")
    parser.add_argument("--kv-memory", action="store_true", help="also measure KV bytes per token at longer lengths")
    parser.add_argument("--only", help="comma-separated row keys (default: all)")
    parser.add_argument("--kv-chunk", type=int, default=128)
    parser.add_argument("--note", help="a sentence added to the results page (e.g. how the rows were run)")


def main() -> None:
    wa = weight_activation_rows()
    started = start(__doc__, {**{k: k for k in wa}, **KV_ROWS}, {"all": "all"}, "quant_activation_kv", 32, run_job,
                     _options, max_windows=EVAL_WINDOWS)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    proto["kv"] = {"chunk": 64 if args.quick else args.kv_chunk, "group_size": 32, "residual": 128,
                   "kvquant_samples": 4 if args.quick else 16, "memory_lengths": [512, 1024] if args.quick else [512, 4096]}
    proto["latency"] = {"tokens": 512, "rounds": 3 if args.quick else 15, "threads": 1}
    proto["omniquant_calibration_samples"] = OMNIQUANT_SAMPLES
    proto["lkd_calibration_samples"] = LKD_SAMPLES
    only = set(args.only.split(",")) if args.only else None
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    def wanted(key: str) -> bool:
        return only is None or key in only

    rows = []
    if wanted("float32"):
        rows.append(progress.record("float32", lambda: _child(args, proto, tokens, "float32", "-", None, {})))
    for key, (config, method, stage, options) in wa.items():
        if wanted(key):
            rows.append(progress.record(key, lambda c=config, m=method, s=stage, o=options:
                                        _child(args, proto, tokens, c, m, s, o)))
    if not args.no_peer:
        for key, algo in PEERS.items():
            if wanted(key):
                rows.append(progress.record(key, lambda k=key, a=algo: _peer(tokens, k, a)))
    for key, cache in KV_ROWS.items():
        if wanted(key):
            config, method = key.split("/")
            rows.append(progress.record(key, lambda c=config, m=method, n=cache:
                                        _kv_child(args, proto, tokens, c, m, n)))
    memory = []
    if args.kv_memory:
        for key, cache in KV_ROWS.items():
            if cache is not None and wanted(f"memory/{key}"):
                config, method = key.split("/")
                memory.append(progress.record(f"memory/{key}", lambda c=config, m=method, n=cache:
                                              _kv_child(args, proto, tokens, c, m, n, kind="kv_memory")))
    latency = []
    if args.latency:
        for key in INT8_GEMM_ROWS:
            config, method, stage, options = wa[key]
            latency.append(progress.record(f"latency/{key}", lambda c=config, m=method, s=stage: _child(
                args, proto, tokens, c, m, s, {"calibration_samples": LATENCY_CALIBRATION}, kind="latency")))
    command = shlex.join(["python", "benchmarks/quant_activation_kv.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "latency": latency, "kv_memory": memory,
              "note": args.note,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command}
    write_results(out, [result], _tables(rows, latency, memory), preamble=_preamble(result))
    print(out.with_suffix(".md").read_text())


def _child(args, proto, tokens: dict, config: str, method: str, stage: dict | None, options: dict,
           kind: str = "weight_activation") -> dict:
    spec = {"kind": kind, "protocol": proto, "data_dir": args.data_dir, "config": config, "method": method,
            "stage": stage, "calibration": tokens["calib_pt"], **options}
    return run_child(__file__, args.data_dir, spec)


def _kv_child(args, proto, tokens: dict, config: str, method: str, cache: str | None, kind: str = "kv") -> dict:
    spec = {"kind": kind, "protocol": proto, "data_dir": args.data_dir, "config": config, "method": method,
            "kv_cache": cache, "calibration": tokens["calib_pt"], "eval_tokens": tokens["eval"], "stage": None}
    return run_child(__file__, args.data_dir, spec)


def _peer(tokens: dict, key: str, algo: str) -> dict:
    config, method = key.split("/")
    row = llmcompressor_row(tokens, ["--algo", algo], config, algo, "calibration_seconds")
    row["method"] = method
    return row


def _preamble(result: dict) -> str:
    kv, p = result["protocol"]["kv"], result["protocol"]
    return preamble("Weight + activation and KV-cache quantization", result, "quantized") + (
        "C4 perplexity is not measured here. OmniQuant trains on the first "
        f"{p['omniquant_calibration_samples']} calibration segments (batch 1) and ZeroQuant's LKD on the first "
        f"{p['lkd_calibration_samples']} (batches of 8); every other calibrated method uses all of them. KV rows: float32 weights, windows fed in chunks of {kv['chunk']} tokens through "
        f"slimlm's runner (group size {kv['group_size']}; KIVI keeps the newest {kv['residual']} tokens in "
        f"full precision; KVQuant calibrates on {kv['kvquant_samples']} segments); their KL is against the "
        "same chunked evaluation with a float cache, and their zero-shot scores read the context back "
        "from the quantized cache. llm-compressor reports only its WikiText-2 perplexity (same windows).\n"
    ) + (f"\n{result['note']}\n" if result.get("note") else "")


def _tables(rows: list[dict], latency: list[dict], memory: list[dict]) -> str:
    from slimlm.results import markdown_table

    quality_columns = ("config", "method", "wikitext2_ppl", "kl_mean", "top1_agreement", "piqa_acc_norm",
                       "arc_easy_acc", "hellaswag_acc_norm", "calibration_seconds", "layer_types")
    kv_columns = ("config", "method", "wikitext2_ppl", "kl_mean", "top1_agreement", "piqa_acc_norm", "arc_easy_acc",
                  "hellaswag_acc_norm", "kv_bytes_per_token", "kv_float16_bytes_per_token", "kv_bytes_ratio",
                  "calibration_seconds")
    weight_activation = [r for r in rows if not r["config"].startswith("KV")]
    kv = [r for r in rows if r["config"].startswith("KV")]
    parts = ["## Weights and activations\n", markdown_table(weight_activation, quality_columns)]
    if kv:
        parts += ["\n## KV cache (float32 weights)\n", markdown_table(kv, kv_columns)]
    if memory:
        lengths = [k.removeprefix("ratio_") for k in memory[0] if k.startswith("ratio_")]
        columns = ("config", "method", "model_dtype", *(f"bytes_per_token_{n}" for n in lengths),
                   *(f"ratio_{n}" for n in lengths), "quantized_token_bytes", "quantized_token_ratio",
                   "float16_bytes_per_token")
        parts += ["\n## KV cache bytes per token, measured from the tensors held (against a float16 cache)\n",
                  markdown_table(memory, columns)]
    if latency:
        parts += ["\n## Prefill latency, int8 GEMM against float32 (512 tokens, one thread)\n",
                  markdown_table(latency, ("config", "method", "paths", "prefill_ms", "float32_prefill_ms",
                                           "speedup_vs_float32"))]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
