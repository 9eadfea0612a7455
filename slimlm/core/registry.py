"""Where the engine, the recipes and the checkpoint formats find methods and compressed layer kinds.

Nothing in `slimlm.compress` or `slimlm.export` imports a method: they ask this registry, which
imports the modules named below once, on first use, and then every module that a third-party
package announces under the entry-point group `slimlm.methods` (so a user adds a method without
forking: `[project.entry-points."slimlm.methods"] mymethod = "mypackage.mymethod"`). Importing a
module is enough: its stage classes carry `@register`, its layer classes `@register_layer("kind")`.

    from slimlm.core.registry import stage_class, method_names, layer_class
    stage_class("gptq")        # the GPTQ stage class (settings + apply)
    layer_class("quantized")   # QuantizedLinear
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from torch import nn

    from slimlm.core.stage import Stage

# slimlm's own methods and layer kinds, in the order `slimlm compress --help` and errors list them.
BUILTIN_MODULES = (
    "slimlm.quant.rtn", "slimlm.quant.smoothquant", "slimlm.quant.zeroquant", "slimlm.quant.gptq",
    "slimlm.quant.awq", "slimlm.quant.omniquant", "slimlm.quant.llm_fp4", "slimlm.quant.head",
    "slimlm.prune.magnitude", "slimlm.prune.wanda", "slimlm.prune.sparsegpt", "slimlm.prune.dsnot",
    "slimlm.prune.layer_drop", "slimlm.prune.llm_pruner", "slimlm.prune.slicegpt", "slimlm.prune.flap",
    "slimlm.lowrank.svd", "slimlm.lowrank.asvd", "slimlm.lowrank.lplr", "slimlm.lowrank.laser", "slimlm.lowrank.lorc",
    "slimlm.lowrank.eora",
    "slimlm.distill.ce", "slimlm.distill.kd", "slimlm.distill.gkd", "slimlm.distill.minillm",
    "slimlm.distill.hidden", "slimlm.distill.ted",
    # layer kinds only
    "slimlm.quant.qlinear", "slimlm.quant.qembedding", "slimlm.quant.w8a8", "slimlm.quant.llm_int8", "slimlm.prune.sparse_linear",
    "slimlm.lowrank.layer",
)
ENTRY_POINT_GROUP = "slimlm.methods"

_stages: dict[str, type[Stage]] = {}
_layers: dict[str, type[nn.Module]] = {}
_sections: dict[str, CheckpointSection] = {}
_loaded = False


@dataclass(frozen=True)
class CheckpointSection:
    """A model change that is neither a layer nor a plain-transformers field (SliceGPT's residual
    shortcuts): how the native checkpoint finds it in a model and puts it back into a new one."""

    collect: Callable[[nn.Module], dict[str, Any]]  # model -> {module name: JSON metadata}
    install: Callable[[nn.Module, dict[str, Any], Any], None]  # (that module, metadata, dtype) -> None


def load_plugins() -> None:
    """Import the built-in method modules and the entry points' modules (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    # slimlm's methods in BUILTIN_MODULES order, whatever order their modules imported each other in
    order = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    builtin = sorted(_stages.items(), key=lambda item: order.get(item[1].__module__, len(order)))
    _stages.clear()
    _stages.update(builtin)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as error:  # noqa: BLE001 - name the plug-in that broke, not a deep traceback
            raise SlimlmError(f"the slimlm.methods plug-in {entry.name!r} ({entry.value}) failed to import: "
                              f"{type(error).__name__}: {error}; fix or uninstall that package") from error


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Add a stage class under its `method` name (use `slimlm.core.stage.register`, which checks it first)."""
    method = cls.model_fields["method"].default
    known = _stages.get(method)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise SlimlmError(f"method {method!r} is registered twice: by {known.__module__}.{known.__qualname__} "
                          f"and by {cls.__module__}.{cls.__qualname__}; rename one")
    _stages[method] = cls
    return cls


def stage_class(method: str) -> type[Stage] | None:
    load_plugins()
    return _stages.get(method)


def stage_classes() -> dict[str, type[Stage]]:
    load_plugins()
    return dict(_stages)


def method_names() -> tuple[str, ...]:
    return tuple(stage_classes())


def register_layer(kind: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator for a compressed layer kind that the native checkpoint saves and rebuilds.

    The class provides `meta() -> dict` (JSON metadata; the registry adds `kind`) and the class method
    `from_meta(meta, dtype) -> module`: an empty layer of the saved shape that `load_state_dict` fills.
    """
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        for needed in ("meta", "from_meta"):
            if not callable(getattr(cls, needed, None)):
                raise SlimlmError(f"layer kind {kind!r}: {cls.__qualname__} needs a `{needed}` method")
        known = _layers.get(kind)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise SlimlmError(f"layer kind {kind!r} is registered twice: {known.__qualname__} and {cls.__qualname__}")
        cls.layer_kind = kind
        _layers[kind] = cls
        return cls
    return add


def layer_class(kind: str) -> type[nn.Module]:
    load_plugins()
    if kind not in _layers:
        raise SlimlmError(f"unknown compressed layer kind {kind!r}: known kinds are {', '.join(_layers)}; "
                          "the checkpoint needs a slimlm (or plug-in) that defines it")
    return _layers[kind]


def layer_kind(module: nn.Module) -> str | None:
    """The registered kind of a compressed layer, None for any other module."""
    load_plugins()
    kind = getattr(type(module), "layer_kind", None)
    return kind if kind in _layers and isinstance(module, _layers[kind]) else None


def register_section(name: str, section: CheckpointSection) -> None:
    _sections[name] = section


def checkpoint_sections() -> dict[str, CheckpointSection]:
    load_plugins()
    return dict(_sections)
