"""Pruning of SmolLM2-135M: magnitude, Wanda, SparseGPT, DSnoT (and Wanda with OWL ratios), llm-compressor beside.

Writes `benchmarks/results/pruning.{json,md}`. Every slimlm job runs in its own process; finished
jobs are kept in a progress file, so an interrupted run resumes (delete
`benchmarks/results/.pruning.partial.json` to start over).

    python benchmarks/pruning.py --data-dir ../shared/data            # everything
    python benchmarks/pruning.py --data-dir ../shared/data --quick    # minutes: checks the script

Protocol (recorded in the results): calibration 128 segments x 512 tokens from C4 documents 0-999
(seed 0), the same token tensors for slimlm and llm-compressor; every decoder linear pruned, the
LM head and embedding kept; WikiText-2 test perplexity and KL divergence from float32 at seqlen
512 over the first 40 windows; C4 documents 1000-1999 perplexity, same windows; PIQA, ARC-Easy
and HellaSwag on their first `--limit` examples; prefill latency of a 128-token prompt and decode
tokens/s at batch 1 (dense float32 kernels: zeros cost the same as any weight); a separate table
times PyTorch's sparse CPU matmul against dense on a pruned layer. Structured pruning (LLM-Pruner,
SliceGPT, FLAP, layer removal) is not in slimlm yet and so not in this benchmark.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ZERO_SHOT, Progress, evaluate_quality, llmcompressor, run_child, token_files  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7},
           "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}
METHODS = {"magnitude": {"method": "magnitude"}, "Wanda": {"method": "wanda"},
           "SparseGPT": {"method": "sparsegpt"}, "DSnoT (Wanda)": {"method": "dsnot", "initial": "wanda"},
           "Wanda + OWL": {"method": "wanda", "owl": {}}}
PEER_ALGOS = {"SparseGPT": "sparsegpt", "Wanda": "wanda"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--limit", type=int, default=200, help="first N examples of each zero-shot task")
    parser.add_argument("--quick", action="store_true", help="tiny protocol, to check the script")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument("--out", default=str(RESULTS / "pruning"))
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one slimlm job and print its JSON
    return parser.parse_args()


def protocol(args: argparse.Namespace) -> dict:
    quick = args.quick
    return {
        "calibration": {"corpus": "c4 docs 0-999", "samples": 8 if quick else 128, "seqlen": 128 if quick else 512,
                        "seed": 0},
        "perplexity": {"seqlen": 512, "max_windows": 2 if quick else 40},
        "zero_shot": {"tasks": list(ZERO_SHOT), "limit": 10 if quick else args.limit},
        "speed": {"prompt_tokens": 128, "new_tokens": 8 if quick else 32, "repeats": 1 if quick else 3},
    }


def run_job(spec: dict) -> dict:
    """One slimlm job (in a child process): prune, save, evaluate, time."""
    import torch

    from slimlm.compress import compress
    from slimlm.eval.efficiency import count_nonzero_parameters, count_parameters, measure_latency
    from slimlm.export.native import model_bytes, save
    from slimlm.models.loading import load_model

    proto, data_dir = spec["protocol"], spec["data_dir"]
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    model, tokenizer = lm.model, lm.tokenizer
    result = {"config": spec["config"], "method": spec["method"]}
    if spec["stage"] is not None:
        calibration = torch.load(spec["calibration"], weights_only=True)
        start = time.perf_counter()
        report = compress(model, {"stages": [spec["stage"]], "calibration": {"batch_size": 8}}, calibration=calibration)
        result["pruning_seconds"] = time.perf_counter() - start
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if report.block_sparsity:
            result["owl_block_sparsity"] = [round(s, 4) for s in report.block_sparsity[0]]
    result["parameters"] = count_parameters(model)
    result["nonzero_parameters"] = count_nonzero_parameters(model)
    with tempfile.TemporaryDirectory() as directory:
        result["disk_bytes"] = model_bytes(save(model, Path(directory) / "m", tokenizer))
    result.update(evaluate_quality(model, tokenizer, proto, data_dir))
    speed = proto["speed"]
    latency = measure_latency(model, speed["prompt_tokens"], speed["new_tokens"], 1, speed["repeats"])
    result["prefill_ms"] = latency.prefill_s * 1000
    result["decode_tokens_per_s"] = latency.decode_tokens_per_s
    return result


def sparse_kernels(quick: bool) -> list[dict]:
    """Dense float32 matmul against PyTorch's CSR sparse matmul on a Wanda-like pruned 1536 x 576 layer."""
    import torch

    from slimlm.compress.sparsity import n_m_mask, unstructured_mask

    torch.manual_seed(0)
    weight = torch.randn(1536, 576)
    rows, repeats = [], 3 if quick else 20

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1000

    for label, mask in [("50%", unstructured_mask(weight.abs(), 0.5)), ("70%", unstructured_mask(weight.abs(), 0.7)),
                        ("2:4", n_m_mask(weight.abs(), 2, 4))]:
        pruned = weight.masked_fill(mask, 0)
        csr = pruned.to_sparse_csr()
        for tokens in (1, 512):
            x = torch.randn(tokens, 576)
            dense_ms = timed(lambda: x @ pruned.T)
            sparse_ms = timed(lambda: (csr @ x.T).T)
            rows.append({"pattern": label, "tokens": tokens, "dense_ms": dense_ms, "csr_ms": sparse_ms,
                         "speedup_csr": dense_ms / sparse_ms,
                         "csr_bytes": sum(t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices())),
                         "dense_bytes": pruned.numel() * 4})
    return rows


