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
the same function; the result is a plain, narrower transformers model.

Deviation from the paper, and why: the paper computes one Q per block (and one between attention
and MLP), which makes the residual connections carry the matrices Q_l^T Q_{l+1} ("shortcut
matrices", Sec. 3.4). No transformers architecture has such a matrix, so that model could not be
loaded by plain `from_pretrained`, which this toolkit requires of structured pruning. Here one Q,
shared by every block, comes from the PCA of the signal pooled over every norm input (both norms
of every block and the final norm), each token's vector divided by its RMS first so that the late
blocks' larger residual norms do not decide the basis alone (the norms only see directions). With
one Q the shortcut matrices are identities and disappear. Expect somewhat higher perplexity than
the paper's per-block rotations at the same slicing ratio.

Models with tied embeddings are untied: the LM head absorbs the final norm's scale and the input
embedding must not, so they no longer hold the same matrix (the untied head costs V x d'
parameters; `parameter_reduction` accounts for it). Only RMSNorm families without norm offsets
or branch-output norms (Llama, Mistral, Qwen2, Qwen3, SmolLM) are supported: LayerNorm models
(OPT, GPT-2) need the mean-subtraction absorption of Sec. 3.2, and Gemma's (1 + w) norms and
sandwich norms do not commute with a rotation; both are refused with a clear error.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from slimlm.compress.engine import BlockInputs, CompressionReport, _on_device, capture_block_inputs, run_block
from slimlm.compress.recipe import SliceGPTStage
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter
from slimlm.progress import progress

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


def _text_config(model: PreTrainedModel):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def config_accepts_width(model: PreTrainedModel, width: int) -> bool:
    """Whether the model's config class accepts this hidden size (Llama's demands a multiple of the head count)."""
    config = copy.deepcopy(_text_config(model))
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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


def parameters_after(model: PreTrainedModel, adapter: ModelAdapter, width: int) -> int:
    """The parameter count once the residual stream is `width` wide (the LM head untied)."""
    hidden = adapter.embedding.weight.shape[1]
    total = sum(p.numel() for p in model.parameters())
    if adapter.tied_embeddings:
        total += adapter.lm_head.weight.numel()
    per_dim = adapter.embedding.weight.shape[0] + adapter.lm_head.weight.shape[0] + 1  # + final norm
    for block in adapter:
        per_dim += sum(block.linears[r].out_features for r in READ_ROLES if r in block.linears)
        per_dim += sum(block.linears[r].in_features + (block.linears[r].bias is not None) for r in WRITE_ROLES)
        per_dim += sum(1 for role in ("attn_norm", "mlp_norm") if role in block.norms)
    return total - per_dim * (hidden - width)


def width_for_reduction(model: PreTrainedModel, adapter: ModelAdapter, reduction: float, multiple: int) -> int:
    """The accepted hidden size whose model's parameter count is closest to (1 - reduction) of today's."""
    before = sum(p.numel() for p in model.parameters())
    widths = candidate_widths(model, adapter.embedding.weight.shape[1], multiple)
    return min(widths, key=lambda w: abs(parameters_after(model, adapter, w) - (1 - reduction) * before))


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

    inputs = capture_block_inputs(model, adapter, calibration, batch_size, device)
    for block in progress(adapter, desc="slicegpt signals", total=len(adapter)):
        hooks = [block.norms[role].register_forward_pre_hook(lambda _m, args: accumulate(args[0]))
                 for role in ("attn_norm", "mlp_norm") if role in block.norms]
        try:
            with _on_device([block.module], device):
                outputs = run_block(block.module, inputs)
        finally:
            for hook in hooks:
                hook.remove()
        inputs = BlockInputs(outputs, inputs.args, inputs.kwargs)
    for hidden_states in inputs.hidden:  # what enters the final norm
        accumulate(hidden_states)
    return covariance


def principal_axes(covariance: torch.Tensor, dampening: float) -> torch.Tensor:
    """Eigenvectors of the dampened covariance, by decreasing eigenvalue (columns)."""
    if not torch.isfinite(covariance).all():
        raise SlimlmError("slicegpt: the calibration signal has NaN or inf values; check the model and the data")
    damped = covariance + dampening * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype)
    values, vectors = torch.linalg.eigh(damped)
    return vectors[:, torch.argsort(values, descending=True)]


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


def rotate_and_slice_(model: PreTrainedModel, adapter: ModelAdapter, Q: torch.Tensor) -> None:
    """Express the residual stream in the basis Q (hidden x width, orthonormal columns), in place."""
    hidden, width = Q.shape

    def rotated(weight: torch.Tensor, reads: bool) -> torch.Tensor:
        q = Q.to(weight.device, torch.float64)
        w = weight.double()
        return (w @ q if reads else q.T @ w).to(weight.dtype)

    embedding = adapter.embedding
    _set_weight(embedding, rotated(embedding.weight.data, reads=True))
    _set_weight(adapter.lm_head, rotated(adapter.lm_head.weight.data, reads=True))
    for block in adapter:
        for role in READ_ROLES:
            if role in block.linears:
                _set_weight(block.linears[role], rotated(block.linears[role].weight.data, reads=True))
        for role in WRITE_ROLES:
            linear = block.linears[role]
            _set_weight(linear, rotated(linear.weight.data, reads=False))
            if linear.bias is not None:
                linear.bias = nn.Parameter(rotated(linear.bias.data[:, None], reads=False)[:, 0])
    # A width-d' RMSNorm that divides by the original width d: weight sqrt(d / d'), eps scaled by d / d'.
    for norm in [adapter.final_norm, *(block.norms[r] for block in adapter for r in ("attn_norm", "mlp_norm"))]:
        weight = torch.full((width,), math.sqrt(hidden / width), dtype=norm.weight.dtype, device=norm.weight.device)
        norm.weight = nn.Parameter(weight)
        attribute = _epsilon_attribute(norm)
        setattr(norm, attribute, getattr(norm, attribute) * hidden / width)


def _update_config(model: PreTrainedModel, hidden: int, width: int) -> None:
    config = _text_config(model)
    config.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
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
        width = width_for_reduction(model, adapter, stage.parameter_reduction, stage.round_to)
    else:
        width = sliced_width(model, hidden, stage.slicing, stage.round_to)
    _untie(model, adapter)
    with torch.no_grad():
        fold_norm_scales_(adapter)
        covariance = signal_covariance(model, adapter, calibration, batch_size, device)
        Q = principal_axes(covariance, stage.dampening)[:, :width]
        rotate_and_slice_(model, adapter, Q)
    _update_config(model, hidden, width)
    after = sum(p.numel() for p in model.parameters())
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)
    report.structure.append({
        "method": "slicegpt", "hidden_size": [hidden, width], "slicing": 1 - width / hidden,
        "kept_variance": float(eigenvalues[:width].sum() / eigenvalues.sum()),
        "parameters_before": before, "parameters_after": after, "parameter_reduction": 1 - after / before,
    })
