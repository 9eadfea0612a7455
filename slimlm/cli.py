"""Command line: `slimlm eval`, `slimlm info`, `slimlm bench`, `slimlm compress`, `slimlm generate`,
`slimlm export`, `slimlm compare`.

Every command loads a model (`--model`: an embedded name, a directory, a .gguf file or a hub id),
prints a table, and with `--json FILE` writes the full record (model, protocol, machine, library
versions, date, command). Errors caused by input are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.defaults import DEFAULT_MODEL, DTYPE_NAMES
from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.models.loading import LoadedModel


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description="Compress LLMs and measure what it cost.")
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded name, local directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    common.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    common.add_argument("--device", default="cpu")
    common.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    common.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--json", metavar="FILE", help="also write the full result record as JSON")
    common.add_argument("--verbose", action="store_true",
                        help="show libraries' logging, load bars and deprecation warnings (hidden by default)")

    evaluate = commands.add_parser("eval", parents=[common], help="perplexity, KL divergence and zero-shot accuracy")
    evaluate.add_argument("--tasks", default="wikitext2",
                          help="comma-separated: wikitext2,ptb,c4,pydoc, lambada,piqa,hellaswag,arc_easy,"
                               "arc_challenge,boolq,winogrande,openbookqa, or a .txt/.jsonl path")
    evaluate.add_argument("--data-dir", help="data directory (default: $SLIMLM_DATA)")
    evaluate.add_argument("--seqlen", type=_positive_int, default=2048, help="perplexity window length")
    evaluate.add_argument("--max-windows", type=_positive_int, help="use only the first N perplexity windows")
    evaluate.add_argument("--limit", type=_positive_int, help="evaluate only the first N examples of zero-shot tasks")
    evaluate.add_argument("--batch-size", type=_positive_int, default=16, help="zero-shot batch size")
    evaluate.add_argument("--kv-cache", metavar="NAME",
                          help="perplexity through a quantized KV cache <method>-<bits>bit (e.g. kivi-2bit, "
                               "naive-4bit, kvquant-3bit), each window fed in --kv-chunk token chunks")
    evaluate.add_argument("--kv-chunk", type=_positive_int, default=128, help="tokens per step with --kv-cache")
    evaluate.add_argument("--kv-group-size", type=int, default=32, help="quantized KV cache group size")
    evaluate.add_argument("--kv-residual", type=int, default=128, help="KIVI full-precision recent tokens")
    _add_kvquant_arguments(evaluate)
    evaluate.add_argument("--harness", metavar="TASKS",
                          help="run these tasks through lm-evaluation-harness instead (its own task YAMLs on the "
                               "local data, slimlm's model class): piqa,arc_easy,arc_challenge,hellaswag,boolq,"
                               "winogrande,openbookqa,lambada")
    evaluate.add_argument("--kl-reference", metavar="MODEL",
                          help="also report KL divergence from this model on each perplexity corpus")

    info = commands.add_parser("info", parents=[common], help="architecture, parameters, size, FLOPs per token")
    info.add_argument("--context", type=_positive_int, default=2048, help="context length for FLOPs per token")

    bench = commands.add_parser("bench", parents=[common], help="latency, throughput and MFU")
    bench.add_argument("--prompt-tokens", type=_positive_int, default=128)
    bench.add_argument("--new-tokens", type=_positive_int, default=32)
    bench.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes, e.g. 1,8")
    bench.add_argument("--repeats", type=_positive_int, default=3)
    bench.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: measured by a matmul)")
    squeeze = commands.add_parser("compress", parents=[common], help="compress a model with a recipe and save it")
    squeeze.add_argument("--recipe", required=True, help="a preset name (e.g. gptq-w4g64) or a YAML recipe file")
    squeeze.add_argument("--out", required=True, help="directory to save the compressed model to")
    squeeze.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    squeeze.add_argument("--force", action="store_true",
                         help="run even when the memory estimate exceeds the available RAM")
    restart = _add_resume_options(squeeze, "its last finished block",
                                  "discard the checkpoint of an interrupted run and start from the first block")
    restart.add_argument("--no-checkpoint", action="store_true",
                         help="keep no checkpoint, so a killed run starts over (saves writing the cached activations, "
                              "calib samples x seqlen x hidden x 4 bytes, after every block)")
    squeeze.add_argument("--export-ct", metavar="DIR",
                         help="also write a compressed-tensors (pack-quantized) checkpoint that transformers loads")
    squeeze.add_argument("--sparse-storage", action="store_true",
                         help="save pruned linears compressed (N:M values + indices, or CSR); slimlm loads them")
    squeeze.add_argument("--data-dir", help="data directory (default: $SLIMLM_DATA)")
    squeeze.add_argument("--calib-corpus", help="calibration corpus (overrides the recipe; e.g. c4, wikitext2, pydoc)")
    squeeze.add_argument("--calib-samples", type=_positive_int, help="calibration segments (overrides the recipe)")
    squeeze.add_argument("--calib-seqlen", type=_positive_int, help="tokens per segment (overrides the recipe)")
    squeeze.add_argument("--seed", type=int, help="calibration sampling seed (overrides the recipe)")
    squeeze.add_argument("--eval", dest="eval_tasks", help="evaluate these tasks before and after, in one table")
    squeeze.add_argument("--kl", action="store_true", help="with --eval: also KL divergence from the original model")
    squeeze.add_argument("--seqlen", type=_positive_int, default=2048, help="perplexity window length for --eval")
    squeeze.add_argument("--max-windows", type=_positive_int, help="first N perplexity windows for --eval")
    squeeze.add_argument("--limit", type=_positive_int, help="first N examples of zero-shot tasks for --eval")
    squeeze.add_argument("--batch-size", type=_positive_int, default=16, help="zero-shot batch size for --eval")
    _add_generate_parser(commands, common)
    _add_distill_parser(commands, common)
    _add_export_parser(commands, common)
    _add_compare_parser(commands, common)
    return parser


def _add_resume_options(parser: argparse.ArgumentParser, where: str, restart_help: str):
    """--resume / --restart (mutually exclusive); returns their group for more options."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help=f"continue the interrupted run of this command from {where} (rerunning the same command "
                            "does so too; this makes a missing checkpoint an error)")
    group.add_argument("--restart", action="store_true", help=restart_help)
    return group


DISTILL_METHODS = ("kd", "reverse-kl", "gkd", "minillm", "hidden", "ted", "seqkd", "cot", "finetune")


