"""slimlm's own checkpoint format: safetensors weights plus a config with a quantization section.

A saved directory holds

- `config.json` and the tokenizer files: the model's ordinary Hugging Face config;
- `model.safetensors`: every tensor of the model's state dict: float weights, and for each
  compressed linear its packed codes, scales, zero points and group index. When the model holds
  anything plain transformers would misread (compressed linears, resized linears, residual
  shortcuts), the file is named `slimlm-model.safetensors` instead, so that a plain
  `from_pretrained` fails with "no model file" rather than silently building a different model
  (dropping SliceGPT's shortcuts, say); plainly loadable models keep `model.safetensors`;
- `slimlm.json`: the quantization section, i.e. which modules are compressed and the metadata to
  rebuild each one (bits, group size, format, shapes), plus the recipe and the slimlm version;
  and what a transformers config cannot say about structurally pruned models: plain linears whose
  shape differs from the config's (FLAP's per-block widths and compensation biases) and SliceGPT's
  residual shortcut matrices.

Loading rebuilds the architecture from the config, swaps in the compressed modules, and loads the
tensors strictly: a reloaded model computes bitwise the same outputs as the model that was saved.
Directories are written to a temporary sibling first and renamed into place, so an interrupted
save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from slimlm.core.blocks import replace_module
from slimlm.core.dtypes import torch_dtype
from slimlm.core.registry import checkpoint_sections, layer_class, layer_kind
from slimlm.errors import SlimlmError
from slimlm.results import current_umask
from slimlm.version import __version__

SLIMLM_CONFIG = "slimlm.json"
WEIGHTS = "model.safetensors"
SLIMLM_ONLY_WEIGHTS = "slimlm-model.safetensors"  # for checkpoints only slimlm.load reads correctly
FORMAT_VERSION = 1


def model_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes on disk of a checkpoint's weights and configs (tokenizer files left out)."""
    names = (WEIGHTS, SLIMLM_ONLY_WEIGHTS, SLIMLM_CONFIG, "config.json", "generation_config.json")
    return sum((Path(directory) / name).stat().st_size for name in names if (Path(directory) / name).is_file())


def is_slimlm_checkpoint(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / SLIMLM_CONFIG).is_file()


