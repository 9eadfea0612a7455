"""lm-evaluation-harness through slimlm's `slimlm` model class against slimlm's built-in zero-shot evaluation,
on the same examples: PIQA, ARC-Easy and HellaSwag, first N examples (default 200), SmolLM2-135M float32.

lm-eval builds its prompts from its own task YAMLs (`slimlm.harness.local_tasks`: lm-eval's piqa / arc_easy /
hellaswag YAMLs, HellaSwag's process_docs included, pointed at the local files in the datasets' field layout);
slimlm builds its own (`slimlm.data.tasks`). Both score with the same model. Agreement means equal accuracy
to the printed digit (4 decimals), for acc and acc_norm and their standard errors.

    python benchmarks/harness_agreement.py --data-dir ../shared/data [--limit 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("piqa", "arc_easy", "hellaswag")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(RESULTS / "harness_agreement"))
    args = parser.parse_args()

    from importlib.metadata import version

    from slimlm.eval.zeroshot import evaluate_task
    from slimlm.harness import evaluate_harness, harness_rows
    from slimlm.models.loading import load_model
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    loaded = load_model(args.model)
    rows = []
    for task in TASKS:
        start = time.perf_counter()
        ours = evaluate_task(loaded.model, loaded.tokenizer, task, args.data_dir, args.limit)
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        theirs = {r["metric"]: r for r in harness_rows(
            evaluate_harness(loaded.model, loaded.tokenizer, [task], args.data_dir, args.limit))}
        theirs_seconds = time.perf_counter() - start
        for metric in ("acc", "acc_norm"):
            mine, other = ours[metric], theirs[metric]
            printed = (f"{mine:.4f}", f"{ours[metric + '_stderr']:.4f}")
            printed_other = (f"{other['value']:.4f}", f"{other['stderr']:.4f}")
            rows.append({"task": task, "metric": metric, "n": ours["n"], "lm_eval_n": other["n"],
                         "slimlm": printed[0], "slimlm_stderr": printed[1], "lm_eval": printed_other[0],
                         "lm_eval_stderr": printed_other[1], "agree": printed == printed_other,
                         "slimlm_s": round(ours_seconds, 1), "lm_eval_s": round(theirs_seconds, 1)})
        print(rows[-2:], flush=True)
    record = {"model": args.model, "limit": args.limit, "rows": rows, "machine": machine_info(),
              "versions": {**library_versions(), "lm_eval": version("lm_eval")}, "date": utc_now(),
              "command": f"python benchmarks/harness_agreement.py --data-dir DATA --limit {args.limit}"}
    agree = sum(r["agree"] for r in rows)
    preamble = (f"# lm-evaluation-harness (slimlm model class) against slimlm's built-in zero-shot: {args.model}\n\n"
                f"Command: `{record['command']}`  \nMachine: {record['machine']['cpu']}, "
                f"{record['machine']['cores']} cores; torch {record['versions']['torch']}, transformers "
                f"{record['versions']['transformers']}, lm_eval {record['versions']['lm_eval']}  \n"
                f"Date: {record['date']}\n\nFirst {args.limit} examples of each task, 0-shot, float32. lm-eval "
                "builds the prompts from its own task YAMLs pointed at the local files; slimlm from "
                f"`slimlm.data.tasks`. Printed values equal (value and stderr, 4 decimals): {agree} of {len(rows)}.")
    write_results(args.out, [record], markdown_table(rows), preamble)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
