"""lm-evaluation-harness integration: slimlm models as an lm-eval model, and lm-eval's own tasks on local files.

* `SlimlmLM`, registered in lm-eval's model registry as `slimlm` when this module is imported: any model
  `slimlm.models.loading.load_model` takes (an embedded name, a float or compressed checkpoint directory, a
  .gguf file, a hub id), optionally scored through a quantized KV cache (`kv_cache=kivi-2bit`, ...).
  `loglikelihood` scores with slimlm's zero-shot scorer (`slimlm.eval.zeroshot.score_continuations`, lm-eval
  HFLM's tokenization and truncation), `loglikelihood_rolling` with lm-eval's rolling windows, and
  `generate_until` with slimlm's generation engine (greedy).
* `local_tasks(data_dir)`: task definitions for lm-eval that `include` lm-eval's own task YAMLs (prompts,
  metrics, and their functions: HellaSwag's `process_docs`, WinoGrande's partial contexts) for the eight
  zero-shot tasks of `slimlm.data.tasks`, and point them at the local data: the local files are rewritten once
  into the Hugging Face datasets' field layout (JSON lines) under the slimlm cache, so lm-eval reads its own
  fields and builds its own prompts. The tasks are named `slimlm_<task>` so that they never shadow lm-eval's
  hub tasks of the same name.
* `evaluate_harness(...)` (`slimlm eval --harness TASKS`) runs `lm_eval.simple_evaluate` on them, offline.
* `python -m slimlm.harness ARGS` is lm-eval's own command line (`lm_eval ARGS`) with the `slimlm` model
  registered and the local tasks on its include path: lm-eval 0.4 discovers models only among its own modules,
  so a bare `lm_eval --model slimlm` cannot find a third-party model; `slimlm-lm-eval` is the same command.

Deviation from lm-eval's HFLM: a context that is only whitespace is scored as empty (EOS context), where HFLM
fails an assertion (see `slimlm.eval.zeroshot`).
"""

from __future__ import annotations

import json
import os
import string
import sys
from collections.abc import Sequence
from pathlib import Path

from slimlm.errors import SlimlmError

try:
    import lm_eval.models  # noqa: F401  # lm-eval's own models first: it fills an empty registry only
    from lm_eval.api.model import LM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
except ImportError as error:  # the optional dependency: `pip install slimlm[harness]`
    raise SlimlmError("lm-evaluation-harness is not installed: pip install 'lm_eval>=0.4.13,<0.5' "
                      "(or slimlm[harness])") from error

# slimlm task name -> (lm-eval task YAML under lm_eval/tasks, the split lm-eval evaluates); the local files are
# `slimlm.data.tasks.TASK_FILES`
LOCAL_TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
}
PREFIX = "slimlm_"


