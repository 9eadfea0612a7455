"""The plug-in architecture: methods and layer kinds come from registries, and the import graph is layered.

The toy method and layer kind below are defined here, in the test file, the way a user or a third-party
package adds one: no file under slimlm/ knows about them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import slimlm
from slimlm.core import registry
from slimlm.core.blocks import BlockContext, CompressionReport, LayerReport, linear_weight
from slimlm.core.registry import register_layer
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.eval.perplexity import perplexity_of_windows, token_windows
from slimlm.models.tiny import tiny_model

PACKAGE = Path(slimlm.__file__).parent


@register_layer("toy_float16")
class ToyFloat16Linear(nn.Module):
    """A linear whose weight is stored in float16 with one float32 scale per output row."""

    is_compressed_linear = True

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight16", torch.zeros(out_features, in_features, dtype=torch.float16))
        self.register_buffer("row_scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, module: nn.Module, headroom: float) -> ToyFloat16Linear:
        weight = linear_weight(module).detach()
        layer = cls(weight.shape[1], weight.shape[0], getattr(module, "bias", None) is not None)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / headroom
        layer.weight16.copy_((weight / scale).half())
        layer.row_scale.copy_(scale)
        if layer.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight16.to(x.dtype) * self.row_scale.to(x.dtype), self.bias)

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> ToyFloat16Linear:
        return cls(meta["in_features"], meta["out_features"], meta["bias"])


@register
class ToyFloat16Stage(Stage):
    """Toy method: every target linear becomes a ToyFloat16Linear (no calibration)."""

    method: Literal["toy_float16"] = "toy_float16"
    headroom: float = Field(1000.0, gt=0, description="the largest |w| of a row maps to this float16 value")

    @property
    def needs_calibration(self) -> bool:
        return False

    def check_layer(self, name: str, in_features: int) -> None:
        if in_features > 4096:
            raise SlimlmError(f"toy_float16: {name} is too wide")

    def apply(self, context: BlockContext, report: CompressionReport) -> None:
        for name in context.targets:
            context.replace(name, ToyFloat16Linear.from_linear(context.module(name), self.headroom))
            report.layers.append(LayerReport(name, self.method, 0.0))


@register
class ToyDropLastBlockStage(Stage):
    """Toy whole-model method: removes the last decoder block."""

    method: Literal["toy_drop_last"] = "toy_drop_last"
    whole_model: ClassVar[bool] = True

    @property
    def needs_calibration(self) -> bool:
        return False

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        adapter = slimlm.ModelAdapter(context.model)
        del adapter.blocks[len(adapter) - 1]
        context.model.config.num_hidden_layers -= 1
        report.structure.append({"method": self.method})


def test_toy_method_compresses_saves_reloads_and_evaluates(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("stages:\n  - method: toy_float16\n    headroom: 512\n    ignore: [lm_head, '*o_proj']\n")
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    report = slimlm.compress(model, str(recipe))
    kinds = {type(module).__name__ for module in model.modules()}
    assert "ToyFloat16Linear" in kinds and len(report.layers) == 2 * 6  # q, k, v, gate, up, down per block
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)  # ignored
    slimlm.save(model, tmp_path / "saved")
    reloaded, _ = slimlm.load(tmp_path / "saved")
    assert type(reloaded.model.layers[1].mlp.down_proj) is ToyFloat16Linear
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    nll, scored = perplexity_of_windows(reloaded, token_windows(ids, 32))
    assert scored == 93 and torch.isfinite(torch.tensor(nll))
    assert nll == perplexity_of_windows(model, token_windows(ids, 32))[0]


def test_toy_methods_compose_with_builtin_ones_in_one_recipe():
    model = tiny_model("llama", blocks=3)
    stages = [{"method": "toy_drop_last"}, {"method": "toy_float16", "targets": ["*mlp*"]},
              {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*self_attn*"]}]
    report = slimlm.compress(model, {"stages": stages})
    assert len(model.model.layers) == 2 and report.structure == [{"method": "toy_drop_last"}]
    assert {type(m).__name__ for m in model.model.layers[0].modules()} >= {"ToyFloat16Linear", "QuantizedLinear"}


def test_toy_method_settings_are_validated_like_builtin_ones():
    with pytest.raises(SlimlmError, match="headroom"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "toy_float16", "headroom": -1}]})
    with pytest.raises(SlimlmError, match="unknown key 'headrom'; valid keys: .*headroom"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "toy_float16", "headrom": 2}]})
    with pytest.raises(SlimlmError, match="unknown method 'toy_nope'; choose one of .*toy_float16"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "toy_nope"}]})
    with pytest.raises(SlimlmError, match="changes the architecture: put it before"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "toy_float16"}, {"method": "toy_drop_last"}]})


def test_registration_refuses_what_the_engine_could_not_run():
    class NoApply(Stage):
        method: Literal["toy_no_apply"] = "toy_no_apply"

    with pytest.raises(SlimlmError, match="does not implement apply"):
        register(NoApply)

    class Clash(Stage):
        method: Literal["gptq"] = "gptq"

        def apply(self, context, report) -> None:
            pass

    with pytest.raises(SlimlmError, match="registered twice"):
        register(Clash)
    with pytest.raises(SlimlmError, match="needs a `from_meta`"):
        register_layer("toy_bad")(type("Bad", (nn.Module,), {"meta": lambda self: {}}))


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "slimlm_toy_plugin.py").write_text(
        "from typing import Literal\n"
        "from slimlm.core.stage import Stage, register\n\n"
        "@register\n"
        "class EntryPointStage(Stage):\n"
        "    method: Literal['toy_entry_point'] = 'toy_entry_point'\n\n"
        "    def apply(self, context, report):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [importlib.metadata.EntryPoint("toy", "slimlm_toy_plugin", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: found if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_loaded", False)
    assert registry.stage_class("toy_entry_point").__name__ == "EntryPointStage"
    assert registry.method_names()[:3] == ("rtn", "smoothquant", "zeroquant")  # built-in order kept

    broken = [importlib.metadata.EntryPoint("broken", "slimlm_no_such_module", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: broken)
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(SlimlmError, match="plug-in 'broken' .* failed to import"):
        registry.stage_classes()


def test_every_builtin_method_is_registered_with_the_interface():
    classes = registry.stage_classes()
    builtin = {"rtn", "smoothquant", "zeroquant", "gptq", "awq", "omniquant", "llm_fp4", "magnitude", "wanda",
               "sparsegpt", "dsnot", "drop_layers", "llm_pruner", "slicegpt", "flap", "quantize_head"}
    assert builtin <= set(classes)
    for name in builtin:
        cls = classes[name]
        assert cls.apply is not Stage.apply and cls.__module__ in registry.BUILTIN_MODULES, cls
    whole_model = {name for name, cls in classes.items() if cls.whole_model and name in builtin}
    assert whole_model == {"drop_layers", "llm_pruner", "slicegpt", "flap", "quantize_head"}
    assert {"quantized", "int8", "llm_int8", "sparse"} <= set(registry._layers)


# The layering: cli -> compress / export / infer / eval -> quant / prune / finetune -> core / models / data.

def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """module -> slimlm modules it imports anywhere in its file (module level, in functions, type-checking)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "slimlm"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle_spans_two_packages():
    cycles = [sorted(c) for c in _strongly_connected(_import_graph()) if len({_package(m) for m in c}) > 1]
    assert not cycles, f"import cycles across packages: {cycles}"


def test_the_core_imports_no_method():
    graph = _import_graph()
    methods = ("slimlm.quant", "slimlm.prune", "slimlm.lowrank", "slimlm.distill", "slimlm.finetune")
    for module, targets in graph.items():
        if _package(module) in ("compress", "export", "core"):
            bad = sorted(t for t in targets if t.startswith(methods))
            assert not bad, f"{module} imports {bad}: find methods and layer kinds through slimlm.core.registry"


def test_engine_and_recipe_have_no_imports_inside_functions():
    for name in ("compress/engine.py", "compress/recipe.py"):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        nested = [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))]
        assert not nested, f"{name}: imports inside functions at lines {nested}"