def main() -> None:
    args = parse_args()
    if args.job:
        print("RESULT " + json.dumps(run_job(json.loads(args.job))), flush=True)
        return
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    proto = protocol(args)
    out = Path(args.out)
    progress = Progress(out.parent / f".{out.name}{'.quick' if args.quick else ''}.partial.json")
    tokens = token_files(args.data_dir, proto, "prune-bench-quick" if args.quick else "prune-bench")

    def child(config: str, method: str, stage: dict | None) -> dict:
        spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stage": stage,
                "calibration": tokens["calib_pt"]}
        return run_child(__file__, args.data_dir, spec)

    configs = [c.strip() for c in args.configs.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    rows = [progress.record("dense", lambda: child("dense", "-", None))]
    for config in configs:
        for method in methods:
            if method == "Wanda + OWL" and "pattern" in CONFIGS[config]:
                continue  # OWL varies sparsity per block; N:M fixes it
            stage = {**METHODS[method], **CONFIGS[config]}
            rows.append(progress.record(f"{config}/{method}", lambda c=config, m=method, s=stage: child(c, m, s)))
        if not args.no_peer:
            for method, algo in PEER_ALGOS.items():
                if method in methods:
                    rows.append(progress.record(f"{config}/llm-compressor {algo}",
                                                lambda c=config, a=algo: _peer(tokens, c, a)))
    kernels = progress.record("sparse kernels", lambda: {"rows": sparse_kernels(args.quick)})["rows"]
    command = shlex.join(["python", "benchmarks/pruning.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "sparse_kernels": kernels,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command}
    write_results(out, [result], _tables(rows, kernels), preamble=_preamble(result))
    print(out.with_suffix(".md").read_text())


def _peer(tokens: dict, config: str, algo: str) -> dict:
    settings = CONFIGS[config]
    extra = ["--algo", algo, "--sparsity", str(settings.get("sparsity", 0.5)),
             "--mask-structure", settings.get("pattern", "0:0")]
    peer = llmcompressor(tokens, extra)
    return {"config": config, "method": f"llm-compressor {algo}", "status": peer["status"],
            "wikitext2_ppl": peer.get("ppl"), "pruning_seconds": peer.get("compression_seconds"),
            "peak_rss_bytes": peer.get("peak_rss_bytes"), "error": (peer.get("error") or "")[:200] or None,
            "versions": peer.get("versions")}


def _preamble(result: dict) -> str:
    p, m = result["protocol"], result["machine"]
    return (
        f"# Pruning: {result['model']}\n\n"
        f"Command: `{result['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores; torch "
        f"{result['versions']['torch']}, transformers {result['versions']['transformers']}  \nDate: {result['date']}\n\n"
        f"Calibration: {p['calibration']['samples']} x {p['calibration']['seqlen']} tokens of {p['calibration']['corpus']}, "
        f"seed {p['calibration']['seed']} (identical tokens for llm-compressor). Perplexity: GPTQ protocol, seqlen "
        f"{p['perplexity']['seqlen']}, first {p['perplexity']['max_windows']} windows (WikiText-2 test; C4 docs "
        f"1000-1999). KL: mean KL(float32 || pruned) over the same WikiText-2 tokens. Zero-shot: first "
        f"{p['zero_shot']['limit']} examples (PIQA and HellaSwag acc_norm, ARC-Easy acc). Latency: prefill of "
        f"{p['speed']['prompt_tokens']} tokens and decode at batch 1 with dense float32 kernels, so pruned weights "
        "cost the same time as kept ones. Every decoder linear is pruned; DSnoT keeps its reference default of "
        "leaving the MLP linears with their initial Wanda mask."
    )


def _tables(rows: list[dict], kernels: list[dict]) -> str:
    from slimlm.results import markdown_table

    columns = ("config", "method", "wikitext2_ppl", "c4_ppl", "kl_mean", "piqa_acc_norm", "arc_easy_acc",
               "hellaswag_acc_norm", "parameters", "nonzero_parameters", "disk_bytes", "prefill_ms",
               "decode_tokens_per_s", "pruning_seconds")
    ours = {(r["config"], r["method"]): r for r in rows}
    peers = []
    for r in rows:
        if r["method"].startswith("llm-compressor"):
            mine = ours.get((r["config"], {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[r["method"].split()[-1]]))
            peers.append({"config": r["config"], "tool": r["method"], "status": r["status"],
                          "ppl": r.get("wikitext2_ppl"), "slimlm_ppl": mine and mine.get("wikitext2_ppl"),
                          "seconds": r.get("pruning_seconds"), "slimlm_seconds": mine and mine.get("pruning_seconds")})
    parts = ["## Quality, size, speed\n", markdown_table([r for r in rows if not r["method"].startswith("llm-")], columns)]
    if peers:
        parts += ["\n## llm-compressor beside slimlm (same tokens, same windows)\n", markdown_table(peers)]
    parts += ["\n## Sparse CPU matmul against dense (one 1536 x 576 layer, float32)\n", markdown_table(kernels)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