def _add_distill_parser(commands, common: argparse.ArgumentParser) -> None:
    distill = commands.add_parser("distill", parents=[common],
                                  help="train a (compressed) student on a teacher's distributions, and save it")
    distill.add_argument("--teacher", help="the teacher (any model slimlm loads; not needed for --method finetune)")
    distill.add_argument("--teacher-url", help="seqkd: an OpenAI-compatible server (/v1/completions) as the teacher")
    distill.add_argument("--teacher-model", default="teacher", help="seqkd: the model name sent to --teacher-url")
    distill.add_argument("--api-key", help="seqkd: the --teacher-url server's key (default: $OPENAI_API_KEY)")
    distill.add_argument("--teacher-temperature", type=float, default=0.0,
                         help="seqkd: sampling temperature of the teacher's responses (0: greedy)")
    distill.add_argument("--self-instruct", type=_positive_int, metavar="N",
                         help="seqkd: the --data prompts are seed tasks; the teacher first writes N new instructions "
                              "from them (Self-Instruct, near-duplicates filtered by ROUGE-L), then answers all")
    distill.add_argument("--cot-style", default="step-by-step",
                         choices=["fine-tune-cot", "step-by-step", "answer-only"],
                         help="cot: Fine-tune-CoT (correct rationales only), Distilling step-by-step (label and "
                              "rationale tasks), or the answer-only baseline (no teacher)")
    distill.add_argument("--cot-samples", type=_positive_int, default=1,
                         help="cot: rationales per question (Fine-tune-CoT's diverse reasoning; with "
                              "--teacher-temperature > 0)")
    distill.add_argument("--examples", type=_positive_int, help="cot: use the first N questions")
    distill.add_argument("--student", required=True, help="the student: a model or a slimlm compressed checkpoint")
    distill.add_argument("--method", default="kd", choices=DISTILL_METHODS,
                         help="kd: forward KL (Hinton); reverse-kl: token-level KL(student || teacher); gkd: on-policy "
                              "GKD with JSD(beta); minillm: sequence-level reverse KL by policy gradient; hidden: "
                              "hidden-state matching plus KD; ted: task-aware filters, then KD through them; "
                              "seqkd: black-box, the teacher (--teacher or --teacher-url) writes the responses to "
                              "the --data prompts and the student learns them; cot: black-box chain-of-thought "
                              "distillation on question/answer data (--cot-style); finetune: cross-entropy only")
    distill.add_argument("--data", default="c4",
                         help="training data: a corpus (c4, wikitext2, ptb, pydoc: their calibration split; a .txt or "
                              '{"text"} .jsonl file) or an instruction JSONL with prompt/response pairs')
    distill.add_argument("--data-dir", help="data directory (default: $SLIMLM_DATA)")
    distill.add_argument("--out", required=True, help="directory to save the trained student to")
    distill.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_resume_options(distill, "its last checkpoint",
                        "discard an interrupted run's training checkpoint (what a teacher already wrote is kept)")
    distill.add_argument("--steps", type=_positive_int, default=100)
    distill.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per forward pass")
    distill.add_argument("--grad-accumulation", type=_positive_int, default=1)
    distill.add_argument("--lr", type=float, default=1e-4)
    distill.add_argument("--warmup-steps", type=int, default=0)
    distill.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per training sequence")
    distill.add_argument("--trainable", default="all",
                         help="all, norms, lora, or comma-separated parameter-name patterns (e.g. '*.mlp.*')")
    distill.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    distill.add_argument("--gradient-checkpointing", action="store_true")
    distill.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: a tenth of --steps)")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--temperature", type=float, help="kd, reverse-kl, gkd, hidden: softening temperature")
    distill.add_argument("--alpha", type=float, help="kd, reverse-kl: weight of the KL term (1 - alpha: CE); "
                                                     "minillm: the teacher's share of the sampling mix")
    distill.add_argument("--lambda", dest="lam", type=float, help="gkd: share of student-sampled batches")
    distill.add_argument("--beta", type=float, help="gkd: JSD interpolation (0 forward KL, 1 reverse KL)")
    distill.add_argument("--prompt-tokens", type=_positive_int,
                         help="gkd, minillm: prompt tokens kept from text segments")
    distill.add_argument("--max-new-tokens", type=_positive_int,
                         help="gkd, minillm: tokens the student samples; seqkd: tokens of each teacher response")


def _add_compare_parser(commands, common: argparse.ArgumentParser) -> None:
    compare = commands.add_parser("compare", parents=[common],
                                  help="the float model and several recipes side by side: table, JSON, HTML report")
    compare.add_argument("--recipes", required=True,
                         help="comma-separated preset names or YAML files, e.g. rtn-w4g64,gptq-w4g64,sparsegpt-2of4")
    compare.add_argument("--out", default="slimlm-compare",
                         help="folder for results.json, results.md, report.html and the row cache "
                              "(default slimlm-compare)")
    compare.add_argument("--format", default="json,md,html",
                         help="comma-separated files to write: json, md, html (default all three)")
    compare.add_argument("--eval", dest="eval_tasks", default="wikitext2",
                         help="tasks for every row (default wikitext2), e.g. wikitext2,c4,piqa,arc_easy")
    compare.add_argument("--no-kl", action="store_true", help="skip the KL divergence from the float model")
    compare.add_argument("--data-dir", help="data directory (default: $SLIMLM_DATA)")
    compare.add_argument("--seqlen", type=_positive_int, default=512, help="perplexity window length (default 512)")
    compare.add_argument("--max-windows", type=_positive_int, default=40,
                         help="first N perplexity windows (default 40)")
    compare.add_argument("--limit", type=_positive_int, default=200,
                         help="first N examples of zero-shot tasks (default 200)")
    compare.add_argument("--batch-size", type=_positive_int, default=16, help="zero-shot batch size")
    compare.add_argument("--calib-corpus", help="calibration corpus for every recipe (default: each recipe's)")
    compare.add_argument("--calib-samples", type=_positive_int, help="calibration segments for every recipe")
    compare.add_argument("--calib-seqlen", type=_positive_int, help="tokens per calibration segment")
    compare.add_argument("--seed", type=int, help="calibration sampling seed for every recipe")
    compare.add_argument("--prompt-tokens", type=_positive_int, default=128, help="speed: prompt length")
    compare.add_argument("--new-tokens", type=_positive_int, default=32, help="speed: tokens generated")
    compare.add_argument("--repeats", type=_positive_int, default=3, help="speed: alternating runs per row")


