"""Where slimlm's and llm-compressor's Wanda and SparseGPT part ways, and how far run-to-run noise reaches.

Writes `benchmarks/results/pruning_peer_agreement.{json,md}`. For each (config, method) it prunes
SmolLM2-135M three times on the same 128 x 512 calibration tokens as `benchmarks/pruning.py`:
llm-compressor (its own virtual environment, batch 1, its default), slimlm with calibration batch 8
(the setting of `pruning.py`) and slimlm with batch 1. Batch size changes nothing in the math (the
statistics and Hessians are sums over tokens), only the order of floating-point additions, so the
two slimlm runs measure how far rounding alone moves the result. Columns: WikiText-2 perplexity
(seqlen 512, first 40 windows, the windows of `pruning.py`) and the share of weights whose
keep/prune decision differs between two runs, over all pruned linears and per block (the first
block where the masks differ and the disagreement in the first, middle and last block).

    python benchmarks/pruning_peer_agreement.py --data-dir ../shared/data
    python benchmarks/pruning_peer_agreement.py --data-dir ../shared/data --quick   # checks the script

Finished cases are kept in `benchmarks/results/.pruning_peer_agreement.partial.json`, so an
interrupted run resumes.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import compress_job, llmcompressor, start  # noqa: E402

CONFIGS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7},
           "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}
METHODS = {"Wanda": "wanda", "SparseGPT": "sparsegpt"}
# The settings where llm-compressor came out ahead in pruning.md, plus Wanda 50% where the gap is smallest.
CASES = (("50%", "Wanda"), ("70%", "Wanda"), ("2:4", "Wanda"), ("60%", "SparseGPT"), ("70%", "SparseGPT"),
         ("4:8", "SparseGPT"))


def run_job(spec: dict) -> dict:
    """Child process: prune with slimlm, measure perplexity, write the pruned linears' weights."""
    from safetensors.torch import save_file

    from slimlm.eval.perplexity import perplexity

    model, tokenizer, result, _ = compress_job(spec, "pruning_seconds")
    windows = spec["protocol"]["perplexity"]
    result["wikitext2_ppl"] = perplexity(model, tokenizer, "wikitext2", windows["seqlen"], windows["max_windows"],
                                         spec["data_dir"]).ppl
    save_file({f"{name}.weight": module.weight.detach().float().contiguous()
               for name, module in model.named_modules() if name.startswith("model.layers.")
               and hasattr(module, "weight") and module.weight.dim() == 2}, spec["weights"])
    return result


def mask_disagreement(a_path: str, b_path: str) -> dict:
    """The share of weights pruned in one run and kept in the other: overall and per block."""
    import re

    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise RuntimeError(f"no common weights between {a_path} and {b_path}")
    per_block: dict[int, list[int]] = {}
    for name in shared:
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        differ = int(((a[name] == 0) != (b[name] == 0)).sum())
        counts = per_block.setdefault(block, [0, 0])
        counts[0] += differ
        counts[1] += a[name].numel()
    blocks = [per_block[i][0] / per_block[i][1] for i in sorted(per_block)]
    first = next((i for i, share in enumerate(blocks) if share > 0), None)
    return {"overall": sum(c[0] for c in per_block.values()) / sum(c[1] for c in per_block.values()),
            "first_block_differing": first, "per_block": blocks}


def run_case(config: str, method: str, args, proto: dict, tokens: dict) -> dict:
    from _shared import run_child

    stage = {"method": METHODS[method], **CONFIGS[config]}
    with tempfile.TemporaryDirectory() as directory:
        weights = {name: str(Path(directory) / f"{name}.safetensors") for name in ("peer", "batch8", "batch1")}
        runs = {}
        for name, batch in (("batch8", 8), ("batch1", 1)):
            spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stage": stage,
                    "calibration": tokens["calib_pt"], "calibration_batch_size": batch, "weights": weights[name]}
            runs[name] = run_child(__file__, args.data_dir, spec)
        settings = CONFIGS[config]
        peer = llmcompressor(tokens, ["--algo", METHODS[method], "--sparsity", str(settings.get("sparsity", 0.5)),
                                      "--mask-structure", settings.get("pattern", "0:0"),
                                      "--dump-weights", weights["peer"]])
        if peer["status"] != "ok":
            raise RuntimeError(f"llm-compressor {method} {config}: {peer['status']}: {peer.get('error')}")
        return {
            "config": config, "method": method,
            "ppl_slimlm_batch8": runs["batch8"]["wikitext2_ppl"], "ppl_slimlm_batch1": runs["batch1"]["wikitext2_ppl"],
            "ppl_llm_compressor": peer["ppl"],
            "seconds_slimlm_batch8": runs["batch8"]["pruning_seconds"],
            "seconds_slimlm_batch1": runs["batch1"]["pruning_seconds"],
            "seconds_llm_compressor": peer["compression_seconds"],
            "masks_batch8_vs_batch1": mask_disagreement(weights["batch8"], weights["batch1"]),
            "masks_batch8_vs_llm_compressor": mask_disagreement(weights["batch8"], weights["peer"]),
            "masks_batch1_vs_llm_compressor": mask_disagreement(weights["batch1"], weights["peer"]),
            "llm_compressor_versions": peer.get("versions"),
        }


def _table(rows: list[dict]) -> str:
    from slimlm.results import markdown_table

    ppl = [{"config": r["config"], "method": r["method"], "slimlm batch 8": r["ppl_slimlm_batch8"],
            "slimlm batch 1": r["ppl_slimlm_batch1"], "llm-compressor": r["ppl_llm_compressor"],
            "slimlm spread (%)": 100 * abs(r["ppl_slimlm_batch8"] - r["ppl_slimlm_batch1"])
            / min(r["ppl_slimlm_batch8"], r["ppl_slimlm_batch1"])} for r in rows]
    masks = []
    for r in rows:
        for pair in ("batch8_vs_batch1", "batch8_vs_llm_compressor", "batch1_vs_llm_compressor"):
            m = r[f"masks_{pair}"]
            blocks = m["per_block"]
            masks.append({"config": r["config"], "method": r["method"], "runs compared": pair.replace("_", " "),
                          "differing (%)": 100 * m["overall"], "first block differing": m["first_block_differing"],
                          "block 0 (%)": 100 * blocks[0], f"block {len(blocks) // 2} (%)": 100 * blocks[len(blocks) // 2],
                          f"block {len(blocks) - 1} (%)": 100 * blocks[-1]})
    return ("## WikiText-2 perplexity\n\n" + markdown_table(ppl) +
            "\n\n## Keep/prune decisions that differ between two runs\n\n" + markdown_table(masks))


def main() -> None:
    started = start(__doc__, CONFIGS, METHODS, "pruning_peer_agreement", 128, run_job)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    configs = {c.strip() for c in args.configs.split(",")}
    methods = {m.strip() for m in args.methods.split(",")}
    rows = [progress.record(f"{config}/{method}", lambda c=config, m=method: run_case(c, m, args, proto, tokens))
            for config, method in CASES if config in configs and method in methods]
    command = shlex.join(["python", "benchmarks/pruning_peer_agreement.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "machine": machine_info(),
              "versions": library_versions(), "date": utc_now(), "command": command}
    m = result["machine"]
    preamble = (f"# Pruning: slimlm against llm-compressor, decision by decision: smollm2-135m\n\nCommand: "
                f"`{command}`  \nMachine: {m['cpu']}, {m['cores']} cores  \nDate: {result['date']}\n\n"
                + __doc__.split("\n\n")[1].replace("\n", " ") + "\n")
    write_results(out, [result], _table(rows), preamble=preamble)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
