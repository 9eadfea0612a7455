"""SliceGPT: delete rows and columns after rotating the residual stream onto its principal axes.

Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024:

1. Computational invariance (Sec. 3.1-3.2): RMSNorm(x Q) = RMSNorm(x) Q for an orthogonal Q, so
   once each norm's scale vector is folded into the linears that read its output (W_in <- W_in
   diag(alpha)), the residual stream can be expressed in any orthonormal basis: every weight that
   writes to the stream (embedding rows, attention output and MLP down projection) is multiplied
   by Q on the right (W_out <- Q^T W_out as a torch Linear), every weight that reads from it (q, k,
   v, gate, up, LM head) by Q on the left (W_in <- W_in Q), and the outputs do not change.
2. PCA (Sec. 3.3, Eq. 5): Q = the eigenvectors of C = sum_i X_i^T X_i, the covariance of the
   calibration signal entering the norms, sorted by decreasing eigenvalue (with the reference
   code's dampening: 1% of the mean eigenvalue-scale diagonal added before `eigh`).
3. Slicing (Sec. 3.4): keep the first d' = (1 - slicing) d columns of Q (the deletion matrix D),
   which deletes rows and columns of every weight above and shrinks the embedding dimension.

The sliced norm keeps normalising by the *original* width d, as the reference code's RMSN does:
x' / sqrt(|x'|^2 / d + eps). A transformers RMSNorm of width d' computes x' / sqrt(|x'|^2 / d' +
eps'), so the sliced model sets every norm weight to sqrt(d / d') and eps' = eps d / d', which is
the same function.

Two rotation modes (`rotation`):

- `per_block` (the paper's Sec. 3.4 and the reference code's sequential rotate-and-slice):
  a PCA of the signal entering each block (Q_in) and of the one entering its MLP norm (Q_mid),
  each computed on the model sliced so far and expressed in the original basis, unnormalised
  and dampened as the reference's `pca_calc`; the residual connections then carry the shortcut
  matrices Q_in^T Q_mid and Q_mid^T Q_out (sliced), installed on each block with a forward that
  applies them. No transformers architecture has them, so this model is a slimlm checkpoint
  (`slimlm.save` records the shortcuts, `slimlm.load` reinstalls them).
- `global` (the default, because its result loads with plain transformers; a variant, not the
  paper's method): one Q shared by every block, from the PCA of the signal
  pooled over every norm input, each token divided by its RMS first so that the late blocks'
  larger residual norms do not decide the basis alone. The shortcut matrices are identities and
  disappear: the result is a plain, narrower transformers model.

Models with tied embeddings are untied: the LM head absorbs the final norm's scale and the input
embedding must not, so they no longer hold the same matrix (the untied head costs V x d'
parameters; `parameter_reduction` accounts for it). The head is sliced too (the reference's
`do_slice_head` option; its default keeps the last block's output and the head at full width).
Only RMSNorm families without norm offsets or branch-output norms (Llama, Mistral, Qwen2, Qwen3, SmolLM) are supported: LayerNorm models
(OPT, GPT-2) need the mean-subtraction absorption of Sec. 3.2, and Gemma's (1 + w) norms and
sandwich norms do not commute with a rotation; both are refused with a clear error.
"""

from __future__ import annotations

import copy
import math
import types
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import PreTrainedModel

from slimlm.core.blocks import (
    BlockInputs,
    CompressionReport,
    capture_block_inputs,
    dense_block_passes,
    on_device,
    run_block,
)
from slimlm.core.registry import CheckpointSection, register_section
from slimlm.core.stage import ModelContext, Stage, register
from slimlm.errors import SlimlmError
from slimlm.models.adapter import BlockAdapter, ModelAdapter, text_config
from slimlm.progress import progress
from slimlm.prune.common import attention_shape

READ_ROLES = ("q", "k", "v", "gate", "up")  # linears that read the residual stream (through a norm)
WRITE_ROLES = ("o", "down")  # linears that write to it


