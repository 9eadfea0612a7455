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
times PyTorch's sparse CPU matmul against dense on a pruned layer.

Structured pruning (a second table) at 10, 20 and 30 % fewer parameters than the dense model, each
method's knob set from the model's shapes: LLM-Pruner (ratio of block units = target / share of
block parameters; KV groups and MLP channels; without and with LoRA recovery of 20 steps x 4 x 512
tokens), SliceGPT (the paper's per-block rotations with shortcut matrices, and one shared rotation;
the accepted width whose parameter count is closest to the target, LM head untied), FLAP (the
paper's AL-AM, and the uniform UL-UM of slimlm's presets; ratio of block parameters as for
LLM-Pruner) and layer removal (ShortGPT angular criterion, the nearest number of blocks). Each structured row also records whether plain transformers `from_pretrained` loads the
saved model and gives the same logits.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import compress_job, evaluate_quality, llmcompressor_row, preamble, run_child, start  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7},
           "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}
METHODS = {"magnitude": {"method": "magnitude"}, "Wanda": {"method": "wanda"},
           "SparseGPT": {"method": "sparsegpt"}, "DSnoT (Wanda)": {"method": "dsnot", "initial": "wanda"},
           "Wanda + OWL": {"method": "wanda", "owl": {}}}
PEER_ALGOS = {"SparseGPT": "sparsegpt", "Wanda": "wanda"}
LEVELS = {"-10% params": 0.10, "-20% params": 0.20, "-30% params": 0.30}
STRUCTURED = ("LLM-Pruner", "LLM-Pruner + LoRA", "SliceGPT", "SliceGPT one rotation", "FLAP", "FLAP uniform",
              "layer removal")
LORA = {"steps": 20, "batch_size": 4}


def block_share(model_dir: str) -> tuple[float, int]:
    """(the blocks' share of the model's parameters, the number of blocks), from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.models.adapter import ModelAdapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    adapter = ModelAdapter(model)
    blocks = sum(p.numel() for p in adapter.blocks.parameters())
    return blocks / sum(p.numel() for p in model.parameters()), len(adapter)


def structured_stage(method: str, level: float, share: float, blocks: int) -> dict:
    """The stage that removes about `level` of the model's parameters with `method`."""
    block_ratio = level / share  # of the blocks' parameters, what removes `level` of the model's
    if method.startswith("SliceGPT"):
        rotation = "global" if method.endswith("one rotation") else "per_block"
        return {"method": "slicegpt", "parameter_reduction": level, "rotation": rotation}
    if method.startswith("FLAP"):
        return {"method": "flap", "ratio": block_ratio, "structure": "UL-UM" if method.endswith("uniform") else "AL-AM"}
    if method == "layer removal":
        return {"method": "drop_layers", "count": round(block_ratio * blocks)}
    stage = {"method": "llm_pruner", "ratio": block_ratio}
    return {**stage, "recovery": LORA} if method.endswith("LoRA") else stage


def run_job(spec: dict) -> dict:
    """One slimlm job (in a child process): prune, save, evaluate, time."""
    from slimlm.eval.efficiency import count_nonzero_parameters, count_parameters, measure_latency
    from slimlm.export.native import model_bytes, save

    proto, data_dir = spec["protocol"], spec["data_dir"]
    model, tokenizer, result, report = compress_job(spec, "pruning_seconds")
    if report is not None and report.block_sparsity:
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
    if report is not None and report.structure:
        result["structure"] = report.structure
        result["plain_transformers_load"] = plain_transformers_load(model)
    elif spec["stage"] is not None:  # the same model with its pruned linears stored compressed (N:M or CSR)
        from slimlm.prune.sparse_linear import sparsify_model_

        pattern = spec["stage"].get("pattern")
        sparsify_model_(model, tuple(int(p) for p in pattern.split(":")) if pattern else None)
        with tempfile.TemporaryDirectory() as directory:
            result["disk_bytes_sparse_storage"] = model_bytes(save(model, Path(directory) / "m", tokenizer))
    return result


def plain_transformers_load(model) -> str:
    """Whether `save_pretrained` + plain `from_pretrained` rebuild the model (same logits on a probe)."""
    import torch
    from transformers import AutoModelForCausalLM

    probe = torch.arange(1, 33)[None, :]
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
        except Exception as error:  # noqa: BLE001 - the refusal is what we record
            return f"refused: {type(error).__name__}: {str(error)[:120]}"
        with torch.no_grad():
            same = torch.equal(reloaded(probe).logits, model(probe).logits)
    return "same logits" if same else "loads, different logits (use slimlm.load)"


def sparse_kernels(quick: bool) -> list[dict]:
    """Dense float32 matmul against PyTorch's CSR sparse matmul on a magnitude-pruned 1536 x 576 layer, and
    the bytes slimlm's SparseLinear stores for it (N:M packed for 2:4, else CSR with int16 columns)."""
    import torch

    from slimlm.core.sparsity import n_m_mask, unstructured_mask
    from slimlm.prune.sparse_linear import SparseLinear

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
        stored = SparseLinear.from_dense(pruned, n_m=(2, 4) if label == "2:4" else None)
        for tokens in (1, 512):
            x = torch.randn(tokens, 576)
            dense_ms = timed(lambda: x @ pruned.T)
            sparse_ms = timed(lambda: (csr @ x.T).T)
            rows.append({"pattern": label, "tokens": tokens, "dense_ms": dense_ms, "csr_ms": sparse_ms,
                         "speedup_csr": dense_ms / sparse_ms, "dense_bytes": pruned.numel() * 4,
                         "slimlm_stored_bytes": sum(b.numel() * b.element_size() for b in stored.buffers())})
    return rows


