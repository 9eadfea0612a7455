"""Distillation benchmark: recover a compressed SmolLM2-135M with each objective at an equal token budget.

    python benchmarks/distillation.py --data-dir ../shared/data [--students drop10] [--methods ce,kd,...]

Teacher: SmolLM2-135M (the embedded GGUF, dequantized, float32). Students: the teacher compressed by a recipe
(`STUDENTS`: layer removal of 10 of 30 blocks, SparseGPT 2:4, FLAP -20%). Each student is trained from the
same starting weights with each objective (`METHODS`) on the same C4 tokens (documents 0-999, the calibration
split, in 256-token segments, the same batches in the same order), with the same optimizer settings, and
evaluated on:

- WikiText-2 and C4 (documents 1000-1999) perplexity and KL(teacher || student), 20 windows of 512 tokens;
- zero-shot PIQA, ARC-Easy and HellaSwag accuracy on the first `--limit` examples;
- generation quality (the measure of GKD's and MiniLLM's claims): the student continues 16 held-out C4 prompts
  of 64 tokens by 48 sampled tokens (temperature 1, fixed seeds), and the teacher scores those continuations:
  their mean per-token NLL under the teacher (lower: text the teacher finds more likely);
- held-out KL on 8 C4 evaluation segments of 256 tokens every `--eval-every` steps (the plot).

Writes benchmarks/results/distillation.{json,md} and distillation-kl.svg; finished rows are kept in a progress
file beside them, so a killed run continues with the next row.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from slimlm.compress import compress  # noqa: E402
from slimlm.compress.recipe import load_recipe  # noqa: E402
from slimlm.core.blocks import CompressionReport  # noqa: E402
from slimlm.data.calibration import calibration_samples, tokenize_corpus  # noqa: E402
from slimlm.data.corpora import load_corpus  # noqa: E402
from slimlm.distill.ce import CrossEntropy  # noqa: E402
from slimlm.distill.data import token_segments  # noqa: E402
from slimlm.distill.gkd import GeneralizedKD  # noqa: E402
from slimlm.distill.hidden import HiddenStateDistillation, layer_map_after_removal, uniform_layer_map  # noqa: E402
from slimlm.distill.kd import KnowledgeDistillation  # noqa: E402
from slimlm.distill.minillm import MiniLLM  # noqa: E402
from slimlm.distill.sampling import prompt_batch, sample_continuations  # noqa: E402
from slimlm.distill.ted import TEDStage  # noqa: E402
from slimlm.distill.trainer import TrainingConfig, train  # noqa: E402
from slimlm.eval.kl import kl_divergence, token_kl  # noqa: E402
from slimlm.eval.zeroshot import evaluate_task  # noqa: E402
from slimlm.models.loading import load_model  # noqa: E402
from slimlm.quant.kernels import cpu_flags  # noqa: E402
from slimlm.report.plots import line_svg  # noqa: E402
from slimlm.results import atomic_write_text  # noqa: E402

RESULTS = ROOT / "results"
STUDENTS = {
    "drop10": [{"method": "drop_layers", "count": 10, "criterion": "angular"}],
    "sparsegpt-2of4": [{"method": "sparsegpt", "sparsity": 0.5, "n_m": [2, 4]}],
    "flap-20": [{"method": "flap", "ratio": 0.2}],
}
METHODS = ("ce", "kd", "reverse-kl", "gkd", "hidden", "ted", "minillm")
TASKS = ("piqa", "arc_easy", "hellaswag")
SEQLEN = 256


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--students", default="drop10", help="comma-separated subset of " + ", ".join(STUDENTS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--limit", type=int, default=100, help="first N examples of each zero-shot task")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few steps and windows, to check the script")
    parser.add_argument("--out", default=str(RESULTS / "distillation"))
    parser.add_argument("--report", action="store_true", help="only write the results from the progress file")
    parser.add_argument("--precision-speed", action="store_true",
                        help="only time KD steps in float32 and under bfloat16 autocast, alternating (medians), "
                             "into distillation-precision.{json,md}")
    return parser.parse_args()


def objective_for(method: str, teacher, student, removed: list[int], data, config: TrainingConfig):
    if method == "ce":
        return CrossEntropy()
    if method in ("kd", "reverse-kl"):
        return KnowledgeDistillation(teacher, temperature=1.0, alpha=1.0,
                                     divergence="forward" if method == "kd" else "reverse")
    if method == "gkd":
        eos = student.generation_config.eos_token_id
        return GeneralizedKD(teacher, lam=0.5, beta=0.5, max_new_tokens=64, sampling_temperature=1.0,
                             eos_id=eos[0] if isinstance(eos, list) else eos, pad_id=0)
    if method == "minillm":
        eos = student.generation_config.eos_token_id
        return MiniLLM(teacher, alpha=0.2, max_new_tokens=64, pt_weight=1.0,
                       eos_id=eos[0] if isinstance(eos, list) else eos, pad_id=0)
    if method == "ted":  # stage 1 (both models' filters, 16 steps each) happens here, outside the token budget
        report = CompressionReport(structure=[{"method": "drop_layers", "removed_blocks": removed}] if removed else [])
        stage = TEDStage(filter_interval=5, filter_steps=16, training=config, seqlen=SEQLEN)
        return stage.build_objective(teacher, student, report, data)
    if method == "hidden":
        layers_t = teacher.config.num_hidden_layers
        layers_s = student.config.num_hidden_layers
        mapping = layer_map_after_removal(layers_t, removed) if removed else uniform_layer_map(layers_s, layers_t)
        return HiddenStateDistillation(teacher, student, mapping)
    raise SystemExit(f"unknown method {method!r}")


class Evaluator:
    """Everything measured on a model, against the teacher."""

    def __init__(self, teacher, tokenizer, data_dir: str, limit: int, quick: bool):
        self.teacher, self.tokenizer, self.data_dir, self.limit = teacher, tokenizer, data_dir, limit
        self.windows = 2 if quick else 20
        self.quick = quick
        held_out = tokenize_corpus(tokenizer, load_corpus("c4", split="eval", data_dir=data_dir))
        self.kl_segments = held_out[: 8 * SEQLEN].view(8, SEQLEN)  # the start of the C4 evaluation documents
        with torch.no_grad():
            self.kl_reference = teacher(self.kl_segments).logits
        prompts = held_out[-16 * 64:].view(16, 64)  # the end of them: no overlap with the KL segments
        self.prompts = prompts[:2] if quick else prompts

    @torch.no_grad()
    def held_out_kl(self, model) -> float:
        logits = model(self.kl_segments).logits
        return float(token_kl(self.kl_reference.flatten(0, 1), logits.flatten(0, 1)).mean())

    @torch.no_grad()
    def sample_nll(self, model, new_tokens: int = 48) -> float:
        """Mean per-token NLL under the teacher of the model's sampled continuations of the prompts (the same
        seed for every model; no end-of-sequence stop, so every continuation has `new_tokens` tokens)."""
        prompts = prompt_batch(self.prompts.tolist())
        sampled = sample_continuations(model, prompts, new_tokens, 1.0, torch.Generator().manual_seed(0), None, 0)
        logprobs = torch.log_softmax(self.teacher(sampled.ids).logits[:, :-1].float(), dim=-1)
        token_nll = -logprobs.gather(-1, sampled.ids[:, 1:, None])[..., 0]
        return float(token_nll[sampled.targets].mean())

    def measure(self, model) -> dict:
        model.eval()
        row = {}
        for corpus in ("wikitext2", "c4"):
            kl = kl_divergence(model, self.teacher, self.tokenizer, corpus, seqlen=512, max_windows=self.windows,
                               data_dir=self.data_dir)
            row[f"{corpus}_ppl"], row[f"{corpus}_kl"] = kl.ppl, kl.kl_mean
            row[f"{corpus}_ppl_teacher"] = kl.ppl_reference
        for task in TASKS:
            result = evaluate_task(model, self.tokenizer, task, self.data_dir, limit=2 if self.quick else self.limit)
            row[task] = result.get("acc_norm", result.get("acc"))
        row["sample_teacher_nll"] = self.sample_nll(model, 4 if self.quick else 48)
        row["held_out_kl"] = self.held_out_kl(model)
        return row


def build_student(teacher, recipe: list[dict], calibration: torch.Tensor) -> tuple[torch.nn.Module, list[int]]:
    student = copy.deepcopy(teacher)
    for param in student.parameters():
        param.requires_grad_(True)
    report = compress(student, load_recipe({"stages": recipe, "float_storage": "float32"}), calibration)
    removed = [i for entry in report.structure if entry.get("method") == "drop_layers"
               for i in entry.get("removed_blocks", [])]
    return student, removed


def precision_speed(args: argparse.Namespace) -> None:
    """Seconds per KD step (4 x 256 tokens, teacher forward included) of the drop10-uniform student, float32
    against bfloat16 autocast, alternating, 2 steps per run, `repeats` runs each; the ratio of the medians."""
    loaded = load_model("smollm2-135m")
    teacher, tokenizer = loaded.model.eval(), loaded.tokenizer
    student, _ = build_student(teacher, [{"method": "drop_layers", "count": 10, "criterion": "uniform"}], None)
    ids = tokenize_corpus(tokenizer, load_corpus("c4", split="calibration", data_dir=args.data_dir))
    data = token_segments(ids, SEQLEN, "C4 documents 0-999", pad_id=0)
    repeats = 1 if args.quick else 3
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(repeats):
        for precision in seconds:
            model = copy.deepcopy(student)
            result = train(model, KnowledgeDistillation(teacher), data,
                           TrainingConfig(steps=2, batch_size=args.batch_size, lr=args.lr, precision=precision))
            seconds[precision].append(result.seconds / result.steps)
    medians = {precision: sorted(values)[len(values) // 2] for precision, values in seconds.items()}
    out = RESULTS / ("distillation-precision-quick" if args.quick else "distillation-precision")
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"CPU flags {' '.join(cpu_flags())}", "torch": torch.__version__}
    ratio = medians["float32"] / medians["bfloat16"]
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "seconds_per_step": seconds,
                                                            "median": medians, "speedup": ratio}, indent=1) + "\n")
    text = (f"# KD step time, float32 against bfloat16 autocast ({meta['date']})\n\n`{meta['command']}` on "
            f"{meta['machine']}, torch {meta['torch']}.\n\nOne step: {args.batch_size} x {SEQLEN} tokens, teacher "
            "SmolLM2-135M forward, student (20 of 30 blocks) forward and backward, AdamW. Runs alternate, "
            f"{repeats} of each, 2 steps per run.\n\n| precision | median s/step | runs |\n|---|---|---|\n"
            + "".join(f"| {p} | {medians[p]:.2f} | {', '.join(f'{v:.2f}' for v in seconds[p])} |\n" for p in seconds)
            + f"\nbfloat16 autocast speed-up: {ratio:.2f}x\n")
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


def main() -> None:
    args = arguments()
    if args.precision_speed:
        precision_speed(args)
        return
    if args.report:
        out = Path(args.out)
        config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                warmup_steps=min(4, args.steps - 1))
        write_results(out, json.loads((out.parent / f".{out.name}.partial.json").read_text()), args, config)
        return
    out = Path(args.out if not args.quick else args.out + "-quick")
    partial = out.parent / f".{out.name}.partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}
    steps = 2 if args.quick else args.steps
    loaded = load_model("smollm2-135m")
    teacher, tokenizer = loaded.model.eval(), loaded.tokenizer
    for param in teacher.parameters():
        param.requires_grad_(False)
    torch.manual_seed(0)
    evaluator = Evaluator(teacher, tokenizer, args.data_dir, args.limit, args.quick)
    train_ids = tokenize_corpus(tokenizer, load_corpus("c4", split="calibration", data_dir=args.data_dir))
    data = token_segments(train_ids, SEQLEN, "C4 documents 0-999", pad_id=0, seed=0, prompt_tokens=128)
    calibration = calibration_samples(tokenizer, "c4", 32 if not args.quick else 4, 512, data_dir=args.data_dir)
    config = TrainingConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(4, steps - 1))
    if "teacher" not in done:
        done["teacher"] = {"student": "teacher", "method": "-", **evaluator.measure(teacher)}
        atomic_write_text(partial, json.dumps(done, indent=1))
    for name in args.students.split(","):
        student, removed = None, []
        for method in ["before", *args.methods.split(",")]:
            key = f"{name}/{method}"
            if key in done:
                continue
            if student is None:
                print(f"building student {name}", file=sys.stderr)
                start = time.perf_counter()
                student, removed = build_student(teacher, STUDENTS[name], calibration)
                build_seconds = time.perf_counter() - start
            print(f"{key}", file=sys.stderr)
            if method == "before":
                done[key] = {"student": name, "method": "before recovery", "tokens": 0, "seconds": build_seconds,
                             **evaluator.measure(student)}
            else:
                model = copy.deepcopy(student)
                curve = [{"step": 0, "tokens": 0, "held_out_kl": evaluator.held_out_kl(model)}]

                def track(step: int, metrics: dict, trained) -> None:
                    if step % args.eval_every == 0 or step == steps:
                        trained.eval()
                        curve.append({"step": step, "tokens": metrics["tokens"],
                                      "held_out_kl": evaluator.held_out_kl(trained)})
                        trained.train()

                result = train(model, objective_for(method, teacher, model, removed, data, config), data, config,
                               callback=track, description=key)
                done[key] = {"student": name, "method": method, "tokens": result.tokens, "seconds": result.seconds,
                             "precision": result.precision, "first_loss": result.first_loss,
                             "last_loss": result.last_loss, "curve": curve, **evaluator.measure(model)}
                del model
            atomic_write_text(partial, json.dumps(done, indent=1))
    write_results(out, done, args, config)


def acceptance_lines(done: dict, teacher: dict) -> list[str]:
    """Per student: the best distillation row against the gap and plain CE; on-policy rows against forward KL."""
    lines = []
    for student in dict.fromkeys(row["student"] for row in done.values() if row["student"] != "teacher"):
        rows = {row["method"]: row for row in done.values() if row["student"] == student}
        before, ce = rows.get("before recovery"), rows.get("ce")
        distilled = {m: r for m, r in rows.items() if m not in ("before recovery", "ce")}
        if before is None or ce is None or not distilled:
            continue
        best_method, best = min(distilled.items(), key=lambda item: item[1]["wikitext2_ppl"])
        gap = before["wikitext2_ppl"] - teacher["wikitext2_ppl"]
        closed = (before["wikitext2_ppl"] - best["wikitext2_ppl"]) / gap
        ce_closed = (before["wikitext2_ppl"] - ce["wikitext2_ppl"]) / gap
        lines.append(f"- {student}: the best distillation row by WikiText-2 ppl is {best_method}, "
                     f"{best['wikitext2_ppl']:.2f}: {closed:.0%} of the gap to the teacher closed (needed: 50%); "
                     f"plain CE at the same tokens: {ce['wikitext2_ppl']:.2f} ({ce_closed:.0%}): "
                     f"{'beaten' if best['wikitext2_ppl'] < ce['wikitext2_ppl'] else 'NOT beaten'}.")
        forward = rows.get("kd")
        for method in ("gkd", "minillm"):
            if method in rows and forward is not None:
                better = rows[method]["sample_teacher_nll"] < forward["sample_teacher_nll"]
                lines.append(f"- {student}: {method} sample NLL {rows[method]['sample_teacher_nll']:.3f} against "
                             f"forward KL's {forward['sample_teacher_nll']:.3f}: "
                             f"{'better' if better else 'NOT better'} (lower is better).")
    return lines


def write_results(out: Path, done: dict, args: argparse.Namespace, config: TrainingConfig) -> None:
    rows = list(done.values())
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"CPU flags {' '.join(cpu_flags())}",
            "torch": torch.__version__, "training": config.model_dump(), "seqlen": SEQLEN,
            "tokens_per_run": config.steps * config.batch_size * SEQLEN,
            "students": {name: STUDENTS[name] for name in args.students.split(",")}}
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    teacher = done["teacher"]
    lines = [f"# Distillation: recovering a compressed SmolLM2-135M ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}.", "",
             f"Every run: {config.steps} AdamW steps of {config.batch_size} x {SEQLEN} C4 tokens "
             f"({meta['tokens_per_run']:,} tokens), lr {config.lr} (warm-up {config.warmup_steps}, cosine), "
             "all float parameters trained, the same batches in the same order.", "",
             "Gap closed: (ppl before - ppl after) / (ppl before - teacher ppl) on WikiText-2. "
             "Sample NLL: the teacher's mean per-token NLL of the student's sampled continuations (lower is better).",
             "", "Protocol: WikiText-2 and C4 ppl and KL(teacher || student) on 20 windows of 512 tokens (float32); "
             f"PIQA, ARC-Easy, HellaSwag acc_norm on the first {args.limit} examples each (a standard error of "
             "about 0.05 at these accuracies: differences of a few points there are noise); sample NLL on 16 "
             "held-out C4 prompts of 64 tokens continued by 48 sampled tokens (temperature 1, one seed for all "
             "models). Training under bfloat16 autocast where the CPU has AVX-512 BF16 (the precision column of "
             "the JSON). Tokens: tokens of the data batches read; GKD's on-policy batches (half of them) keep "
             "the first 128 tokens of a segment as the prompt and replace the rest by 64 tokens the student "
             "samples, so it trains on fewer target tokens than the others. TED's stage 1 (16 steps for each "
             "model's filters) comes before its budget. Seconds: the training's wall time on a shared 2-core "
             "machine (other jobs ran beside some rows; before recovery: the "
             "compression's): not a speed comparison. Rows were measured by one or "
             "more invocations of this script with the same settings (its progress file keeps finished rows); "
             "the command shown is the one that wrote this file.",
             "", "| student | method | Wiki2 ppl | gap closed | C4 ppl | KL Wiki2 | KL C4 | PIQA | ARC-e | HellaSwag "
             "| sample NLL | tokens | seconds |", "|" + "---|" * 13]
    for row in rows:
        before = done.get(f"{row['student']}/before")
        gap = ""
        if before is not None and row["method"] not in ("before recovery", "-"):
            gap_before = before["wikitext2_ppl"] - teacher["wikitext2_ppl"]
            closed = (before["wikitext2_ppl"] - row["wikitext2_ppl"]) / gap_before
            gap = f"{closed:.0%}"
        lines.append(f"| {row['student']} | {row['method']} | {row['wikitext2_ppl']:.2f} | {gap} | {row['c4_ppl']:.2f} "
                     f"| {row['wikitext2_kl']:.4f} | {row['c4_kl']:.4f} | {row['piqa']:.3f} | {row['arc_easy']:.3f} "
                     f"| {row['hellaswag']:.3f} | {row['sample_teacher_nll']:.3f} | {row.get('tokens', 0):,} "
                     f"| {row.get('seconds', 0):.0f} |")
    lines += ["", "## Against the acceptance points", ""] + acceptance_lines(done, teacher)
    series = {f"{row['student']} {row['method']}": [(p["tokens"], p["held_out_kl"]) for p in row["curve"]]
              for row in rows if "curve" in row}
    atomic_write_text(out.parent / f"{out.name}-kl.svg",
                      line_svg(series, "training tokens", "held-out KL(teacher || student)", "held-out KL") + "\n")
    lines += ["", f"Held-out KL against training tokens: `{out.name}-kl.svg`.", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