def check_slicegpt_model(adapter: ModelAdapter) -> None:
    """Refuse architectures whose residual stream cannot be rotated by the steps above."""
    norms = [adapter.final_norm, *(n for block in adapter for n in block.norms.values())]
    problem = None
    if adapter.position_embedding is not None or any(isinstance(n, nn.LayerNorm) for n in norms):
        problem = "it uses LayerNorm (mean subtraction is not absorbed here)"
    elif adapter.norm_weight_offset:
        problem = "its norms scale by (1 + weight)"
    elif any(role in block.norms for block in adapter for role in ("attn_out_norm", "mlp_out_norm")):
        problem = "it normalises the branch outputs (sandwich norms), which a rotation does not commute with"
    elif not {"q", "k", "v", "o", "up", "down"} <= set(adapter[0].linears):
        problem = f"its block linears are {sorted(adapter[0].linears)} (fused qkv is not supported)"
    elif any(_epsilon_attribute(n) is None for n in norms):
        problem = "its norms have no `variance_epsilon` / `eps` attribute"
    if problem:
        raise SlimlmError(f"slicegpt supports RMSNorm decoders (Llama, Mistral, Qwen2, Qwen3); this "
                          f"{adapter.family} model cannot be sliced: {problem}")


def _epsilon_attribute(norm: nn.Module) -> str | None:
    return next((name for name in ("variance_epsilon", "eps") if isinstance(getattr(norm, name, None), float)), None)


def config_accepts_width(model: PreTrainedModel, width: int) -> bool:
    """Whether the model's config class accepts this hidden size (Llama's demands a multiple of the head count)."""
    config = copy.deepcopy(text_config(model))
    config.head_dim = attention_shape(config)[2]
    config.hidden_size = width
    try:
        if hasattr(config, "validate_architecture"):
            config.validate_architecture()
    except ValueError:
        return False
    return True


