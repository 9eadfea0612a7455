"""Architecture adapter: where the parts of a decoder-only model live.

Compression methods ask the adapter for "the decoder blocks", "the q projection of block 3" or
"the norm in front of the MLP" instead of hard-coding `model.model.layers[i].self_attn.q_proj`,
so one implementation of a method serves every family (the SliceGPT `ModelAdapter` idea).

Discovery is generic: the blocks are the largest `nn.ModuleList` of identical modules, the
embedding and head come from `get_input_embeddings` / `get_output_embeddings`, the final norm is
the norm that is a sibling of the blocks, and each block's linears and norms get a role from their
names (`ROLE_PATTERNS`). Families whose names mean something else declare small overrides
(`FAMILY_OVERRIDES`): Gemma 2 and 3 use `post_attention_layernorm` for the norm *after* attention,
whereas Llama uses that name for the norm in front of the MLP.

Roles:
- attention linears: `q`, `k`, `v`, `o`, or `qkv` where one fused projection makes all three (GPT-2);
- MLP linears: `gate`, `up`, `down` (`up`/`down` alone for two-matrix MLPs such as OPT and GPT-2), or
  `gate_up` where one fused projection makes gate and up (Phi-3: its first half is the gate, the second up);
- norms: `attn_norm` (in front of attention), `mlp_norm` (in front of the MLP), `attn_out_norm`
  and `mlp_out_norm` (Gemma 2/3 sandwich norms on the branch outputs), `q_norm`, `k_norm`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from slimlm.errors import SlimlmError

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")
MLP_ROLES = ("gate", "up", "gate_up", "down")
NORM_ROLES = ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")

# Role patterns, matched against the module's path inside its block (first match wins).
ROLE_PATTERNS: dict[str, str] = {
    "qkv": r"(c_attn|qkv_proj|query_key_value|Wqkv|W_pack)$",
    "q": r"(q_proj|query|wq|q_lin)$",
    "k": r"(k_proj|key|wk|k_lin)$",
    "v": r"(v_proj|value|wv|v_lin)$",
    "o": r"(attn\.c_proj|attention\.dense|o_proj|out_proj|wo|dense)$",
    "gate_up": r"gate_up_proj$",
    "gate": r"(gate_proj|w1)$",
    "up": r"(up_proj|fc1|c_fc|w3|dense_h_to_4h|fc_in)$",
    "down": r"(down_proj|fc2|mlp\.c_proj|w2|dense_4h_to_h|fc_out)$",
    "q_norm": r"q_norm$",
    "k_norm": r"k_norm$",
    "attn_norm": r"(input_layernorm|ln_1|self_attn_layer_norm|attention_norm|ln_attn)$",
    "mlp_norm": r"(post_attention_layernorm|ln_2|final_layer_norm|ffn_norm|pre_feedforward_layernorm|ln_mlp)$",
    "mlp_out_norm": r"post_feedforward_layernorm$",
}

# Declarative per-family differences from the generic patterns: module name inside a block -> role.
FAMILY_OVERRIDES: dict[str, dict[str, str]] = {
    "gemma2": {"post_attention_layernorm": "attn_out_norm", "pre_feedforward_layernorm": "mlp_norm"},
    "gemma3": {"post_attention_layernorm": "attn_out_norm", "pre_feedforward_layernorm": "mlp_norm"},
    "gemma3_text": {"post_attention_layernorm": "attn_out_norm", "pre_feedforward_layernorm": "mlp_norm"},
}


# Families whose norms scale by (1 + weight) rather than by weight: folding a scale s into such a
# norm must give (1 + w') = (1 + w) / s.
NORM_WEIGHT_OFFSET: dict[str, float] = {"gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}


def text_config(model: PreTrainedModel):
    """The config that describes the decoder (a multimodal model's text config, else the model's own)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def is_linear(module: nn.Module) -> bool:
    """A weight matrix applied to the hidden state: nn.Linear, GPT-2's transposed Conv1D, or a
    compressed replacement (a module that declares `is_compressed_linear = True`)."""
    return isinstance(module, (nn.Linear, Conv1D)) or getattr(module, "is_compressed_linear", False)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear, whichever way its weight is stored."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features  # nn.Linear and compressed linears

# The linears each pre-norm reads into, in a block's order (`BlockAdapter.norm_readers`).
NORM_READERS = {"attn_norm": ("q", "k", "v", "qkv"), "mlp_norm": ("gate", "up", "gate_up")}


@dataclass
class BlockAdapter:
    """The named parts of one decoder block."""

    index: int
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)  # role -> module
    linear_names: dict[str, str] = field(default_factory=dict)  # role -> path inside the block
    norms: dict[str, nn.Module] = field(default_factory=dict)
    norm_names: dict[str, str] = field(default_factory=dict)

    def attention_linears(self) -> dict[str, nn.Module]:
        return {r: m for r, m in self.linears.items() if r in ATTENTION_ROLES}

    @property
    def up_role(self) -> str:
        """The role of the MLP's up projection: `up`, or the fused `gate_up` (whose last rows are up)."""
        return "up" if "up" in self.linears else "gate_up"

    def mlp_linears(self) -> dict[str, nn.Module]:
        return {r: m for r, m in self.linears.items() if r in MLP_ROLES}

    def norm_readers(self) -> dict[str, list[str]]:
        """Norm role -> the roles of the linears that read that norm's output, for the norms this block has
        (pre-norm blocks: attn_norm feeds q, k, v or a fused qkv; mlp_norm feeds gate and up). Methods that
        move a scale out of a norm into the linears after it (AWQ, SmoothQuant) take their groups from here."""
        readers = {}
        for norm, roles in NORM_READERS.items():
            present = [role for role in roles if role in self.linears]
            if norm in self.norms and present:
                readers[norm] = present
        return readers

    def mlp_module(self) -> nn.Module | None:
        """The submodule that holds the MLP's linears (Llama's `mlp`), or None where they sit directly
        in the block (OPT's fc1/fc2)."""
        parent = self.linear_names["down"].rpartition(".")[0]
        if not parent or self.linear_names[self.up_role].rpartition(".")[0] != parent:
            return None
        return self.module.get_submodule(parent)