def _add_export_parser(commands, common: argparse.ArgumentParser) -> None:
    export = commands.add_parser("export", parents=[common],
                                 help="write a model to another runtime's format (GGUF, ONNX Runtime)")
    export.add_argument("--format", required=True, choices=["gguf", "onnx"],
                        help="gguf: one file llama.cpp loads; onnx: a directory onnxruntime-genai loads")
    export.add_argument("--out", required=True, help="the .gguf file, or the ONNX model directory, to write")
    export.add_argument("--type", dest="ftype", default="auto",
                        help="gguf: auto (each quantized layer in the GGUF block format that holds it exactly), "
                             "q8_0, q4_0, q4_1, q5_0, q5_1, f16, bf16 or f32")
    export.add_argument("--exact", action="store_true",
                        help="gguf: refuse the export if a quantized layer would be re-quantized for --type")
    export.add_argument("--float-type", help="gguf: unquantized linears with --type auto/--exact (default f16)")
    export.add_argument("--embedding-type",
                        help="gguf: token embedding and untied output head (default q8_0 for quantized files)")
    export.add_argument("--pre-tokenizer", help="gguf: llama.cpp's name of the BPE pre-tokenizer (default: detected)")
    export.add_argument("--accuracy-level", type=int,
                        help="onnx: MatMulNBits accuracy_level, 4 (default: int8 activations, ONNX Runtime's fast "
                             "CPU path) or 0/1 (float32 arithmetic, slow)")
    export.add_argument("--widen-bits", action="store_true",
                        help="onnx: store 3-bit (5-7-bit) codes exactly in 4-bit (8-bit) MatMulNBits blocks")
    export.add_argument("--drop-activation-quant", action="store_true",
                        help="export the weights of W8A8 / W+A layers; the runtime uses its own activation precision")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_generate_parser(commands, common: argparse.ArgumentParser) -> None:
    generation = commands.add_parser("generate", parents=[common],
                                     help="generate text (sampling, paged or sink caches, speculative decoding)")
    generation.add_argument("--prompt", action="append", required=True,
                            help="prompt text; repeat for a batch of prompts")
    generation.add_argument("--max-new-tokens", type=int, default=64)
    generation.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generation.add_argument("--top-k", type=int)
    generation.add_argument("--top-p", type=float, default=1.0)
    generation.add_argument("--seed", type=int, default=0, help="sampling seed")
    generation.add_argument("--cache", choices=["contiguous", "paged", "sinks"],
                            help="KV cache (default contiguous; sinks when --sink-tokens or --window is given)")
    generation.add_argument("--block-size", type=int, default=16, help="paged cache block size in tokens")
    generation.add_argument("--sink-tokens", type=int, help="attention sinks kept by the sinks cache (default 4)")
    generation.add_argument("--window", type=int, help="recent tokens kept by the sinks cache (default 256)")
    generation.add_argument("--kv-cache", metavar="NAME",
                            help="quantized KV cache <method>-<bits>bit: naive-4bit, naive-2bit, kivi-4bit, "
                                 "kivi-2bit, kvquant-3bit, kvquant-2bit, ...")
    generation.add_argument("--kv-group-size", type=int, default=32,
                            help="quantized KV cache: channels (per token) or tokens (KIVI keys) per scale")
    generation.add_argument("--kv-residual", type=int, default=128,
                            help="KIVI: recent tokens kept in full precision (a multiple of --kv-group-size)")
    _add_kvquant_arguments(generation)
    generation.add_argument("--data-dir", help="data directory for KVQuant calibration (default: $SLIMLM_DATA)")
    generation.add_argument("--draft", metavar="MODEL",
                            help="draft for speculative decoding: a model, lookup (tokens copied from an earlier "
                                 "occurrence of the last tokens in the context: no model), or built from the "
                                 "target in memory: self (its own weights, run lean), self:<preset> (e.g. "
                                 "self:rtn-w4g64-head8, self:rtn-w8-head8: a compressed copy; presets without "
                                 "calibration), self:fp16")
    generation.add_argument("--gamma", type=int,
                            help="draft tokens per target forward (default: chosen before every step from the "
                                 "measured draft/target costs and the acceptance so far)")
    generation.add_argument("--adaptive-gamma", action="store_true",
                            help="grow gamma after a full acceptance, shrink it after a first-token rejection")
    generation.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")


def _add_kvquant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-outliers", type=float, default=0.01,
                        help="KVQuant: fraction of keys/values kept sparse in float16 (default 0.01)")
    parser.add_argument("--kv-calibration-corpus", default="wikitext2",
                        help="KVQuant: calibration corpus (its calibration split; default wikitext2)")
    parser.add_argument("--kv-calibration-samples", type=int, default=16,
                        help="KVQuant: calibration segments (default 16)")
    parser.add_argument("--kv-calibration-seqlen", type=int, default=512,
                        help="KVQuant: tokens per calibration segment (default 512)")


def _check_kvquant_arguments(args: argparse.Namespace, spec) -> None:
    """KVQuant calibration options checked before a model is loaded (only when --kv-cache kvquant-*)."""
    if spec is None or spec.method != "kvquant":
        return
    from slimlm.data.corpora import CORPORA, is_user_corpus, resolve_data_dir
    from slimlm.infer.kvquant import check_calibration_options

    check_calibration_options(args.kv_calibration_samples, args.kv_calibration_seqlen)
    corpus = args.kv_calibration_corpus
    if corpus not in CORPORA and not is_user_corpus(corpus):
        raise SlimlmError(f"unknown KVQuant calibration corpus {corpus!r}: choose one of {', '.join(CORPORA)}, "
                          "or give a path to a .txt or .jsonl file")
    resolve_data_dir(args.data_dir)


def _kvquant_calibration(args: argparse.Namespace, loaded: LoadedModel, spec):
    """The KVQuant calibration of the loaded model (None for other caches)."""
    if spec is None or spec.method != "kvquant":
        return None
    from slimlm.infer.kvquant import calibrate_from_corpus

    return calibrate_from_corpus(loaded.model, loaded.tokenizer, spec, args.kv_calibration_samples,
                                 args.kv_calibration_seqlen, args.kv_calibration_corpus, args.data_dir).calibration