class SlimlmLM(LM):
    """A slimlm model as an lm-eval model (`--model slimlm --model_args pretrained=DIR,batch_size=16`)."""

    def __init__(self, pretrained: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu",
                 batch_size: int | str = 16, trust_remote_code: bool = False, kv_cache: str | None = None,
                 kv_chunk: int = 128, kv_group_size: int = 32, kv_residual: int = 128, model=None,
                 tokenizer=None) -> None:
        super().__init__()
        if model is None:
            from slimlm.models.loading import load_model

            loaded = load_model(pretrained, dtype=dtype, device=device, trust_remote_code=_flag(trust_remote_code))
            model, tokenizer = loaded.model, loaded.tokenizer
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> our default
        self.kv_chunk = int(kv_chunk)
        self.kv_spec = check_harness_kv_cache(kv_cache, self.kv_chunk, int(kv_group_size), int(kv_residual)) \
            if kv_cache else None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SlimlmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SlimlmLM:
        """`--model_args` win over lm-eval's own options (its --batch_size, --device defaults); an unknown
        model argument is an error, not silently dropped."""
        import inspect

        import torch

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "tokenizer"}
        unknown = sorted(set(arg_dict) - known)
        if unknown:
            raise SlimlmError(f"unknown slimlm model_args {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k in known and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]  # lm-eval's default device where there is no GPU: slimlm's own default (cpu)
        return cls(**arg_dict, **extra)

    # -- lm-eval's request types ----------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        if self.kv_spec is not None:
            return [self._through_cache(ctx, cont) for ctx, cont in self._encoded(pairs)]
        from slimlm.eval.zeroshot import score_continuations

        return [(s.logprob, s.is_greedy) for s in score_continuations(self.model, self.tokenizer, pairs,
                                                                         self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from slimlm.eval.zeroshot import model_max_length, score_token_pairs

        longest = model_max_length(self.model, self.tokenizer)
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        out = []
        for request in requests:
            ids = self.tokenizer(request.args[0], add_special_tokens=False).input_ids
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, longest, 1)]
            scores = score_token_pairs(self.model, windows, self.batch_size, max_length=longest)
            out.append(sum(s.logprob for s in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from slimlm.infer.engine import eos_ids, generate_ids

        out = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tokenizer(context, add_special_tokens=False).input_ids
            result = generate_ids(self.model, [prompt], int(settings.get("max_gen_toks", 256)),
                                  eos_token_ids=eos_ids(self.model, self.tokenizer))
            text = self.tokenizer.decode(result.tokens[0], skip_special_tokens=True)
            cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
            out.append(text[:cut])
        return out

    # -- through a quantized KV cache -----------------------------------------------------------
    def _encoded(self, pairs):
        from slimlm.eval.zeroshot import encode_pairs

        return encode_pairs(self.tokenizer, pairs)

    def _through_cache(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Score the continuation from logits computed chunk by chunk through the quantized KV cache."""
        import torch

        from slimlm.eval.zeroshot import model_max_length
        from slimlm.infer.quantized_cache import chunked_logits
        from slimlm.infer.runner import ModelRunner

        if not hasattr(self, "_runner"):
            self._runner = ModelRunner(self.model, fast_kernels=False)
            self.kv_spec.check_head_dim(self._runner.head_dim)
        ids = torch.tensor((context + continuation)[-(model_max_length(self.model, self.tokenizer) + 1):])
        logits = torch.cat([chunk for chunk, _ in chunked_logits(self._runner, ids, self.kv_chunk, self.kv_spec)])
        logits = torch.log_softmax(logits[-len(continuation):].float(), -1)
        targets = torch.tensor(continuation)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        return float(picked.sum()), bool((logits.argmax(-1) == targets).all())


def check_harness_kv_cache(name: str, chunk: int, group_size: int, residual: int):
    """The checked quantized-KV spec for scoring; KVQuant is refused (it needs an offline calibration run)."""
    from slimlm.infer.quantized_cache import check_chunk, parse_kv_cache

    check_chunk(chunk)
    spec = parse_kv_cache(name, group_size, residual)
    if spec.method == "kvquant":
        raise SlimlmError(f"kv_cache={name}: KVQuant needs its offline calibration, which the harness model does not "
                          "run; use kivi-<bits>bit or naive-<bits>bit, or slimlm eval --kv-cache for KVQuant")
    return spec


def _flag(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


if "slimlm" not in MODEL_REGISTRY:
    register_model("slimlm")(SlimlmLM)


# -- the local tasks ------------------------------------------------------------------------------

def _hf_piqa(path: Path, labels_path: Path) -> list[dict]:
    from slimlm.data.tasks import piqa_rows

    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in piqa_rows(path, labels_path)]


def _hf_arc(path: Path) -> list[dict]:
    from slimlm.data.tasks import read_jsonl

    out = []
    for row in read_jsonl(path):
        letters = list(string.ascii_uppercase[: len(row["choices"])])
        out.append({"question": row["question"], "choices": {"text": row["choices"], "label": letters},
                    "answerKey": letters[int(row["label"])]})
    return out


def _hf_hellaswag(path: Path) -> list[dict]:
    """The dataset's fields back from the file's `activity_label: ctx` lines: lm-eval joins
    `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, so ctx is split where ctx_b starts (the rule of
    `slimlm.data.tasks.hellaswag_query`: the trailing incomplete phrase, or nothing when there is none)."""
    from slimlm.data.tasks import hellaswag_items, hellaswag_query

    docs = []
    for query, label, endings in hellaswag_items(path):
        activity, _, ctx = query.partition(": ")
        ctx_a, ctx_b = ctx, ""
        capitalised = hellaswag_query(query)
        if capitalised != query:  # a ctx_b to capitalise: it starts where the two differ
            start = next(j for j, (a, b) in enumerate(zip(query, capitalised)) if a != b)
            ctx_a, ctx_b = query[len(activity) + 2: start].rstrip(" "), query[start:]
        docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings,
                     "label": str(label)})
    return docs


def _hf_boolq(path: Path) -> list[dict]:
    """SuperGLUE's label is 1 for yes; the local file stores "true"/"false"."""
    from slimlm.data.tasks import boolq_label, read_jsonl

    return [{"passage": r["passage"], "question": r["question"], "label": boolq_label(path, i, r["label"])}
            for i, r in enumerate(read_jsonl(path))]


def _hf_openbookqa(path: Path) -> list[dict]:
    from slimlm.data.tasks import openbookqa_rows

    return [{"question_stem": stem, "choices": {"text": texts, "label": letters}, "answerKey": key}
            for stem, letters, texts, key in openbookqa_rows(path)]


def _documents(task: str, data_dir: str | os.PathLike[str] | None) -> list[dict]:
    """The task's local file(s) in the Hugging Face dataset's field layout, in file order."""
    from slimlm.data.tasks import read_jsonl, task_paths

    paths = task_paths(task, data_dir)
    readers = {"piqa": _hf_piqa, "arc_easy": _hf_arc, "arc_challenge": _hf_arc, "hellaswag": _hf_hellaswag,
               "boolq": _hf_boolq, "openbookqa": _hf_openbookqa}
    if task in readers:
        return readers[task](*paths)
    if task == "lambada":
        return [{"text": row["text"]} for row in read_jsonl(paths[0])]
    return read_jsonl(paths[0])  # winogrande: sentence, option1, option2, answer, as the dataset has them


def parse_harness_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names (comma-separated or a list), each checked to have a local lm-eval task."""
    tasks = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown or not tasks:
        raise SlimlmError(f"no local lm-eval task for {', '.join(unknown) or 'an empty list'}: choose from "
                          f"{', '.join(LOCAL_TASKS)} (comma-separated)")
    return tasks


def local_tasks(data_dir: str | os.PathLike[str] | None = None, tasks=tuple(LOCAL_TASKS)) -> Path:
    """A folder of lm-eval task YAMLs (`slimlm_<task>`) over the local data, for lm-eval's `include_path`."""
    import lm_eval
    import yaml

    from slimlm.models.loading import cache_root
    from slimlm.results import atomic_write_text

    tasks = parse_harness_tasks(tasks)
    folder = cache_root() / "harness-tasks"
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    for task in tasks:
        yaml_name, split = LOCAL_TASKS[task]
        documents = folder / f"{task}.jsonl"
        atomic_write_text(documents, "".join(json.dumps(d) + "\n" for d in _documents(task, data_dir)))
        config = {
            "include": str(lm_eval_tasks / yaml_name),
            "task": PREFIX + task,
            "tag": ["slimlm_local"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(documents)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
        }
        atomic_write_text(folder / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
    return folder


def evaluate_harness(model, tokenizer, tasks: list[str], data_dir=None, limit: int | None = None,
                     batch_size: int = 16, kv_cache: str | None = None, log_samples: bool = False,
                     kv_chunk: int = 128, kv_group_size: int = 32, kv_residual: int = 128) -> dict:
    """lm-eval's `simple_evaluate` of an in-memory model on the local tasks; returns lm-eval's results dict
    (with every request and response under `samples` when `log_samples`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = local_tasks(data_dir, tasks)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = SlimlmLM(model=model, tokenizer=tokenizer, batch_size=batch_size, kv_cache=kv_cache, kv_chunk=kv_chunk,
                  kv_group_size=kv_group_size, kv_residual=kv_residual)
    return simple_evaluate(model=lm, tasks=[PREFIX + t for t in tasks], num_fewshot=0, limit=limit,
                           task_manager=manager, log_samples=log_samples, bootstrap_iters=1000)


def harness_rows(results: dict) -> list[dict]:
    """lm-eval's results as slimlm's eval rows (task, metric, value, stderr, n, protocol)."""
    rows = []
    for name, metrics in results["results"].items():
        task = name.removeprefix(PREFIX)
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append({"task": task, "metric": metric, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": n,
                         "protocol": f"lm-eval {_version()} {name}, 0-shot"})
    return rows


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `slimlm` model registered and the local tasks included
    (`--data-dir DIR` or $SLIMLM_DATA names the data; it is taken out before lm-eval parses the rest)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = None
    if "--data-dir" in argv:
        at = argv.index("--data-dir")
        data_dir = argv[at + 1]
        del argv[at: at + 2]
    if "--include_path" not in argv:
        argv += ["--include_path", str(local_tasks(data_dir))]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