def save(
    model: PreTrainedModel,
    directory: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    recipe: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (compressed) model as a slimlm checkpoint directory; returns the directory."""
    with atomic_directory(directory, overwrite) as staging:
        model.config.save_pretrained(staging)
        save_extras(staging, model, tokenizer)
        section = {
            "format_version": FORMAT_VERSION,
            "slimlm_version": __version__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "compressed_modules": compressed_modules(model),
            "resized_linears": resized_linears(model),
            **{key: found.collect(model) for key, found in checkpoint_sections().items()},
            "recipe": recipe,
        }
        plain = not any(section[key] for key in ("compressed_modules", "resized_linears", *checkpoint_sections()))
        section["weights_file"] = WEIGHTS if plain else SLIMLM_ONLY_WEIGHTS
        # One metadata key: safetensors writes the map in no fixed order, and outputs must be byte-reproducible.
        save_file(storage_state_dict(model), str(staging / section["weights_file"]), metadata={"format": "pt"})
        (staging / SLIMLM_CONFIG).write_text(json.dumps(section, indent=2) + "\n")
    return Path(directory).expanduser()


def compressed_modules(model: nn.Module) -> dict[str, dict]:
    """Metadata of every registered compressed layer kind in the model (`slimlm.core.registry.register_layer`)."""
    found = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:
            found[name] = {"kind": kind, **module.meta()}
    return found


def install_compressed_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype) -> None:
    """Put an empty layer of each kind `compressed_modules` described where it was (load_state_dict fills it)."""
    for name, meta in modules.items():
        module = layer_class(meta.get("kind", "quantized")).from_meta(meta, dtype)  # kind-less: format 1's first files
        replace_module(model, name, module)


def resized_linears(model: PreTrainedModel) -> dict[str, list[int | bool]]:
    """Plain linears whose shape differs from what the config builds ([in, out, has bias] by name):
    structured pruning with a different width per block (FLAP), or a bias it added, which a
    transformers config cannot express."""
    try:
        with torch.device("meta"):
            reference = dict(AutoModelForCausalLM.from_config(model.config).named_modules())
    except Exception:  # noqa: BLE001 - an architecture the config cannot rebuild; load reports any mismatch
        return {}
    resized = {}
    for name, module in model.named_modules():
        built = reference.get(name)
        if type(module) is nn.Linear and isinstance(built, nn.Linear):
            shape = [module.in_features, module.out_features, module.bias is not None]
            if shape != [built.in_features, built.out_features, built.bias is not None]:
                resized[name] = shape
    return resized


def refuse_non_empty(directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """The target directory, or an error if it holds files and `overwrite` is off (checked before any work)."""
    target = Path(directory).expanduser()
    if not overwrite and target.exists() and any(target.iterdir()):
        raise SlimlmError(f"{target} exists and is not empty: choose another output directory or pass --overwrite")
    return target


WRITER_LOCK = ".slimlm-writer.lock"  # inside a staging folder while its run is alive (an flock dies with it)


@contextmanager
def atomic_directory(directory: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it replaces `directory`, on failure it is removed,
    so an interrupted write never leaves a half-written checkpoint. Staging folders of killed runs found
    beside it are removed first (`clean_leftovers`)."""
    target = refuse_non_empty(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    refuse_non_empty(directory, overwrite)  # again: cleaning may have put a killed swap's old output back
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    lock = os.open(staging / WRITER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield staging
        os.unlink(staging / WRITER_LOCK)  # the lock holds on the open file until the folder is published
        finish_directory(staging)
        _swap_into_place(staging, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def clean_leftovers(target: Path) -> list[Path]:
    """Deal with what killed runs left beside `target`; returns the folders still there.

    - `.NAME.tmp-*` staging folders whose writer is dead (its lock file can be locked) are removed;
      one whose writer lives, or from a slimlm without the lock, is named on stderr with how to remove it.
    - `.NAME.old-PID` (the previous output, renamed away just before the new one was renamed in): removed when
      `target` exists; put back as `target` when the kill fell between the two renames, so nothing is lost.
    """
    left = []
    for path in sorted(target.parent.glob(f".{target.name}.tmp-*")):
        if _writer_is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            print(f"slimlm: note: removed {path}, a staging folder left by a killed run", file=sys.stderr)
        else:
            left.append(path)
    for path in sorted(target.parent.glob(f".{target.name}.old-*")):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and _alive(int(pid)):
            left.append(path)
        elif target.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.rename(path, target)
            print(f"slimlm: note: {target} restored from {path.name}, left by a run killed while replacing it",
                  file=sys.stderr)
    if left:
        names = " ".join(shlex.quote(str(path)) for path in left)
        print(f"slimlm: note: {len(left)} staging folder(s) of {target} left by an interrupted run; if no other "
              f"run is writing it, remove them: rm -r {names}", file=sys.stderr)
    return left


def _writer_is_dead(staging: Path) -> bool:
    try:
        fd = os.open(staging / WRITER_LOCK, os.O_RDONLY)
    except OSError:
        return False  # no lock file: an older slimlm's folder, or one being published; leave it to the user
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish_directory(staging: Path) -> None:
    """Before the rename that publishes it: permissions as the umask asks (mkdtemp made it 0700, the files
    0600 where written through mkstemp), and every file and the folder on disk (fsync), so a crash after the
    rename cannot leave a published checkpoint with empty files."""
    umask = current_umask()
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            _fsync(path)
    _fsync(staging)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_extras(staging: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Generation config and tokenizer files beside the weights, when there are any."""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def _alias_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


def narrowest_exact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in bfloat16 or float16 when that holds every value exactly, else unchanged.

    Lossless: a model whose float parameters were rounded (recipe `float_storage`) is stored at that
    width; any other tensor keeps its dtype.
    """
    if tensor.dtype != torch.float32:
        return tensor
    for narrow in (torch.bfloat16, torch.float16):
        candidate = tensor.to(narrow)
        if torch.equal(candidate.to(tensor.dtype), tensor):
            return candidate
    return tensor


def storage_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to write: tied aliases once, float tensors at their narrowest exact width."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        alias = _alias_key(tensor)
        if alias in seen:
            continue
        seen.add(alias)
        state[key] = narrowest_exact(tensor.detach()).contiguous()
    return state


def _swap_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)


def _read_section(path: Path) -> dict:
    """slimlm.json, checked for what `load` reads from it (a damaged or foreign file fails here, clearly)."""
    try:
        section = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise SlimlmError(f"{path} is not valid JSON ({error}): the checkpoint is damaged; save it again") from error
    expected = {"compressed_modules": dict, "resized_linears": dict, "weights_file": str, "dtype": str}
    if not isinstance(section, dict):
        raise SlimlmError(f"{path} holds {type(section).__name__}, not a slimlm checkpoint section")
    for key, kind in expected.items():
        if key in section and not isinstance(section[key], kind):
            raise SlimlmError(f"{path}: {key} is {type(section[key]).__name__}, expected {kind.__name__}; the "
                              "checkpoint is damaged: save it again")
    modules = section.get("compressed_modules", {})
    if any(not isinstance(meta, dict) for meta in modules.values()):
        raise SlimlmError(f"{path}: every compressed_modules entry must be an object; the checkpoint is damaged")
    section.setdefault("compressed_modules", {})
    return section


def load(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a slimlm checkpoint: the model (in eval mode) and its tokenizer if one was saved."""
    directory = Path(directory).expanduser()
    if not is_slimlm_checkpoint(directory):
        raise SlimlmError(f"{directory} is not a slimlm checkpoint (no {SLIMLM_CONFIG})")
    section = _read_section(directory / SLIMLM_CONFIG)
    if section.get("format_version") != FORMAT_VERSION:
        raise SlimlmError(f"{directory}: checkpoint format {section.get('format_version')} is not supported "
                          f"by slimlm {__version__} (expects {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    dtype = torch_dtype(section.get("dtype", "float32"), f"{directory / SLIMLM_CONFIG} dtype")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    install_compressed_modules(model, section["compressed_modules"], dtype)
    for module in model.modules():
        if hasattr(module, "bind_shared_tensors"):  # layers sharing another's tensors (a tied quantized embedding)
            module.bind_shared_tensors(model)
    for name, (in_features, out_features, bias) in section.get("resized_linears", {}).items():
        replace_module(model, name, nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
    for key, found in checkpoint_sections().items():
        for name, meta in section.get(key, {}).items():
            found.install(model.get_submodule(name), meta, dtype)
    # load_state_dict copies into the model's tensors, widening narrowed floats back to their dtype.
    weights = directory / section.get("weights_file", WEIGHTS)
    if not weights.is_file():
        raise SlimlmError(f"{directory}: its weights file {weights.name} is missing; the checkpoint is incomplete")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise SlimlmError(f"{weights} is damaged ({error}): save the model again") from error
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    state = model.state_dict()
    loaded = {_alias_key(state[key]) for key in state if key not in missing}
    missing = [key for key in missing if _alias_key(state[key]) not in loaded]  # tied aliases are fine
    if missing or unexpected:
        raise SlimlmError(f"{weights} does not match its config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return model, tokenizer
