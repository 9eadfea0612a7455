"""Resumable compression: the block pass writes a checkpoint after every block, and a later run with the same
model, recipe, calibration tokens and machine continues after the last finished block with a bitwise-identical
result.

A checkpoint folder holds

- `block-NNNN.safetensors` and `block-NNNN.json`: block NNNN's tensors as the recipe left them, and what is
  needed to rebuild its modules (the compressed layer kinds and their metadata, plain linears of another shape);
- `inputs-NNNN.safetensors`: the hidden states entering block NNNN (the calibration activations of the
  already-compressed model) and PyTorch's random-number state at that point;
- `state.json`: the run's fingerprint, the next block to compress, the report so far and each stage's plan.

Every file is written to a temporary name, flushed to disk and renamed, and `state.json` is renamed last, so a
kill at any moment leaves the previous consistent state: a block file it does not name yet is written again.

What resuming does not skip: loading the model, the whole-model stages (layer removal, SliceGPT, the 8-bit
head: deterministic, they run again) and the capture of the first block's inputs (embeddings only); what it
skips is every finished block, which is where sequential methods spend their time.

The fingerprint covers the recipe, the calibration token ids, the model (config, every tensor's name, shape and
dtype, and a sample of its bytes), slimlm's and PyTorch's versions, the thread count and the device type: a
checkpoint of any other run is never used (PyTorch's kernels are bitwise reproducible only on the same machine
with the same threads).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from slimlm.core.blocks import BlockInputs, CompressionReport, LayerReport, replace_module
from slimlm.errors import SlimlmError
from slimlm.export.native import compressed_modules, install_compressed_modules
from slimlm.models.adapter import ModelAdapter
from slimlm.results import atomic_write_bytes, atomic_write_text

FORMAT = 1
STATE = "state.json"


def fingerprint(model: nn.Module, recipe_json: str, calibration: torch.Tensor | None, device: torch.device) -> str:
    """What decides the bits of a compression run, hashed (see the module docstring)."""
    from slimlm.version import __version__

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    parts = [__version__, torch.__version__, str(torch.get_num_threads()), device.type, recipe_json,
             config.to_json_string(use_diff=False) if config is not None else type(model).__name__]
    for part in parts:
        digest.update(part.encode("utf-8") + b"\0")
    if calibration is not None:
        digest.update(calibration.detach().cpu().contiguous().numpy().tobytes())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1).cpu()
        sample = flat if flat.numel() <= 4096 else torch.cat([flat[:2048], flat[-2048:]])
        digest.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Resumed:
    """What a checkpoint restores: the next block to compress, the report and plans so far, the inputs."""

    next_block: int
    report: CompressionReport
    plans: list
    elapsed: float
    hidden: list[torch.Tensor] | None
    rng_state: torch.Tensor

    def inputs(self, captured: BlockInputs, device: torch.device) -> BlockInputs:
        """The captured arguments of block `next_block` (masks, rotary embeddings) with the saved hidden states."""
        for _ in range(self.next_block):
            captured = captured.following(captured.hidden)
        hidden = [h.to(device) for h in self.hidden or []]
        return BlockInputs(hidden, captured.args, captured.kwargs, captured.later)


class BlockCheckpoint:
    """A checkpoint folder of one compression run (see the module docstring)."""

    def __init__(self, directory: str | Path, run_fingerprint: str):
        self.directory = Path(directory).expanduser()
        self.fingerprint = run_fingerprint

    def found(self) -> dict | None:
        """The saved state when the folder holds this run's checkpoint; None when there is none, or when it is
        another run's (said on stderr: it is then replaced)."""
        path = self.directory / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("fingerprint") != self.fingerprint:
            print(f"slimlm: note: {self.directory} holds the checkpoint of another run (a different model, recipe, "
                  "calibration or machine); starting from the first block", file=sys.stderr)
            return None
        return state

    def load(self, model: nn.Module, adapter: ModelAdapter, state: dict) -> Resumed:
        """Put the finished blocks back into `model` and read the rest of the state."""
        next_block = int(state["next_block"])
        dtype = next(model.parameters()).dtype
        for index in range(next_block):
            self._load_block(model, adapter, index, dtype)
        tensors = self._read(self.directory / state["inputs"])
        count = int(state["hidden_batches"])
        hidden = [tensors[f"hidden.{i}"] for i in range(count)] if count >= 0 else None
        report = _report_from_dict(state["report"])
        return Resumed(next_block, report, state["plans"], float(state["elapsed"]), hidden, tensors["rng_state"])

    def save(self, model: nn.Module, adapter: ModelAdapter, index: int, inputs: BlockInputs | None,
             report: CompressionReport, plans: list, elapsed: float) -> None:
        """Block `index` is finished and `inputs` enter block index + 1: write both, then the state naming them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        prefix = f"{adapter.blocks_name}.{index}."
        block = adapter.blocks[index]
        meta = {"compressed_modules": {prefix + name: m for name, m in compressed_modules(block).items()},
                "linears": {prefix + name: [m.in_features, m.out_features, m.bias is not None]
                            for name, m in block.named_modules() if type(m) is nn.Linear}}
        atomic_write_bytes(self.directory / f"block-{index:04d}.safetensors",
                           safetensors_bytes(_tensors_of(block.state_dict())))
        atomic_write_text(self.directory / f"block-{index:04d}.json", json.dumps(meta, indent=1))
        saved = {"rng_state": torch.get_rng_state()}
        if inputs is not None:
            saved.update({f"hidden.{i}": h.detach().cpu() for i, h in enumerate(inputs.hidden)})
        name = f"inputs-{index + 1:04d}.safetensors"
        atomic_write_bytes(self.directory / name, safetensors_bytes(_tensors_of(saved)))
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "next_block": index + 1, "inputs": name,
                 "hidden_batches": -1 if inputs is None else len(inputs.hidden), "plans": plans,
                 "elapsed": elapsed, "report": report.to_dict()}
        atomic_write_text(self.directory / STATE, json.dumps(state))
        for stale in self.directory.glob("inputs-*.safetensors"):  # earlier blocks' inputs: the state moved on
            if stale.name != name:
                stale.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _load_block(self, model: nn.Module, adapter: ModelAdapter, index: int, dtype: torch.dtype) -> None:
        meta_path = self.directory / f"block-{index:04d}.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise self._damaged(f"{meta_path.name} cannot be read ({error})") from error
        for name, (in_features, out_features, bias) in meta.get("linears", {}).items():
            current = model.get_submodule(name)
            shape = (in_features, out_features, bias)
            if type(current) is not nn.Linear or (current.in_features, current.out_features,
                                                  current.bias is not None) != shape:
                replace_module(model, name, nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
        install_compressed_modules(model, meta.get("compressed_modules", {}), dtype)
        block = adapter.blocks[index]
        tensors = self._read(self.directory / f"block-{index:04d}.safetensors")
        missing, unexpected = block.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise self._damaged(f"block {index} does not match the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise self._damaged(f"{path.name} cannot be read ({error})") from error

    def _damaged(self, problem: str) -> SlimlmError:
        return SlimlmError(f"cannot resume from {self.directory}: {problem}; remove the folder (or pass --restart) "
                           "to compress from the first block")


def _tensors_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors can write them: on the CPU, contiguous, aliases copied."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if alias in seen else tensor.contiguous()
        seen.add(alias)
    return out


def _report_from_dict(saved: dict) -> CompressionReport:
    report = CompressionReport()
    report.layers = [LayerReport(**layer) for layer in saved["layers"]]
    report.calibration_tokens = saved["calibration_tokens"]
    report.block_sparsity = {int(k): v for k, v in saved["block_sparsity"].items()}
    report.structure = saved["structure"]
    report.notes = saved["notes"]
    return report


def default_directory(out: str | Path) -> Path:
    """Where `slimlm compress --out OUT` keeps its checkpoint: a hidden sibling of OUT."""
    out = Path(out).expanduser()
    return out.with_name(f".{out.name}.resume")