def candidate_widths(model: PreTrainedModel, hidden: int, multiple: int) -> list[int]:
    """Hidden sizes slicing can produce, widest first: multiples of `multiple` the config accepts."""
    widths = [w for w in range(hidden // multiple * multiple, 0, -multiple) if config_accepts_width(model, w)]
    if not widths:
        raise SlimlmError(f"slicegpt: no hidden size below {hidden} is a multiple of {multiple} that this "
                          f"{type(model.config).__name__} accepts; choose another round_to")
    return widths


def sliced_width(model: PreTrainedModel, hidden: int, slicing: float, multiple: int) -> int:
    """The widest accepted hidden size of at most (1 - slicing) d (d itself for slicing 0)."""
    if slicing == 0:
        return hidden
    target = (1 - slicing) * hidden
    width = next((w for w in candidate_widths(model, hidden, multiple) if w <= target), None)
    if width is None:
        raise SlimlmError(f"slicegpt: no hidden size of at most {target:.0f} is a multiple of {multiple} that this "
                          f"{type(model.config).__name__} accepts; slice less or choose another round_to")
    return width


def parameters_after(model: PreTrainedModel, adapter: ModelAdapter, width: int, shortcuts: bool = False) -> int:
    """The parameter count once the residual stream is `width` wide (the LM head untied; with `shortcuts`,
    two width x width matrices per block)."""
    hidden = adapter.embedding.weight.shape[1]
    total = sum(p.numel() for p in model.parameters())
    if adapter.tied_embeddings:
        total += adapter.lm_head.weight.numel()
    per_dim = adapter.embedding.weight.shape[0] + adapter.lm_head.weight.shape[0] + 1  # + final norm
    for block in adapter:
        per_dim += sum(block.linears[r].out_features for r in READ_ROLES if r in block.linears)
        per_dim += sum(block.linears[r].in_features + (block.linears[r].bias is not None) for r in WRITE_ROLES)
        per_dim += sum(1 for role in ("attn_norm", "mlp_norm") if role in block.norms)
    return total - per_dim * (hidden - width) + (2 * width * width * len(adapter) if shortcuts else 0)


def width_for_reduction(model: PreTrainedModel, adapter: ModelAdapter, reduction: float, multiple: int,
                        shortcuts: bool = False) -> int:
    """The accepted hidden size whose model's parameter count is closest to (1 - reduction) of today's."""
    before = sum(p.numel() for p in model.parameters())
    widths = candidate_widths(model, adapter.embedding.weight.shape[1], multiple)
    return min(widths, key=lambda w: abs(parameters_after(model, adapter, w, shortcuts) - (1 - reduction) * before))


@torch.no_grad()
def signal_covariance(model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int,
                      device: torch.device) -> torch.Tensor:
    """sum over calibration tokens and norm inputs of x x^T with x = token vector / its RMS (float64)."""
    hidden = adapter.embedding.weight.shape[1]
    covariance = torch.zeros(hidden, hidden, dtype=torch.float64)

    def accumulate(x: torch.Tensor) -> None:
        x = x.reshape(-1, hidden).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
        covariance.add_((x.T @ x).cpu().double())

    def hooks(block: BlockAdapter) -> list:
        return [(block.norms[role], lambda _m, args: accumulate(args[0]))
                for role in ("attn_norm", "mlp_norm") if role in block.norms]

    for _block, _inputs, outputs in dense_block_passes(model, adapter, calibration, batch_size, device,
                                                        "slicegpt signals", hooks):
        pass
    for hidden_states in outputs:  # what leaves the last block enters the final norm
        accumulate(hidden_states)
    return covariance


def principal_axes(covariance: torch.Tensor, dampening: float, width: int) -> tuple[torch.Tensor, float]:
    """The `width` leading eigenvectors of the dampened covariance (columns, by decreasing eigenvalue) and
    the share of the undampened covariance's trace they hold (dampening shifts every eigenvalue alike)."""
    if not torch.isfinite(covariance).all():
        raise SlimlmError("slicegpt: the calibration signal has NaN or inf values; check the model and the data")
    damp = dampening * covariance.diagonal().mean()
    values, vectors = torch.linalg.eigh(covariance + damp * torch.eye(len(covariance), dtype=covariance.dtype))
    order = torch.argsort(values, descending=True)[:width]
    kept = float((values[order] - damp).sum() / covariance.diagonal().sum())
    return vectors[:, order], kept


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]


def fold_norm_scales_(adapter: ModelAdapter) -> None:
    """Fold each RMSNorm's scale into the linears that read its output (and the final one into the head)."""
    for block in adapter:
        for norm_role, readers in (("attn_norm", ("q", "k", "v")), ("mlp_norm", ("gate", "up"))):
            norm = block.norms[norm_role]
            for role in readers:
                if role in block.linears:
                    linear = block.linears[role]
                    _set_weight(linear, linear.weight.data * norm.weight.data.to(linear.weight.dtype))
            norm.weight.data.fill_(1.0)
    head, norm = adapter.lm_head, adapter.final_norm
    _set_weight(head, head.weight.data * norm.weight.data.to(head.weight.dtype))
    norm.weight.data.fill_(1.0)


def _rotate(weight: torch.Tensor, Q: torch.Tensor, reads: bool) -> torch.Tensor:
    """W Q for a weight that reads the stream (columns), Q^T W for one that writes it (rows), in float64."""
    q, w = Q.to(weight.device, torch.float64), weight.double()
    return (w @ q if reads else q.T @ w).to(weight.dtype)


def rotate_reader_(module: nn.Module, Q: torch.Tensor) -> None:
    _set_weight(module, _rotate(module.weight.data, Q, reads=True))


def rotate_writer_(linear: nn.Linear, Q: torch.Tensor) -> None:
    _set_weight(linear, _rotate(linear.weight.data, Q, reads=False))
    if linear.bias is not None:
        linear.bias = nn.Parameter(_rotate(linear.bias.data[:, None], Q, reads=False)[:, 0])


def slice_norm_(norm: nn.Module, hidden: int, width: int) -> None:
    """A width-d' RMSNorm that divides by the original width d: weight sqrt(d / d'), eps scaled by d / d'."""
    norm.weight = nn.Parameter(torch.full((width,), math.sqrt(hidden / width), dtype=norm.weight.dtype,
                                          device=norm.weight.device))
    attribute = _epsilon_attribute(norm)
    setattr(norm, attribute, getattr(norm, attribute) * hidden / width)


def rotate_and_slice_(model: PreTrainedModel, adapter: ModelAdapter, Q: torch.Tensor) -> None:
    """Express the whole residual stream in the basis Q (hidden x width, orthonormal columns), in place."""
    hidden, width = Q.shape
    rotate_reader_(adapter.embedding, Q)
    rotate_reader_(adapter.lm_head, Q)
    for block in adapter:
        for role in READ_ROLES:
            if role in block.linears:
                rotate_reader_(block.linears[role], Q)
        for role in WRITE_ROLES:
            rotate_writer_(block.linears[role], Q)
    for norm in [adapter.final_norm, *(block.norms[r] for block in adapter for r in ("attn_norm", "mlp_norm"))]:
        slice_norm_(norm, hidden, width)


# Per-block rotations (the paper): the residual connections carry shortcut matrices.

def shortcut_block_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A pre-norm decoder block whose residual connections are multiplied by `attn_shortcut` and
    `mlp_shortcut` (Q_in^T Q_mid and Q_mid^T Q_out, sliced): SliceGPT Sec. 3.4."""
    if args:
        raise SlimlmError("a SliceGPT block takes its attention arguments by keyword")
    attention, mlp, attn_norm, mlp_norm = (self.get_submodule(name) for name in self.slicegpt_parts)
    residual = hidden_states @ self.attn_shortcut
    hidden_states = residual + attention(hidden_states=attn_norm(hidden_states), **kwargs)[0]
    return hidden_states @ self.mlp_shortcut + mlp(mlp_norm(hidden_states))


def install_shortcuts_(block: nn.Module, parts: list[str], attn_shape: tuple[int, int], mlp_shape: tuple[int, int],
                       dtype: torch.dtype = torch.float32) -> None:
    """Give a decoder block residual shortcut matrices (of the given shapes, uninitialised) and the forward that uses them."""
    device = next(block.parameters()).device
    block.attn_shortcut = nn.Parameter(torch.empty(attn_shape, dtype=dtype, device=device), requires_grad=False)
    block.mlp_shortcut = nn.Parameter(torch.empty(mlp_shape, dtype=dtype, device=device), requires_grad=False)
    block.slicegpt_parts = list(parts)
    block.forward = types.MethodType(shortcut_block_forward, block)


def _shortcut_metadata(model: nn.Module) -> dict[str, dict]:
    """The checkpoint's record of every block with residual shortcuts: its parts and the matrices' shapes."""
    return {name: {"parts": module.slicegpt_parts, "attn": list(module.attn_shortcut.shape),
                   "mlp": list(module.mlp_shortcut.shape)}
            for name, module in model.named_modules() if hasattr(module, "slicegpt_parts")}


def _install_from_metadata(block: nn.Module, meta: dict, dtype: torch.dtype) -> None:
    install_shortcuts_(block, meta["parts"], tuple(meta["attn"]), tuple(meta["mlp"]), dtype)


# The native checkpoint saves and restores the shortcuts under this key of slimlm.json.
register_section("residual_shortcuts", CheckpointSection(_shortcut_metadata, _install_from_metadata))


def block_parts(block: BlockAdapter) -> list[str]:
    """Paths of the attention module, the MLP module and the two norms inside the block."""
    mlp = block.mlp_module()
    if mlp is None:
        raise SlimlmError("slicegpt per_block needs the MLP linears inside one submodule (Llama's `mlp`)")
    mlp_name = next(name for name, module in block.module.named_modules() if module is mlp)
    return [block.linear_names["o"].rpartition(".")[0], mlp_name, block.norm_names["attn_norm"], block.norm_names["mlp_norm"]]


def _covariance(hidden: list[torch.Tensor]) -> torch.Tensor:
    """sum of X^T X over the batches (float64), X the signal entering the norm, unnormalised (the reference's pca_calc)."""
    width = hidden[0].shape[-1]
    covariance = torch.zeros(width, width, dtype=torch.float64)
    for h in hidden:
        x = h.reshape(-1, width).double()
        covariance += (x.T @ x).cpu()
    return covariance


@torch.no_grad()
def slice_per_block_(model: PreTrainedModel, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int,
                     device: torch.device, width: int, dampening: float) -> list[float]:
    """The reference's sequential rotate-and-slice: each PCA sees the signal of the model sliced so far,
    expressed in the original basis. Returns the variance kept at each PCA."""
    hidden = adapter.embedding.weight.shape[1]
    kept = []

    def axes(signal: list[torch.Tensor]) -> torch.Tensor:
        Q, share = principal_axes(_covariance(signal), dampening, width)
        kept.append(share)
        return Q

    inputs = capture_block_inputs(model, adapter, calibration, batch_size, device)
    Q = axes(inputs.hidden)
    rotate_reader_(adapter.embedding, Q)
    hidden_in = [h @ Q.to(h) for h in inputs.hidden]
    for block in progress(adapter, desc="slicegpt blocks", total=len(adapter)):
        module = block.module
        dtype = block.linears["o"].weight.dtype
        install_shortcuts_(module, block_parts(block), (width, hidden), (hidden, hidden), dtype)
        module.attn_shortcut.copy_(Q.T)  # back to the original basis while o still writes in it
        module.mlp_shortcut.copy_(torch.eye(hidden))
        for role in ("q", "k", "v"):
            rotate_reader_(block.linears[role], Q)
        slice_norm_(block.norms["attn_norm"], hidden, width)
        signal: list[torch.Tensor] = []
        hook = block.norms["mlp_norm"].register_forward_pre_hook(lambda _m, args: signal.append(args[0].detach()))
        batches = BlockInputs(hidden_in, inputs.args, inputs.kwargs)  # this block's arguments
        with on_device([module], device):
            try:
                run_block(module, batches)
            finally:
                hook.remove()
            Q_mid = axes(signal)
            module.attn_shortcut = nn.Parameter((Q.T @ Q_mid).to(dtype), requires_grad=False)
            rotate_writer_(block.linears["o"], Q_mid)
            for role in ("gate", "up"):
                if role in block.linears:
                    rotate_reader_(block.linears[role], Q_mid)
            slice_norm_(block.norms["mlp_norm"], hidden, width)
            module.mlp_shortcut = nn.Parameter(Q_mid.T.to(dtype), requires_grad=False)
            outputs = run_block(module, batches)  # in the original basis: down still writes in it
            Q_next = axes(outputs)
            module.mlp_shortcut = nn.Parameter((Q_mid.T @ Q_next).to(dtype), requires_grad=False)
            rotate_writer_(block.linears["down"], Q_next)
        hidden_in = [o @ Q_next.to(o) for o in outputs]
        inputs = inputs.following(hidden_in)
        Q = Q_next
    rotate_reader_(adapter.lm_head, Q)
    slice_norm_(adapter.final_norm, hidden, width)
    return kept


def _update_config(model: PreTrainedModel, hidden: int, width: int) -> None:
    config = text_config(model)
    config.head_dim = attention_shape(config)[2]  # explicit before hidden_size changes
    config.hidden_size = width
    config.rms_norm_eps = config.rms_norm_eps * hidden / width
    config.tie_word_embeddings = False
    if model.config is not config:
        model.config.tie_word_embeddings = False


def _untie(model: PreTrainedModel, adapter: ModelAdapter) -> None:
    if adapter.tied_embeddings:
        adapter.lm_head.weight = nn.Parameter(adapter.embedding.weight.detach().clone())
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None  # the instance no longer ties them (the class default is untouched)


def slicegpt(model: PreTrainedModel, stage: SliceGPTStage, calibration: torch.Tensor, batch_size: int,
             device: torch.device, report: CompressionReport) -> None:
    adapter = ModelAdapter(model)
    check_slicegpt_model(adapter)
    hidden = adapter.embedding.weight.shape[1]
    before = sum(p.numel() for p in model.parameters())
    if stage.parameter_reduction is not None:
        width = width_for_reduction(model, adapter, stage.parameter_reduction, stage.round_to,
                                    shortcuts=stage.rotation == "per_block")
    else:
        width = sliced_width(model, hidden, stage.slicing, stage.round_to)
    _untie(model, adapter)
    with torch.no_grad():
        fold_norm_scales_(adapter)
        if stage.rotation == "per_block":
            kept = slice_per_block_(model, adapter, calibration, batch_size, device, width, stage.dampening)
        else:
            covariance = signal_covariance(model, adapter, calibration, batch_size, device)
            Q, share = principal_axes(covariance, stage.dampening, width)
            rotate_and_slice_(model, adapter, Q)
            kept = [share]
    _update_config(model, hidden, width)
    after = sum(p.numel() for p in model.parameters())
    report.structure.append({
        "method": "slicegpt", "rotation": stage.rotation, "hidden_size": [hidden, width], "slicing": 1 - width / hidden,
        "kept_variance": sum(kept) / len(kept), "parameters_before": before, "parameters_after": after,
        "parameter_reduction": 1 - after / before,
    })


@register
class SliceGPTStage(Stage):
    """SliceGPT (Ashkboos et al., 2024): rotate the residual stream onto its principal axes, delete the weakest."""

    method: Literal["slicegpt"] = "slicegpt"
    whole_model: ClassVar[bool] = True  # changes the architecture: runs before the block-by-block pass
    slicing: float | None = Field(None, ge=0, lt=1, description="fraction of the hidden size deleted")
    parameter_reduction: float | None = Field(
        None, gt=0, lt=1, description="or: the fraction of the model's parameters to remove (the closest width is chosen)")
    round_to: int = Field(8, ge=1, description="the new hidden size is a multiple of this (and of what the config demands)")
    dampening: float = Field(0.01, ge=0, lt=1, description="fraction of the mean covariance diagonal added before PCA")
    rotation: Literal["per_block", "global"] = Field(
        "global", description="one rotation for all blocks (a plain transformers model; the default), or the "
        "paper's rotation per block (shortcut matrices on the residual connections: a slimlm checkpoint)")

    @model_validator(mode="after")
    def _slicing_or_reduction(self):
        if (self.slicing is None) == (self.parameter_reduction is None):
            raise ValueError("give exactly one of `slicing` (fraction of the hidden size) and `parameter_reduction`")
        return self

    def check(self, adapter, layers: dict[str, int]) -> None:
        check_slicegpt_model(adapter)

    def apply(self, context: ModelContext, report: CompressionReport) -> None:
        slicegpt(context.model, self, context.calibration, context.batch_size, context.device, report)