def _without_calibration(settings) -> dict:
    """A settings dataclass as a JSON-ready dict: the calibration object becomes its description."""
    out = dict(vars(settings))
    calibration = out.get("kv_calibration")
    out["kv_calibration"] = None if calibration is None else calibration.describe()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before PyTorch is imported: --help and bad arguments answer at once
    import torch

    from slimlm.results import atomic_write_text

    if args.verbose:
        os.environ["SLIMLM_VERBOSE"] = "1"  # child processes (slimlm compare's rows) follow
    quiet_libraries(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimlm.core import distributed

    main_process = True
    try:
        if distributed.requested():
            if args.command != "compress":
                raise SlimlmError(f"slimlm {args.command} runs in one process: only slimlm compress runs under "
                                  "torchrun (distributed calibration)")
            distributed.start(args.device)
            main_process = distributed.is_main()
            if not main_process:
                os.environ["SLIMLM_PROGRESS"] = "0"  # one set of progress bars: the first process's
        _check_common(args)
        record, table = COMMANDS[args.command](args)
    except SlimlmError as error:
        print(f"slimlm: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.stop()
    if not main_process:
        return 0
    print(table, end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if record.get("failed_rows") else 0


def _check_common(args: argparse.Namespace) -> None:
    """What every command can check before any work: the --json file can be written, the device exists."""
    import torch

    from slimlm.results import check_writable

    if args.json:
        check_writable(args.json, "--json")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SlimlmError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise SlimlmError(f"--device {args.device}: this PyTorch ({torch.__version__}) is built without CUDA; "
                              "drop --device or install a CUDA build of PyTorch")
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise SlimlmError(f"--device {args.device}: no such GPU is visible ({torch.cuda.device_count()} found)")
    elif device.type not in ("cpu", "cuda") and not getattr(torch, device.type).is_available():
        raise SlimlmError(f"--device {args.device}: not available on this machine")


def check_context(model, tokens: int, what: str) -> None:
    """Refuse sequences longer than the model's context (its position table or trained length)."""
    from slimlm.eval.zeroshot import model_max_length

    longest = model_max_length(model)
    if tokens > longest:
        raise SlimlmError(f"{what} is {tokens} tokens, longer than the model's context of {longest} tokens: "
                          f"use at most {longest}")


def quiet_libraries(verbose: bool | None = None) -> None:
    """Library chatter that is not the user's business stays out of the output: transformers' logging and load
    bars, and deprecation notices (`FutureWarning`, `DeprecationWarning`, such as transformers'
    `past_key_values` notice); our own bars and warnings stay. `--verbose` (or SLIMLM_VERBOSE=1) shows it all."""
    import warnings

    if verbose is None:
        verbose = os.environ.get("SLIMLM_VERBOSE") == "1"
    if verbose:
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)


def _load(spec: str, args: argparse.Namespace) -> LoadedModel:
    from slimlm.models.loading import load_model

    return load_model(spec, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def run_eval(args: argparse.Namespace) -> tuple[dict, str]:
    if args.harness:
        return _run_harness(args)
    from slimlm.eval.runner import TABLE_COLUMNS, EvalSettings, evaluate, is_perplexity_task, parse_tasks
    from slimlm.results import make_record, markdown_table

    tasks = parse_tasks(args.tasks)  # fail on a bad name before loading anything
    settings = EvalSettings(args.seqlen, args.max_windows, args.limit, args.batch_size, args.data_dir,
                            args.kv_cache, args.kv_chunk, args.kv_group_size, args.kv_residual, args.kv_outliers)
    spec = settings.kv_spec()  # bad KV cache settings fail before the model is loaded
    _check_kvquant_arguments(args, spec)
    if args.kv_cache is not None and args.kl_reference:
        raise SlimlmError("the KL divergence is computed without a KV cache: drop --kl-reference or --kv-cache")
    if settings.data_dir is not None:
        from slimlm.data.corpora import resolve_data_dir

        resolve_data_dir(settings.data_dir)
    loaded = _load(args.model, args)
    if any(is_perplexity_task(task) for task in tasks):
        check_context(loaded.model, args.seqlen, "--seqlen")
    reference = _load(args.kl_reference, args).model if args.kl_reference else None
    calibration = _kvquant_calibration(args, loaded, spec)
    if calibration is not None:
        settings = dataclasses.replace(settings, kv_calibration=calibration)
    rows = evaluate(loaded.model, loaded.tokenizer, tasks, settings, reference)
    protocol = {**_without_calibration(settings), "data_dir": str(settings.data_dir), "dtype": args.dtype,
                "kl_reference": args.kl_reference}
    record = make_record(args.model, "none", protocol, {"rows": rows})
    table = markdown_table([{k: v for k, v in row.items() if k != "details"} for row in rows], TABLE_COLUMNS)
    return record, f"model: {args.model} ({loaded.source_kind}: {loaded.source}), dtype {args.dtype}\n\n{table}"


def _run_harness(args: argparse.Namespace) -> tuple[dict, str]:
    """`slimlm eval --harness TASKS`: lm-eval's simple_evaluate on its own task definitions over the local data."""
    from slimlm.eval.runner import TABLE_COLUMNS
    from slimlm.results import make_record, markdown_table

    if args.kl_reference:
        raise SlimlmError("--kl-reference applies to slimlm's own perplexity tasks: drop it or --harness")
    from slimlm.harness import evaluate_harness, harness_rows, parse_harness_tasks

    if args.kv_cache is not None:
        from slimlm.harness import check_harness_kv_cache

        check_harness_kv_cache(args.kv_cache, args.kv_chunk, args.kv_group_size, args.kv_residual)
    tasks = parse_harness_tasks(args.harness)
    loaded = _load(args.model, args)
    kv = {"kv_cache": args.kv_cache, "kv_chunk": args.kv_chunk, "kv_group_size": args.kv_group_size,
          "kv_residual": args.kv_residual}
    results = evaluate_harness(loaded.model, loaded.tokenizer, tasks, args.data_dir, args.limit, args.batch_size,
                               **kv)
    rows = harness_rows(results)
    protocol = {"harness_tasks": tasks, "limit": args.limit, **kv, "dtype": args.dtype, "data_dir": args.data_dir}
    record = make_record(args.model, "none", protocol, {"rows": rows, "lm_eval_results": results["results"]})
    table = markdown_table(rows, TABLE_COLUMNS)
    return record, f"model: {args.model} ({loaded.source_kind}: {loaded.source}), lm-evaluation-harness\n\n{table}"


def run_info(args: argparse.Namespace) -> tuple[dict, str]:
    from slimlm.eval.efficiency import count_parameters, disk_bytes, flops_per_token, memory_bytes
    from slimlm.models.adapter import ModelAdapter
    from slimlm.results import format_value, make_record

    loaded = _load(args.model, args)
    adapter = ModelAdapter(loaded.model)
    flops = flops_per_token(loaded.model, args.context)
    metrics = {
        **adapter.summary(),
        "parameters": count_parameters(loaded.model),
        "memory_bytes": memory_bytes(loaded.model),
        "disk_bytes": disk_bytes(loaded.model),
        "dtype": args.dtype,
        "context": args.context,
        "flops_per_token_prefill": flops.prefill,
        "flops_per_token_decode": flops.decode,
    }
    record = make_record(args.model, "none", {"context": args.context, "flops": flops.to_dict()}, metrics)
    lines = [f"| {key} | {format_value(value)} |" for key, value in metrics.items()]
    return record, "| property | value |\n|---|---|\n" + "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> tuple[dict, str]:
    from slimlm.eval.efficiency import measure_latency, measure_peak_flops, mfu
    from slimlm.results import make_record, markdown_table

    loaded = _load(args.model, args)
    peak = args.peak_flops or measure_peak_flops()
    rows = []
    for batch in args.batch:
        result = measure_latency(loaded.model, args.prompt_tokens, args.new_tokens, batch, args.repeats)
        rows.append({
            **result.to_dict(),
            "prefill_mfu": mfu(result.prefill_flops_per_s, peak),
            "decode_mfu": mfu(result.decode_flops_per_s, peak),
        })
    protocol = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "peak_flops_per_s": peak, "peak_source": "given" if args.peak_flops else "float32 matmul 1024^3"}
    record = make_record(args.model, "none", protocol, {"rows": rows})
    columns = ("batch", "prompt_tokens", "prefill_s", "prefill_tokens_per_s", "decode_s_per_token",
               "decode_tokens_per_s", "prefill_mfu", "decode_mfu")
    header = f"model: {args.model}, dtype {args.dtype}, peak {peak / 1e9:.1f} GFLOP/s ({protocol['peak_source']})\n\n"
    return record, header + markdown_table(rows, columns)


def run_compress(args: argparse.Namespace) -> tuple[dict, str]:
    import copy

    from slimlm.compress import calibration_tokens, compress, with_calibration
    from slimlm.compress.engine import check_memory, validate_recipe_for_model
    from slimlm.compress.recipe import load_recipe
    from slimlm.compress.resume import default_directory
    from slimlm.core import distributed
    from slimlm.eval.efficiency import count_nonzero_parameters, count_parameters, disk_bytes, memory_bytes
    from slimlm.eval.runner import EvalSettings, evaluate, is_perplexity_task, parse_tasks
    from slimlm.export.native import model_bytes, refuse_non_empty, save
    from slimlm.results import make_record

    recipe = with_calibration(load_recipe(args.recipe), corpus=args.calib_corpus, samples=args.calib_samples,
                              seqlen=args.calib_seqlen, seed=args.seed)
    tasks = parse_tasks(args.eval_tasks) if args.eval_tasks else []
    settings = EvalSettings(args.seqlen, args.max_windows, args.limit, args.batch_size, args.data_dir)
    _check_compress_options(args, recipe)
    _refuse_existing_out(args.out, args.overwrite)
    loaded = _load(args.model, args)
    model, tokenizer = loaded.model, loaded.tokenizer
    if recipe.needs_calibration:
        check_context(model, recipe.calibration.seqlen, "the calibration segment (--calib-seqlen)")
    if any(is_perplexity_task(task) for task in tasks):
        check_context(model, args.seqlen, "--seqlen")
    adapter, selections = validate_recipe_for_model(model, recipe)  # bad targets or groups fail before any work
    memory = check_memory(model, recipe, args.force)
    sparse_pattern = _sparse_storage_pattern(recipe) if args.sparse_storage else None
    if args.export_ct:
        from slimlm.export.compressed_tensors import check_recipe_exportable, refuse_transposed_layers
        from slimlm.models.adapter import linear_shape

        widths = {name: linear_shape(m)[0] for name, m in adapter.linear_layers().items()}
        check_recipe_exportable(recipe, widths, selections)
        refuse_transposed_layers(model, set().union(*selections))
        refuse_non_empty(args.export_ct)
    main_process = distributed.is_main()  # under torchrun every process calibrates, the first one alone writes
    if main_process:
        print(f"slimlm: memory estimate: {memory.describe()}", file=sys.stderr)
    calibration = calibration_tokens(recipe, tokenizer, args.data_dir)
    before = evaluate(model, tokenizer, tasks, settings) if tasks and main_process else []
    original_bytes = {"memory": memory_bytes(model), "disk": disk_bytes(model), "parameters": count_parameters(model)}
    reference = copy.deepcopy(model) if tasks and args.kl and main_process else None
    # A checkpoint after every block, so that a killed run continues from it (one process only).
    checkpoint = None if distributed.active() or args.no_checkpoint else default_directory(args.out)
    report = compress(model, recipe, calibration, device=args.device, checkpoint_dir=checkpoint,
                      resume=True if args.resume else False if args.restart else None)
    if not main_process:
        return {}, ""
    if args.sparse_storage:
        from slimlm.prune.sparse_linear import sparsify_model_

        sparsify_model_(model, sparse_pattern)
    save(model, args.out, tokenizer, recipe=recipe.model_dump(mode="json"), overwrite=args.overwrite)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)  # the result is on disk: nothing left to resume
    if args.export_ct:
        from slimlm.export.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(model, args.export_ct, tokenizer)
    after = evaluate(model, tokenizer, tasks, settings, reference) if tasks else []
    sizes = {
        "parameters_before": original_bytes["parameters"], "parameters": count_parameters(model),
        "nonzero_parameters": count_nonzero_parameters(model),
        "memory_bytes_before": original_bytes["memory"], "memory_bytes_after": memory_bytes(model),
        "disk_bytes_before": original_bytes["disk"], "disk_bytes_after": model_bytes(args.out),
    }
    sizes["compression_ratio_disk"] = sizes["disk_bytes_before"] / sizes["disk_bytes_after"]
    protocol = {"recipe": recipe.model_dump(mode="json"), "eval": {**vars(settings), "data_dir": str(args.data_dir)},
                "memory_estimate_bytes": dataclasses.asdict(memory)}
    metrics = {"before": before, "after": after, "sizes": sizes, "compression": report.to_dict(), "out": args.out,
               "export_ct": args.export_ct}
    record = make_record(args.model, str(args.recipe), protocol, metrics)
    return record, _compress_table(args, before, after, sizes, report)


def _distill_stage(args: argparse.Namespace):
    """The distillation stage of the command's settings, validated as a recipe stage (same errors)."""
    from slimlm.compress.recipe import load_recipe

    trainable = args.trainable if args.trainable in ("all", "norms", "lora") else args.trainable.split(",")
    training = {"steps": args.steps, "batch_size": args.batch_size, "grad_accumulation": args.grad_accumulation,
                "lr": args.lr, "warmup_steps": args.warmup_steps, "precision": args.precision,
                "gradient_checkpointing": args.gradient_checkpointing, "trainable": trainable, "seed": args.seed,
                "checkpoint_every": args.checkpoint_every if args.checkpoint_every is not None
                else max(1, args.steps // 10)}
    method = {"reverse-kl": "kd", "seqkd": "finetune", "cot": "finetune"}.get(args.method, args.method)
    stage = {"method": method, "training": training, "seqlen": args.seqlen}
    if args.method == "reverse-kl":
        stage["divergence"] = "reverse"
    options = {"temperature": args.temperature, "alpha": args.alpha, "lambda": args.lam, "beta": args.beta,
               "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens}
    allowed = {"kd": {"temperature", "alpha"}, "gkd": {"temperature", "lambda", "beta", "prompt_tokens",
                                                       "max_new_tokens"},
               "minillm": {"alpha", "prompt_tokens", "max_new_tokens"}, "hidden": {"temperature"},
               "ted": {"temperature"},
               "finetune": set()}[method]
    if args.method in ("seqkd", "cot"):
        options.pop("max_new_tokens")
    for key, value in options.items():
        if value is not None:
            if key not in allowed:
                raise SlimlmError(f"--{key.replace('_', '-')} does not apply to --method {args.method}")
            stage[key] = value
    return load_recipe({"stages": [stage]}).stages[0]


def _distill_data(args: argparse.Namespace, tokenizer, stage):
    """Token segments of a corpus, or the prompt/response pairs of an instruction JSONL file."""
    from pathlib import Path

    from slimlm.data.calibration import tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.distill.data import (
        PROMPT_KEYS,
        instruction_examples,
        read_instruction_pairs,
        token_segments,
    )

    path = Path(args.data)
    if path.suffix == ".jsonl" and path.is_file():
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as error:
            raise SlimlmError(f"--data {path}: line 1 is not JSON ({error.msg})") from error
        if isinstance(row, dict) and any(a in row and b in row for a, b in PROMPT_KEYS):
            return instruction_examples(tokenizer, read_instruction_pairs(path), args.seqlen, str(path), args.seed)
    ids = tokenize_corpus(tokenizer, load_corpus(args.data, split="calibration", data_dir=args.data_dir))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_segments(ids, args.seqlen, f"{args.data} (calibration split)", pad, args.seed,
                          prompt_tokens=getattr(stage, "prompt_tokens", 0))


def _teacher_written_data(args: argparse.Namespace, teacher, tokenizer, training_dir):
    """seqkd's data: the teacher's responses to the --data prompts (kept beside --out, so a rerun asks only
    for the missing ones), as prompt/response examples of the student's tokenizer."""
    from pathlib import Path

    from slimlm.distill.data import instruction_examples, read_prompts
    from slimlm.distill.seqkd import teacher_responses

    if not (args.teacher_temperature >= 0):
        raise SlimlmError(f"--teacher-temperature must be >= 0 (got {args.teacher_temperature})")
    prompts = read_prompts(Path(args.data))
    if args.self_instruct:
        from slimlm.distill.self_instruct import generate_instructions

        written = generate_instructions(teacher, prompts, args.self_instruct, seed=args.seed,
                                        cache=training_dir / "instructions.jsonl")
        print(f"slimlm: Self-Instruct kept {len(written)} new instructions", file=sys.stderr)
        prompts = prompts + written
    pairs = teacher_responses(teacher, prompts, args.max_new_tokens or 128, args.teacher_temperature, args.seed,
                              cache=training_dir / "teacher_responses.jsonl")
    return instruction_examples(tokenizer, pairs, args.seqlen, f"{args.data} answered by {teacher.name}", args.seed)


def _chain_of_thought_data(args: argparse.Namespace, teacher, tokenizer, training_dir):
    """cot's data: the --data questions (GSM8K's train split or a question/answer JSONL), with the teacher's
    rationales (kept beside --out, so a rerun asks only for the missing ones) in the --cot-style format."""
    from slimlm.distill.cot import read_problems, teacher_rationales, training_pairs
    from slimlm.distill.data import instruction_examples

    problems = read_problems(args.data, args.data_dir, "train", args.examples)
    rationales = None
    if args.cot_style != "answer-only":
        rationales = teacher_rationales(teacher, problems, args.cot_samples, args.teacher_temperature,
                                        args.max_new_tokens or 128, args.seed, cache=training_dir / "rationales.jsonl")
    pairs = training_pairs(args.cot_style, problems, rationales)
    return instruction_examples(tokenizer, pairs, args.seqlen, f"{args.data} ({args.cot_style})", args.seed)


def run_distill(args: argparse.Namespace) -> tuple[dict, str]:
    from slimlm.compress.resume import default_directory
    from slimlm.core.blocks import CompressionReport
    from slimlm.distill.objective import check_same_vocabulary
    from slimlm.distill.trainer import train, write_loss_curve
    from slimlm.export.native import save
    from slimlm.results import make_record

    stage = _distill_stage(args)  # bad settings fail before any model is loaded
    black_box = args.method in ("seqkd", "cot")
    needs_teacher = black_box and not (args.method == "cot" and args.cot_style == "answer-only")
    if args.self_instruct and args.method != "seqkd":
        raise SlimlmError("--self-instruct has the teacher write instructions: use it with --method seqkd")
    if args.teacher_url and not black_box:
        raise SlimlmError(f"--teacher-url serves text only, and --method {args.method} needs the teacher's "
                          "distributions: load the teacher with --teacher, or use --method seqkd")
    if (stage.uses_teacher or needs_teacher) and not (args.teacher or args.teacher_url):
        raise SlimlmError(f"--method {args.method} distills from a teacher: pass --teacher MODEL"
                          + (" or --teacher-url URL" if black_box else "")
                          + " (or --method finetune to train on the data alone)")
    if args.teacher and args.teacher_url:
        raise SlimlmError("give one teacher: --teacher MODEL or --teacher-url URL")
    if needs_teacher and args.teacher_url:
        from slimlm.distill.teachers import RemoteTeacher

        remote = RemoteTeacher(args.teacher_url, args.teacher_model, args.api_key)
        remote.check()  # an unreachable server fails here, before any model is loaded
    _refuse_existing_out(args.out, args.overwrite)
    training_dir = default_directory(args.out)
    if args.resume and not (training_dir / "checkpoint.pt").is_file():
        raise SlimlmError(f"--resume: no interrupted run of --out {args.out} to continue ({training_dir} holds no "
                          "checkpoint); run without --resume")
    student = _load(args.student, args)
    teacher = _load(args.teacher, args) if args.teacher and (stage.uses_teacher or needs_teacher) else None
    if teacher is not None and not black_box:
        check_same_vocabulary(teacher.model, student.model, teacher.tokenizer, student.tokenizer)
    check_context(student.model, args.seqlen, "--seqlen")
    if black_box:
        from slimlm.distill.teachers import LocalTeacher

        text_teacher = None if not needs_teacher else remote if args.teacher_url else \
            LocalTeacher(teacher.model, teacher.tokenizer)
        if args.method == "cot":
            data = _chain_of_thought_data(args, text_teacher, student.tokenizer, training_dir)
        else:
            data = _teacher_written_data(args, text_teacher, student.tokenizer, training_dir)
    else:
        data = _distill_data(args, student.tokenizer, stage)
    objective = stage.build_objective(teacher.model if teacher is not None and not black_box else None,
                                      student.model, CompressionReport(), data)
    if args.method in ("gkd", "minillm") and student.tokenizer.pad_token_id is not None:
        objective.pad_id = student.tokenizer.pad_token_id
    result = train(student.model, objective, data, stage.training, out_dir=training_dir,
                   resume=True if args.resume else False if args.restart else None,
                   description=f"distill {args.method}")
    save(student.model, args.out, student.tokenizer, recipe={"stages": [stage.model_dump(mode="json")]},
         overwrite=args.overwrite)
    from pathlib import Path

    write_loss_curve(Path(args.out), result.history, f"{args.method}: {args.student}")
    for written in ("teacher_responses.jsonl", "instructions.jsonl", "rationales.jsonl"):  # what the teacher wrote
        if (training_dir / written).is_file():
            shutil.copyfile(training_dir / written, Path(args.out) / written)
    shutil.rmtree(training_dir, ignore_errors=True)  # the student is on disk: nothing left to resume
    metrics = {"training": result.to_dict(), "out": args.out, "data": data.description, "examples": len(data)}
    protocol = {"stage": stage.model_dump(mode="json"), "teacher": args.teacher or args.teacher_url,
                "data": args.data, "cot_style": args.cot_style if args.method == "cot" else None}
    record = make_record(args.student, f"distill {args.method}", protocol, metrics)
    table = (f"distill {args.method}: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.0f} s "
             f"({result.precision}), loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
             + (f" (resumed after step {result.resumed_from})" if result.resumed_from else "")
             + f"\nsaved {args.out} (loss curve: {args.out}/loss.svg)\n")
    return record, table


def run_compare(args: argparse.Namespace) -> tuple[dict, str]:
    from slimlm.report import FORMATS, EvalPlan, SpeedPlan, Sweep, run_sweep, write_report
    from slimlm.report.tables import markdown
    from slimlm.results import check_writable

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise SlimlmError(f"--format {args.format}: choose from {', '.join(FORMATS)} (comma-separated)")
    if args.data_dir is not None:
        from slimlm.data.corpora import resolve_data_dir

        resolve_data_dir(args.data_dir)
    check_writable(Path(args.out) / "results.json", "--out")
    calibration = {"corpus": args.calib_corpus, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                   "seed": args.seed}
    sweep = Sweep(
        model=args.model, recipes=[r.strip() for r in args.recipes.split(",") if r.strip()], out=Path(args.out),
        eval=EvalPlan(tasks=[t.strip() for t in args.eval_tasks.split(",") if t.strip()], seqlen=args.seqlen,
                      max_windows=args.max_windows, limit=args.limit, batch_size=args.batch_size),
        speed=SpeedPlan(args.prompt_tokens, args.new_tokens, args.repeats),
        calibration={k: v for k, v in calibration.items() if v is not None}, kl=not args.no_kl,
        data_dir=args.data_dir, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    rows = run_sweep(sweep)
    written = write_report(sweep, rows, formats)
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    record = {"rows": rows, "written": {k: str(v) for k, v in written.items()}, "failed_rows": failed}
    where = "".join(f"{kind}: {path}\n" for kind, path in written.items())
    if failed:  # the exit code says so too (1), after the table and files
        where += f"failed rows (tried again on the next run): {', '.join(failed)}\n"
    return record, f"model: {args.model}\n\n{markdown(rows)}\n{where}"


def _check_compress_options(args: argparse.Namespace, recipe) -> None:
    """Options that cannot work together, and outputs that cannot be written, before the model is loaded."""
    from slimlm.results import check_writable

    if args.kl and not args.eval_tasks:
        raise SlimlmError("--kl compares the model before and after on the --eval tasks: add --eval wikitext2")
    options = {"--calib-corpus": args.calib_corpus, "--calib-samples": args.calib_samples,
               "--calib-seqlen": args.calib_seqlen, "--seed": args.seed}
    given = [flag for flag, value in options.items() if value is not None]
    if given and not recipe.needs_calibration:
        methods = ", ".join(stage.method for stage in recipe.stages)
        raise SlimlmError(f"{', '.join(given)}: this recipe ({methods}) uses no calibration data; drop "
                          f"{'it' if len(given) == 1 else 'them'}")
    check_writable(args.out, "--out")
    from slimlm.core import distributed

    if distributed.active():
        if args.resume or args.restart:
            raise SlimlmError("--resume and --restart: distributed calibration keeps no checkpoint; drop them")
        distributed.check_recipe([stage.method for stage in recipe.stages],
                                 recipe.calibration.samples if recipe.needs_calibration else distributed.world_size())
    if args.resume:
        from slimlm.compress.resume import STATE, default_directory

        if not (default_directory(args.out) / STATE).is_file():
            raise SlimlmError(f"--resume: no interrupted run of --out {args.out} to continue (its checkpoint would be "
                              f"{default_directory(args.out)}); run without --resume to start")
    if args.export_ct:
        check_writable(args.export_ct, "--export-ct")
        out, ct = Path(args.out).expanduser().resolve(), Path(args.export_ct).expanduser().resolve()
        if out == ct or out in ct.parents or ct in out.parents:
            raise SlimlmError(f"--export-ct {args.export_ct} and --out {args.out} overlap: give the "
                              "compressed-tensors checkpoint its own folder")


def _refuse_existing_out(out: str, overwrite: bool) -> None:
    """`refuse_non_empty`, naming a checkpoint of an interrupted run beside an existing --out (a run killed just
    after it saved, or a killed --overwrite run that --overwrite continues)."""
    from slimlm.compress.resume import default_directory
    from slimlm.export.native import refuse_non_empty

    try:
        refuse_non_empty(out, overwrite)
    except SlimlmError as error:
        checkpoint = default_directory(out)
        if not checkpoint.is_dir():
            raise
        raise SlimlmError(f"{error}; {checkpoint} holds the checkpoint of an interrupted run: rerun with "
                          f"--overwrite to continue it, or remove it if {out} is that run's result") from None


def _sparse_storage_pattern(recipe) -> tuple[int, int] | None:
    """The N:M pattern every pruning stage shares (stored packed), or None for CSR; an error without pruning."""
    from slimlm.prune.fields import PruneFields

    patterns = {stage.n_m for stage in recipe.stages if isinstance(stage, PruneFields)}
    if not patterns:
        raise SlimlmError("--sparse-storage: the recipe has no pruning stage (magnitude, wanda, sparsegpt, dsnot)")
    return patterns.pop() if len(patterns) == 1 else None


def _compress_table(args, before: list[dict], after: list[dict], sizes: dict, report) -> str:
    from slimlm.results import markdown_table

    rows = []
    previous = {(r["task"], r["metric"]): r["value"] for r in before}
    for row in after:
        old = previous.get((row["task"], row["metric"]))
        rows.append({"task": row["task"], "metric": row["metric"], "before": old, "after": row["value"],
                     "delta": None if old is None else row["value"] - old, "n": row["n"], "protocol": row["protocol"]})
    size_rows = [{"quantity": key, "value": value} for key, value in sizes.items()]
    size_rows.append({"quantity": "compression_seconds", "value": report.seconds})
    size_rows.append({"quantity": "peak_rss_bytes", "value": report.peak_rss_bytes})
    for change in report.structure:  # what structural stages did, without score lists and per-layer tables
        summary = {k: v for k, v in change.items() if k not in ("method", "importance", "recovery")
                   and not (isinstance(v, dict) and len(v) > 8)}
        size_rows.append({"quantity": change["method"], "value": json.dumps(summary)})
    header = f"model: {args.model}, recipe: {args.recipe}, saved to {args.out}\n\n"
    quality = markdown_table(rows, ("task", "metric", "before", "after", "delta", "n", "protocol")) + "\n" if rows else ""
    return header + quality + markdown_table(size_rows)


def _generation_settings(args: argparse.Namespace):
    """Every generation argument checked before a model is loaded."""
    from slimlm.infer import CacheSettings, SamplingSettings
    from slimlm.infer.engine import validate_request
    from slimlm.infer.speculative import check_gamma

    sampling = SamplingSettings(args.temperature, args.top_k, args.top_p, args.seed)
    sinks_given = args.sink_tokens is not None or args.window is not None
    kind = args.cache or ("sinks" if sinks_given else "contiguous")
    if sinks_given and kind != "sinks":
        raise SlimlmError(f"--sink-tokens and --window apply to the sinks cache, not --cache {kind}")
    if args.kv_cache is not None and args.cache not in (None, "contiguous"):
        raise SlimlmError(f"--kv-cache replaces the contiguous cache; it cannot be combined with "
                          f"--cache {args.cache}")
    cache = CacheSettings(kind, args.block_size, 4 if args.sink_tokens is None else args.sink_tokens,
                          256 if args.window is None else args.window, args.kv_cache, args.kv_group_size,
                          args.kv_residual, args.kv_outliers)
    _check_kvquant_arguments(args, cache.kv_spec())
    validate_request([[0] if p else [] for p in args.prompt], args.max_new_tokens)
    if args.draft:
        from slimlm.infer.draft import parse_draft_spec

        check_gamma(args.gamma, 16 if args.adaptive_gamma else None)  # adaptive gamma grows up to 16
        if kind == "sinks" or args.kv_cache is not None:
            raise SlimlmError("speculative decoding (--draft) needs a cache it can roll back: contiguous or paged")
        parse_draft_spec(args.draft)  # an unknown self:<preset> fails here, before anything is loaded
    return sampling, cache


def run_generate(args: argparse.Namespace) -> tuple[dict, str]:
    from slimlm.infer import generate, speculative_generate
    from slimlm.quant.kernels import last_decode_paths
    from slimlm.results import make_record, markdown_table

    sampling, cache = _generation_settings(args)
    loaded = _load(args.model, args)
    for prompt in args.prompt:
        length = len(loaded.tokenizer(prompt).input_ids) + args.max_new_tokens
        check_context(loaded.model, length, f"the prompt {prompt[:30]!r} plus --max-new-tokens")
    calibration = _kvquant_calibration(args, loaded, cache.kv_spec())
    if calibration is not None:
        cache = dataclasses.replace(cache, kv_calibration=calibration)
    stream = len(args.prompt) == 1 and not args.draft

    def show(_index: int, piece: str) -> None:
        print(piece, end="", flush=True)

    if args.draft:
        from slimlm.infer.draft import build_draft, parse_draft_spec

        spec = parse_draft_spec(args.draft)
        if spec is not None:  # built from the target in memory; same tokenizer
            draft, draft_tokenizer = build_draft(loaded.model, spec), None
        else:
            loaded_draft = _load(args.draft, args)
            draft, draft_tokenizer = loaded_draft.model, loaded_draft.tokenizer
        result, per_prompt = speculative_generate(
            loaded.model, draft, loaded.tokenizer, args.prompt, args.max_new_tokens, args.gamma, sampling,
            cache, draft_tokenizer=draft_tokenizer, adaptive=args.adaptive_gamma, stop_at_eos=not args.no_stop)
        metrics = {"speculative": [s.to_dict() for s in per_prompt]}
    else:
        if stream:
            print(args.prompt[0], end="", flush=True)
        result = generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, sampling, cache,
                          stop_at_eos=not args.no_stop, on_text=show if stream else None)
        metrics = {}
    metrics.update(stats=result.stats.to_dict(), texts=result.texts, tokens=result.tokens,
                   decode_kernels=last_decode_paths(loaded.model))
    protocol = {"max_new_tokens": args.max_new_tokens, "sampling": vars(sampling),
                "cache": _without_calibration(cache),
                "draft": args.draft, "gamma": (args.gamma or "auto") if args.draft else None, "dtype": args.dtype}
    record = make_record(args.model, "generate", protocol, metrics)
    lines = ["\n"] if stream else [f"[{i}] {p}{t}\n" for i, (p, t) in enumerate(zip(args.prompt, result.texts))]
    rows = [{"quantity": k, "value": v} for k, v in _generation_summary(result.stats, metrics).items()]
    return record, "".join(lines) + "\n" + markdown_table(rows)


def _generation_summary(stats, metrics: dict) -> dict:
    summary = {"cache": stats.cache, "new_tokens": sum(stats.new_tokens),
               "time_to_first_token_s": stats.time_to_first_token_s, "tokens_per_s": stats.tokens_per_s}
    if "speculative" in metrics:
        runs = metrics["speculative"]
        drafted = sum(r["drafted"] for r in runs)
        summary["acceptance_rate"] = sum(r["accepted"] for r in runs) / drafted if drafted else None
        seen = sum(r["accepted"] + r["rejections"] for r in runs)
        summary["alpha"] = sum(r["accepted"] for r in runs) / seen if seen else None
        forwards = sum(r["iterations"] for r in runs)
        summary["tokens_per_target_forward"] = sum(r["new_tokens"] for r in runs) / max(1, forwards)
        gammas = [g for r in runs for g in r["gammas"]]
        summary["mean_gamma"] = sum(gammas) / len(gammas) if gammas else None
        costs = next((r["costs"] for r in runs if r.get("costs")), None)
        if costs is not None:
            summary["cost_ratio_c"] = costs["cost_ratio_c"]
        summary["calibration_s"] = sum(r["calibration_s"] for r in runs)
    else:
        summary.update(per_token_s=stats.per_token_s, kv_bytes_held=stats.kv_bytes_held,
                       kv_bytes_wasted=stats.kv_bytes_wasted)
    if metrics.get("decode_kernels"):
        summary["decode_kernels"] = metrics["decode_kernels"]
    return summary


def run_export(args: argparse.Namespace) -> tuple[dict, str]:
    from pathlib import Path

    from slimlm.results import make_record

    _check_export_options(args)
    if args.format == "onnx":
        from slimlm.export.onnx import check_options as check_onnx
        from slimlm.export.onnx import describe as describe_onnx
        from slimlm.export.onnx import export_onnx

        accuracy_level = 4 if args.accuracy_level is None else args.accuracy_level
        check_onnx(accuracy_level)  # before loading anything
        if Path(args.out).expanduser().exists() and not args.overwrite:
            raise SlimlmError(f"{args.out} exists: choose another output directory or pass --overwrite")
        loaded = _load(args.model, args)
        result = export_onnx(loaded.model, loaded.tokenizer, args.out, accuracy_level=accuracy_level,
                             widen_bits=args.widen_bits, drop_activation_quantization=args.drop_activation_quant,
                             overwrite=args.overwrite)
        protocol = {"format": "onnx", "accuracy_level": accuracy_level, "widen_bits": args.widen_bits}
        return make_record(args.model, "export", protocol, result.to_dict()), describe_onnx(result)

    from slimlm.export.gguf import check_options, describe, export_gguf

    float_type = args.float_type or "f16"
    check_options(args.ftype, float_type, args.embedding_type, args.exact)  # before loading anything
    if Path(args.out).expanduser().exists() and not args.overwrite:
        raise SlimlmError(f"{args.out} exists: choose another output file or pass --overwrite")
    loaded = _load(args.model, args)
    result = export_gguf(loaded.model, loaded.tokenizer, args.out, ftype=args.ftype, float_type=float_type,
                         embedding_type=args.embedding_type, exact=args.exact, pre_tokenizer=args.pre_tokenizer,
                         drop_activation_quantization=args.drop_activation_quant, overwrite=args.overwrite)
    protocol = {"format": args.format, "type": args.ftype, "exact": args.exact, "float_type": float_type,
                "embedding_type": args.embedding_type}
    return make_record(args.model, "export", protocol, result.to_dict()), describe(result)


def _check_export_options(args: argparse.Namespace) -> None:
    """Refuse options of the other format instead of ignoring them."""
    given = {"onnx": {"--type": args.ftype != "auto", "--exact": args.exact, "--float-type": args.float_type,
                      "--embedding-type": args.embedding_type, "--pre-tokenizer": args.pre_tokenizer},
             "gguf": {"--accuracy-level": args.accuracy_level is not None, "--widen-bits": args.widen_bits}}
    wrong = [option for option, value in given[args.format].items() if value]
    if wrong:
        other = "gguf" if args.format == "onnx" else "onnx"
        raise SlimlmError(f"{', '.join(wrong)} applies to --format {other} only, not --format {args.format}")


COMMANDS = {"eval": run_eval, "info": run_info, "bench": run_bench, "compress": run_compress,
            "generate": run_generate, "distill": run_distill, "export": run_export, "compare": run_compare}

if __name__ == "__main__":
    sys.exit(main())