class ModelAdapter:
    """Finds embedding, blocks, final norm, head and each block's projections and norms."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.family = getattr(model.config, "model_type", "unknown")
        self.norm_weight_offset = NORM_WEIGHT_OFFSET.get(self.family, 0.0)
        self.blocks_name, self.blocks = self._find_blocks()
        self.embedding = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise SlimlmError(f"{type(model).__name__} has no output embedding (LM head): it is not a causal LM")
        self.position_embedding = self._find_position_embedding()
        self.final_norm_name, self.final_norm = self._find_final_norm()
        overrides = FAMILY_OVERRIDES.get(self.family, {})
        self.block_adapters = [_adapt_block(i, block, overrides) for i, block in enumerate(self.blocks)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[BlockAdapter]:
        return iter(self.block_adapters)

    def __getitem__(self, index: int) -> BlockAdapter:
        return self.block_adapters[index]

    @property
    def tied_embeddings(self) -> bool:
        weight = getattr(self.embedding, "weight", None)
        return weight is not None and weight is getattr(self.lm_head, "weight", None)

    def linear_layers(self) -> dict[str, nn.Module]:
        """Every linear of every block, by its full module name (what recipes target)."""
        return {
            f"{self.blocks_name}.{b.index}.{b.linear_names[role]}": module
            for b in self.block_adapters
            for role, module in b.linears.items()
        }

    def summary(self) -> dict[str, object]:
        first = self.block_adapters[0]
        return {
            "family": self.family,
            "blocks": f"{self.blocks_name} x {len(self.blocks)}",
            "embedding": self._name_of(self.embedding),
            "position_embedding": self._name_of(self.position_embedding) if self.position_embedding else None,
            "final_norm": self.final_norm_name,
            "lm_head": self._name_of(self.lm_head) + (" (tied to embedding)" if self.tied_embeddings else ""),
            "block_linears": dict(first.linear_names),
            "block_norms": dict(first.norm_names),
        }

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        return "?"

    def _find_blocks(self) -> tuple[str, nn.ModuleList]:
        candidates = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
        ]
        if not candidates:
            raise SlimlmError(
                f"unsupported architecture {type(self.model).__name__}: no list of decoder blocks found "
                "(slimlm supports decoder-only transformers such as Llama, Qwen2, Mistral, Gemma, OPT, GPT-2)"
            )
        return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))

    def _find_position_embedding(self) -> nn.Module | None:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Embedding) and module is not self.embedding and not name.startswith(self.blocks_name):
                return module
        return None

    def _find_final_norm(self) -> tuple[str, nn.Module]:
        parent_name = self.blocks_name.rsplit(".", 1)[0] if "." in self.blocks_name else ""
        parent = self.model.get_submodule(parent_name)
        norms = [(name, m) for name, m in parent.named_children() if is_norm(m)]
        if len(norms) != 1:
            raise SlimlmError(
                f"unsupported architecture {type(self.model).__name__}: expected one final norm beside "
                f"{self.blocks_name}, found {[n for n, _ in norms]}"
            )
        name, module = norms[0]
        return (f"{parent_name}.{name}" if parent_name else name), module


def _adapt_block(index: int, block: nn.Module, overrides: dict[str, str]) -> BlockAdapter:
    adapter = BlockAdapter(index=index, module=block)
    for name, module in block.named_modules():
        if not name or not (is_linear(module) or is_norm(module)):
            continue
        role = _role_of(name, overrides)
        if role is None:
            continue
        target, names = (adapter.linears, adapter.linear_names) if is_linear(module) else (adapter.norms, adapter.norm_names)
        if role in target:
            raise SlimlmError(f"block {index}: both {names[role]!r} and {name!r} look like role {role!r}")
        target[role], names[role] = module, name
    _check_block(adapter)
    return adapter


def _role_of(name: str, overrides: dict[str, str]) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in overrides:
        return overrides[leaf]
    for role, pattern in ROLE_PATTERNS.items():
        if re.search(r"(^|\.)" + pattern, name):
            return role
    return None


def require_norm_per_half(blocks: Iterable[BlockAdapter], method: str) -> None:
    """Fail unless every block has a norm in front of attention and another in front of the MLP: methods that
    fold scales into those norms (AWQ, SmoothQuant, OmniQuant's LET) would mis-scale a half otherwise."""
    for block in blocks:
        if {"attn_norm", "mlp_norm"} <= set(block.norm_names):
            continue
        raise SlimlmError(f"{method} folds scales into the norm in front of attention and the one in front of the "
                          f"MLP, but block {block.index} has norms {sorted(block.norm_names)} (one norm feeding both "
                          "halves, as in Phi's parallel blocks); use a method without scale folding (gptq, rtn)")


def _check_block(adapter: BlockAdapter) -> None:
    roles = set(adapter.linears)
    has_attention = {"q", "k", "v", "o"} <= roles or {"qkv", "o"} <= roles
    has_mlp = "down" in roles and ("up" in roles or "gate_up" in roles)
    if not (has_attention and has_mlp):
        raise SlimlmError(
            f"unsupported architecture: block {adapter.index} has linears {sorted(adapter.linear_names.values())}, "
            f"recognised as roles {sorted(roles)}; slimlm needs q/k/v (or fused qkv), o, up (or fused gate_up) "
            "and down projections"
        )
