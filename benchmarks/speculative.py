"""Speculative decoding benchmark: tokens/s against plain greedy decoding, in alternating runs, one process.

Writes `benchmarks/results/speculative.{json,md}` (`--quick`: `speculative-quick.*`, a small protocol to
check the script). Model: SmolLM2-135M (`--model`), batch 1, greedy, no EOS stop; prompts: `--prompts`
windows of `--prompt-tokens` tokens from the WikiText-2 test split (evenly spaced through it), each followed
by `--new-tokens` generated tokens. One thread (`torch.set_num_threads(1)`).

Targets and decoders, all built in this process:
- float32 target: plain greedy with slimlm's runner (`ModelRunner`), plain greedy with the runner as it was
  before the few-row GEMM change (`ModelRunner(small_gemm=False)`, for reference), and speculative decoding
  with drafts built from the target in memory (`slimlm.infer.draft.build_draft`): `lookup` (tokens copied
  from the context, no model), `self:rtn-w4g64-head8`, `self:rtn-w8-head8`, `self:fp16`;
- W4 target (the float32 model compressed with `rtn-w4g64-head8` through `slimlm.compress`): plain greedy,
  and speculative decoding with the `lookup` and `self` drafts (`self`: its own weights in the lean runner);
- for each target, plain greedy through the draft runner itself (`lean plain`: `build_draft(target, "self")`,
  slimlm's runner on the native decode path, `LeanRunner` elsewhere; not part of the acceptance: it is
  not the target's own arithmetic, see the notes the script writes).
Speculative runs choose gamma automatically (`gamma=None`: the pair's measured costs c and v, and the
acceptance so far; `slimlm.infer.speculative`). One warm-up call per decoder on the first prompt measures the
pair's costs (the calibration time is reported) before the timed runs.

Timed runs: `--repeats` rounds; in each round every prompt is decoded by every decoder, the order of the
decoders rotating from round to round. Per round and decoder: tokens/s = all generated tokens / all seconds
over the prompts (wall clock; CPU seconds of the thread are reported beside it, as other work shares the
machine); the ratio to plain greedy is taken within the round; medians over the rounds. Acceptance: alpha =
accepted / (accepted + rejections) pooled over the timed runs (Leviathan et al.'s per-token acceptance in
their i.i.d. model) and accepted / drafted. c and v(gamma) are the pair's medians at the end. Greedy output
is compared with plain greedy decoding of the same target, token by token, in every run.

    python benchmarks/speculative.py --data-dir ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT_DRAFTS = ("lookup", "self:rtn-w4g64-head8", "self:rtn-w8-head8", "self:fp16")
W4_DRAFTS = ("lookup", "self")
W4_PRESET = "rtn-w4g64-head8"


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SLIMLM_DATA", "../shared/data"))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--drafts", default=",".join(FLOAT_DRAFTS), help="drafts of the float32 target")
    parser.add_argument("--w4-drafts", default=",".join(W4_DRAFTS), help="drafts of the W4 target")
    parser.add_argument("--kernels", choices=["auto", "native", "bf16", "reference"], default="auto",
                        help="SLIMLM_KERNELS (auto: the decode path slimlm.quant.kernels measures fastest here)")
    parser.add_argument("--quick", action="store_true", help="small protocol to check the script")
    parser.add_argument("--out", default=str(RESULTS / "speculative"))
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.prompts, args.repeats = 32, 12, 1, 1
        args.drafts = ",".join(FLOAT_DRAFTS[:2])
        args.out = args.out + "-quick" if Path(args.out).parent == RESULTS else args.out
    return args


def main() -> None:
    args = options()
    if args.kernels != "auto":
        os.environ["SLIMLM_KERNELS"] = args.kernels
    import torch

    torch.set_num_threads(1)
    from slimlm.compress import compress
    from slimlm.data.calibration import tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.infer import ModelRunner, generate_ids
    from slimlm.infer.draft import build_draft
    from slimlm.infer.speculative import pair_costs, speculative_decode
    from slimlm.models.loading import load_model
    from slimlm.quant.kernels import kernel_choice
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    started = time.perf_counter()
    loaded = load_model(args.model)
    text = tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2", split="eval", data_dir=args.data_dir))
    stride = len(text) // (args.prompts + 1)
    prompts = [text[(i + 1) * stride:(i + 1) * stride + args.prompt_tokens].tolist() for i in range(args.prompts)]
    float_model = loaded.model
    w4_model = copy.deepcopy(float_model)
    compress(w4_model, W4_PRESET)
    targets = {"float32": float_model, W4_PRESET: w4_model}
    new = args.new_tokens

    decoders: dict[str, dict] = {}  # name -> {target, kind, run(prompt) -> (tokens, stats or None)}

    def plain(name: str, target: str, runner) -> None:
        decoders[name] = {"target": target, "kind": "plain", "runner": runner,
                          "run": lambda p, r=runner: (generate_ids(r, [p], new).tokens[0], None)}

    build_s = {}
    for target_name, model in targets.items():
        target_runner = ModelRunner(model)
        plain(f"{target_name} plain", target_name, target_runner)
        if target_name == "float32":
            plain("float32 plain, runner before (F.linear)", target_name, ModelRunner(model, small_gemm=False))
        begin = time.perf_counter()
        lean_self = build_draft(model, "self")
        draft_runner_kind = type(lean_self).__name__
        build_s[f"{target_name} <- self"] = time.perf_counter() - begin
        plain(f"{target_name} lean plain", target_name, lean_self)
        specs = [spec for spec in (args.drafts if target_name == "float32" else args.w4_drafts).split(",") if spec]
        for spec in specs:
            begin = time.perf_counter()
            draft = lean_self if spec == "self" else build_draft(model, spec)
            build_s.setdefault(f"{target_name} <- {spec}", time.perf_counter() - begin)
            decoders[f"{target_name} <- {spec}"] = {
                "target": target_name, "kind": "speculative", "draft": spec, "runner": target_runner,
                "draft_runner": draft,
                "run": lambda p, t=target_runner, d=draft: speculative_decode(t, d, p, new)}

    reference = {(name, i): generate_ids(ModelRunner(model), [p], new).tokens[0]
                 for name, model in targets.items() for i, p in enumerate(prompts)}
    calibration = {}
    for name, decoder in decoders.items():  # warm-up; speculative pairs measure their costs here
        _, stats = decoder["run"](prompts[0])
        if stats is not None:
            calibration[name] = stats.calibration_s

    samples: dict[str, list[dict]] = {name: [] for name in decoders}
    identical = {name: True for name in decoders}
    names = list(decoders)
    for round_index in range(args.repeats):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for i, prompt in enumerate(prompts):
            for name in order:
                decoder = decoders[name]
                wall, cpu = time.perf_counter(), time.thread_time()
                tokens, stats = decoder["run"](prompt)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                same = tokens == reference[(decoder["target"], i)]
                identical[name] &= same
                samples[name].append({"round": round_index, "prompt": i, "tokens": len(tokens), "wall_s": wall,
                                      "cpu_s": cpu, "identical": same,
                                      "stats": stats.to_dict() if stats is not None else None})

    rows, costs_rows, runs = [], [], {}
    for name, decoder in decoders.items():
        per_round = {}
        for sample in samples[name]:
            entry = per_round.setdefault(sample["round"], {"tokens": 0, "wall_s": 0.0, "cpu_s": 0.0})
            for key in ("tokens", "wall_s", "cpu_s"):
                entry[key] += sample[key]
        runs[name] = per_round
    for name, decoder in decoders.items():
        base = runs[f"{decoder['target']} plain"]
        speed = [r["tokens"] / r["wall_s"] for r in runs[name].values()]
        ratio = [(r["tokens"] / r["wall_s"]) / (base[k]["tokens"] / base[k]["wall_s"]) for k, r in runs[name].items()]
        ratio_cpu = [(r["tokens"] / r["cpu_s"]) / (base[k]["tokens"] / base[k]["cpu_s"])
                     for k, r in runs[name].items()]
        row = {"target": decoder["target"], "decoding": name.split(" ", 1)[1] if decoder["kind"] == "plain"
               else f"speculative, draft {decoder['draft']}", "tokens_per_s": statistics.median(speed),
               "ratio_to_plain": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
               "ratio_to_plain_cpu": statistics.median(ratio_cpu),
               "identical_to_plain_greedy": f"{sum(s['identical'] for s in samples[name])}/{len(samples[name])}"}
        if decoder["kind"] == "speculative":
            stats = [s["stats"] for s in samples[name]]
            accepted = sum(s["accepted"] for s in stats)
            rejections = sum(s["rejections"] for s in stats)
            drafted = sum(s["drafted"] for s in stats)
            gammas = [g for s in stats for g in s["gammas"] if g]
            costs = pair_costs(decoder["runner"], decoder["draft_runner"])
            alpha = accepted / (accepted + rejections) if accepted + rejections else float("nan")
            mean_gamma = statistics.mean(gammas) if gammas else 0.0
            typical = max(set(gammas), key=gammas.count) if gammas else 1
            per_forward = sum(s["new_tokens"] for s in stats) / sum(s["iterations"] for s in stats)
            row.update(alpha=alpha, acceptance_rate=accepted / drafted if drafted else float("nan"),
                       tokens_per_target_forward=per_forward,
                       mean_gamma=mean_gamma, most_chosen_gamma=typical, cost_ratio_c=costs.cost_ratio,
                       verify_ratio_v=costs.verify_ratio(typical),
                       expected_speedup=costs.expected_speedup(min(alpha, 1.0), typical),
                       shared_cache=all(s["shared_cache"] for s in stats),
                       calibration_s=calibration.get(name), draft_build_s=build_s.get(name))
            costs_rows.append({"pair": name, "draft_step_ms": 1e3 * costs.draft_s,
                               **{f"target_{k}_tokens_ms": 1e3 * v for k, v in costs.target_s.items()},
                               "c": costs.cost_ratio,
                               **{f"v({g})": costs.verify_ratio(g) for g in range(1, costs.max_gamma + 1)}})
        rows.append(row)

    choice = kernel_choice().to_dict()
    record = {"benchmark": "speculative", "model": args.model, "quick": args.quick, "protocol": {
        **vars(args), "prompt_source": "WikiText-2 test split (slimlm.data.corpora 'wikitext2', eval), windows "
                                       f"starting at tokens {[(i + 1) * stride for i in range(args.prompts)]}",
        "greedy": True, "batch": 1, "stop_at_eos": False},
        "machine": machine_info(), "cpu_flags": list(choice["cpu_flags"]), "kernel_choice": choice,
        "versions": library_versions(), "date": utc_now(), "command": shlex.join([sys.executable, *sys.argv]),
        "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - started,
        "rows": rows, "costs": costs_rows, "samples": samples}
    float_best = max((r["ratio_to_plain"] for r in rows if r["target"] == "float32"
                      and r["decoding"].startswith("speculative")), default=float("nan"))
    w4_best = max((r["ratio_to_plain"] for r in rows if r["target"] == W4_PRESET
                   and r["decoding"].startswith("speculative")), default=float("nan"))
    all_identical = all(identical[n] for n, d in decoders.items() if d["kind"] == "speculative")
    verdict = (f"Acceptance (issue 15): speculative >= 1.3x plain greedy on the float32 target: "
               f"{'met' if float_best >= 1.3 else 'NOT met'} (best median ratio {float_best:.3f}); > 1.0x on the W4 "
               f"target: {'met' if w4_best > 1.0 else 'NOT met'} ({w4_best:.3f}); greedy output identical to plain "
               f"greedy in every speculative run: {'yes' if all_identical else 'NO'}.")
    tables = ("## Tokens/s and ratio to plain greedy (medians over rounds)\n\n" + markdown_table(rows)
              + "\n## Measured costs per pair (medians of the kept samples, at the end)\n\n"
              + markdown_table(costs_rows))
    preamble = (f"# Speculative decoding benchmark ({'quick protocol' if args.quick else 'full protocol'})\n\n"
                f"Model {args.model}, batch 1, greedy, {len(prompts)} WikiText-2 test prompts of {args.prompt_tokens} "
                f"tokens, {new} new tokens, {args.repeats} rounds of alternating runs in one process, 1 torch thread, "
                f"{record['date']}. CPU {record['machine']['cpu']} (flags: {', '.join(choice['cpu_flags'])}); "
                f"kernels: {choice['label']} ({choice['reason']}); drafts built from the target run in "
                f"`{draft_runner_kind}`. Command: `{record['command']}`. "
                f"See the docstring of benchmarks/speculative.py for the protocol.\n\n{verdict}")
    json_path, md_path = write_results(args.out, [record], tables, preamble)
    print(preamble + "\n\n" + tables)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