def semi_structured_on_cpu() -> str:
    """Whether PyTorch's 2:4 semi-structured sparse tensors work on this CPU (they target NVIDIA GPUs)."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    from slimlm.core.sparsity import n_m_mask

    weight = torch.randn(128, 128)
    try:
        to_sparse_semi_structured(weight.masked_fill(n_m_mask(weight.abs(), 2, 4), 0).to(torch.bfloat16))
    except Exception as error:  # noqa: BLE001 - any refusal is the answer we record
        return f"not available: {type(error).__name__}: {str(error)[:160]}"
    return "available"


def main() -> None:
    def structured_options(parser) -> None:
        parser.add_argument("--structured", default=",".join(STRUCTURED),
                            help="comma-separated subset of " + ", ".join(STRUCTURED) + ' ("" for none)')

    started = start(__doc__, CONFIGS, METHODS, "pruning", 128, run_job, structured_options)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    def child(config: str, method: str, stage: dict | None) -> dict:
        spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stage": stage,
                "calibration": tokens["calib_pt"]}
        return run_child(__file__, args.data_dir, spec)

    configs = [c.strip() for c in args.configs.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    rows = [progress.record("dense", lambda: child("dense", "-", None))]
    structured = [m.strip() for m in args.structured.split(",") if m.strip()]
    share, blocks = block_share(str(tokens["model_dir"])) if structured else (1.0, 0)
    for level_name, level in LEVELS.items():
        for method in structured:
            stage = structured_stage(method, level, share, blocks)
            rows.append(progress.record(f"{level_name}/{method}",
                                        lambda c=level_name, m=method, s=stage: child(c, m, s)))
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
    kernels = progress.record("sparse kernels", lambda: {"rows": sparse_kernels(args.quick),
                                                         "semi_structured": semi_structured_on_cpu()})
    kernels, semi_structured = kernels["rows"], kernels["semi_structured"]
    command = shlex.join(["python", "benchmarks/pruning.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "sparse_kernels": kernels,
              "semi_structured_cpu": semi_structured,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command}
    write_results(out, [result], _tables(rows, kernels, semi_structured), preamble=_preamble(result))
    print(out.with_suffix(".md").read_text())


def _peer(tokens: dict, config: str, algo: str) -> dict:
    settings = CONFIGS[config]
    extra = ["--algo", algo, "--sparsity", str(settings.get("sparsity", 0.5)),
             "--mask-structure", settings.get("pattern", "0:0")]
    return llmcompressor_row(tokens, extra, config, algo, "pruning_seconds")


def _preamble(result: dict) -> str:
    speed = result["protocol"]["speed"]
    return preamble("Pruning", result, "pruned") + (
        f"Latency: prefill of {speed['prompt_tokens']} tokens and decode at batch 1 with dense float32 kernels, "
        "so pruned weights cost the same time as kept ones. Every decoder linear is pruned; DSnoT keeps its "
        "reference default of leaving the MLP linears with their initial Wanda mask."
    )


def _tables(rows: list[dict], kernels: list[dict], semi_structured: str) -> str:
    from slimlm.results import markdown_table

    columns = ("config", "method", "wikitext2_ppl", "c4_ppl", "kl_mean", "piqa_acc_norm", "arc_easy_acc",
               "hellaswag_acc_norm", "parameters", "nonzero_parameters", "disk_bytes", "disk_bytes_sparse_storage",
               "prefill_ms",
               "decode_tokens_per_s", "pruning_seconds")
    ours = {(r["config"], r["method"]): r for r in rows}
    peers = []
    for r in rows:
        if r["method"].startswith("llm-compressor"):
            mine = ours.get((r["config"], {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[r["method"].split()[-1]]))
            peers.append({"config": r["config"], "tool": r["method"], "status": r["status"],
                          "ppl": r.get("wikitext2_ppl"), "slimlm_ppl": mine and mine.get("wikitext2_ppl"),
                          "seconds": r.get("pruning_seconds"), "slimlm_seconds": mine and mine.get("pruning_seconds")})
    unstructured = [r for r in rows if not r["method"].startswith("llm-") and r["config"] not in LEVELS]
    parts = ["## Unstructured and N:M: quality, size, speed\n", markdown_table(unstructured, columns)]
    dense = ours.get(("dense", "-"))
    structured = [{**r, "parameter_reduction": 1 - r["parameters"] / dense["parameters"],
                   "prefill_speedup": dense["prefill_ms"] / r["prefill_ms"]}
                  for r in rows if r["config"] in LEVELS and dense is not None]
    if structured:
        parts += ["\n## Structured: fewer parameters, a smaller dense model\n", markdown_table(
            [dense, *structured], ("config", "method", "parameters", "parameter_reduction", "wikitext2_ppl", "c4_ppl",
                                   "kl_mean", "piqa_acc_norm", "arc_easy_acc", "hellaswag_acc_norm", "disk_bytes",
                                   "prefill_ms", "prefill_speedup", "decode_tokens_per_s", "pruning_seconds",
                                   "plain_transformers_load"))]
    if peers:
        parts += ["\n## llm-compressor beside slimlm (same tokens, same windows)\n", markdown_table(peers)]
    parts += ["\n## Sparse CPU matmul against dense (one 1536 x 576 layer, float32)\n", markdown_table(kernels),
              f"\nPyTorch 2:4 semi-structured sparse tensors on this CPU: {semi_structured}\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
