"""Weight-only quantization of SmolLM2-135M: RTN, GPTQ (with and without act-order), AWQ, llm-compressor.

Writes `benchmarks/results/quant_weight_only.{json,md}`. Every slimlm job runs in its own process
(so peak memory is that job's own); finished jobs are kept in a progress file, so an interrupted
run resumes (delete `benchmarks/results/.quant_weight_only.partial.json` to start over).

    python benchmarks/quant_weight_only.py --data-dir ../shared/data            # everything
    python benchmarks/quant_weight_only.py --data-dir ../shared/data --quick    # minutes: checks the script

Protocol (recorded in the results): calibration 128 segments x 512 tokens from C4 documents 0-999
(seed 0), the same token tensors for slimlm and llm-compressor; WikiText-2 test perplexity and KL
divergence from float32 at seqlen 512 over the first 40 windows (the protocol of the peer-tool
reference numbers); C4 documents 1000-1999 perplexity, same windows; PIQA, ARC-Easy and HellaSwag
on their first `--limit` examples. Note the default model's weights lie on a 4-bit asymmetric
group-32 grid (Q4_1), so W4 g32 asymmetric would be lossless: it is not among the configurations.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import (  # noqa: E402
    compress_job, evaluate_quality, llmcompressor_row, preamble, run_child, start)

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name -> (bits, group size)
    "W4 g64": (4, 64), "W3 g64": (3, 64), "W4 per-channel": (4, "channel"), "W2 g32": (2, 32),
    "W4 g128": (4, 128),  # 576 = 4 x 128 + 64: a shorter last group
}
METHODS = {
    "RTN": {"method": "rtn"},
    "GPTQ": {"method": "gptq"},
    "GPTQ act-order": {"method": "gptq", "act_order": True},
    "AWQ": {"method": "awq"},
}
PEER_SCHEMES = {"W4 g64": "W4G64", "W3 g64": "W3G64", "W4 per-channel": "W4CH", "W2 g32": "W2G32", "W4 g128": "W4G128"}


# ---- one slimlm job (runs in a child process) ------------------------------------------------


def run_job(spec: dict) -> dict:
    from slimlm.export.native import model_bytes, save

    proto, data_dir = spec["protocol"], spec["data_dir"]
    model, tokenizer, result, _ = compress_job(spec, "compression_seconds")
    with tempfile.TemporaryDirectory() as directory:
        result["disk_bytes"] = model_bytes(save(model, Path(directory) / "m", tokenizer))
    result.update(evaluate_quality(model, tokenizer, proto, data_dir))
    if spec.get("speed"):
        result.update(_decode_speed(model, proto["speed"]))
    return result


def _decode_speed(model, speed: dict) -> dict:
    """Decode tokens/s: the quantized model in bfloat16 through the int4 kernel, against dense float32."""
    import copy

    import torch

    from slimlm.eval.efficiency import measure_latency
    from slimlm.models.loading import load_model
    from slimlm.quant.qlinear import QuantizedLinear

    def decode(m) -> float:
        return measure_latency(m, speed["prompt_tokens"], speed["new_tokens"], 1, speed["repeats"]).decode_tokens_per_s

    quantized = copy.deepcopy(model).to(torch.bfloat16)
    decode(quantized)
    kernel = {m.last_path for m in quantized.modules() if isinstance(m, QuantizedLinear)}
    dense = load_model("smollm2-135m").model
    return {"decode_tokens_per_s_int4_bf16": decode(quantized), "decode_path": ",".join(sorted(kernel)),
            "decode_tokens_per_s_float32": decode(dense),
            "decode_tokens_per_s_bfloat16_dense": decode(dense.to(torch.bfloat16))}


# ---- the driver ------------------------------------------------------------------------------


def main() -> None:
    started = start(__doc__, CONFIGS, METHODS, "quant_weight_only", 32, run_job)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    record = progress.record
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    configs = [c.strip() for c in args.configs.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    rows = [record("float32", lambda: _child(args, proto, tokens, "float32", "-", None))]
    for config in configs:
        bits, group = CONFIGS[config]
        for method in methods:
            stage = {**METHODS[method], "bits": bits, "group_size": group}
            speed = config == "W4 g64" and method == "RTN"
            rows.append(record(f"{config}/{method}", lambda c=config, m=method, s=stage, f=speed:
                               _child(args, proto, tokens, c, m, s, f)))
        if not args.no_peer:
            for algo in ("rtn", "gptq"):
                rows.append(record(f"{config}/llm-compressor {algo}", lambda c=config, a=algo:
                                   _peer(args, tokens, c, a)))
    command = shlex.join(["python", "benchmarks/quant_weight_only.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "machine": machine_info(),
              "versions": library_versions(), "date": utc_now(), "command": command}
    write_results(out, [result], _tables(rows), preamble=_preamble(result))
    print(out.with_suffix(".md").read_text())


def _child(args, proto, tokens: dict, config: str, method: str, stage: dict | None, speed: bool = False) -> dict:
    spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stage": stage,
            "calibration": tokens["calib_pt"], "speed": speed}
    return run_child(__file__, args.data_dir, spec)


def _peer(args, tokens: dict, config: str, algo: str) -> dict:
    extra = ["--scheme", PEER_SCHEMES[config], "--algo", algo, "--asymmetric"]
    return llmcompressor_row(tokens, extra, config, algo, "compression_seconds")


def _preamble(result: dict) -> str:
    return preamble("Weight-only quantization", result, "quantized") + (
        "All slimlm configurations are asymmetric; llm-compressor runs with --asymmetric, no act-order."
    )


def _tables(rows: list[dict]) -> str:
    from slimlm.results import markdown_table

    columns = ("config", "method", "wikitext2_ppl", "c4_ppl", "kl_mean", "top1_agreement", "piqa_acc_norm",
               "arc_easy_acc", "hellaswag_acc_norm", "disk_bytes", "compression_seconds", "peak_rss_bytes")
    quality = markdown_table(rows, columns)
    ours = {(r["config"], r["method"]): r for r in rows}
    peers = []
    for r in rows:
        if r["method"].startswith("llm-compressor"):
            mine = ours.get((r["config"], r["method"].split()[-1].upper()))
            ratio = (r["compression_seconds"] / mine["compression_seconds"]
                     if mine and r.get("compression_seconds") and mine.get("compression_seconds") else None)
            peers.append({"config": r["config"], "tool": r["method"], "status": r["status"],
                          "ppl": r.get("wikitext2_ppl"), "slimlm_ppl": mine and mine.get("wikitext2_ppl"),
                          "seconds": r.get("compression_seconds"),
                          "slimlm_seconds": mine and mine.get("compression_seconds"), "time_ratio_peer_to_slimlm": ratio})
    speed = [r for r in rows if "decode_tokens_per_s_float32" in r]
    speed_cols = ("config", "method", "decode_path", "decode_tokens_per_s_int4_bf16", "decode_tokens_per_s_float32",
                  "decode_tokens_per_s_bfloat16_dense")
    parts = ["## Quality, size, time\n", quality]
    if peers:
        parts += ["\n## llm-compressor beside slimlm (same tokens, same windows)\n", markdown_table(peers)]
    if speed:
        parts += ["\n## Decode speed (batch 1)\n", markdown_table(speed, speed_cols)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
